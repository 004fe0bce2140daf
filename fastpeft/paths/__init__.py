"""The PEFT paths of the fused op: one module each, registered here in merge order.

    W' = diag(ia3_out) (W + S) diag(ia3_in) + s·B·A,    b' = b ⊙ ia3_out
    DoRA (after LoRA, never with IA3 / S):  W' = c ⊙ (W + s·B·A) per row,  c = m / ‖W + s·B·A‖_row

``PATHS`` lists the path objects (fastpeft.paths.base.Path) in the order their ``apply`` builds
the merged weight: BitFit (the bias only), the sparse delta S, the IA3 scales, LoRA, DoRA.  Everything
that handles paths (PEFTLinear, inject, count_parameters, delta_penalty, the peft interop, the
self-check and the benchmark) loops over PATHS; adding a path is one module and one entry here
(CONTRIBUTING.md, "Adding a PEFT path").
"""
from __future__ import annotations

import torch

from fastpeft.paths.base import KINDS, CaseSettings, Path, Rounding, lookup
from fastpeft.paths.bitfit import BITFIT
from fastpeft.paths.dora import DORA
from fastpeft.paths.ia3 import IA3
from fastpeft.paths.lora import LORA
from fastpeft.paths.sparse import SPARSE

PATHS: tuple[Path, ...] = (BITFIT, SPARSE, IA3, LORA, DORA)
BY_NAME = {p.name: p for p in PATHS}
# The order reports and messages list paths in: outermost first (LoRA, IA3, the sparse delta, BitFit).
DISPLAY_ORDER: tuple[Path, ...] = tuple(reversed(PATHS))
# every attribute a path adds to a layer (the op's argument names, buffers included)
SLOTS = tuple(t for p in PATHS for t in p.slots)
# parameter -> count_parameters category, over every path
CATEGORIES = {t: c for p in PATHS for t, c in p.categories.items()}

__all__ = ["PATHS", "BY_NAME", "DISPLAY_ORDER", "SLOTS", "CATEGORIES", "KINDS", "CaseSettings", "Path", "Rounding",
           "get", "present",
           "weight_paths", "merged_rows", "bench_cases"]


def get(name: str) -> Path:
    """The path called ``name`` ("lora", "ia3", "bitfit", "sparse", ...)."""
    return lookup(name)


def present(layer) -> list[Path]:
    """The paths ``layer`` carries, in PATHS order."""
    return [p for p in PATHS if p.present(layer)]


def weight_paths(layer) -> list[Path]:
    """The paths of ``layer`` that are part of its merged weight, in PATHS order."""
    return [p for p in PATHS if p.changes_weight and p.present(layer)]


def merged_rows(layer, w: torch.Tensor, rows: slice, inplace: bool = False) -> torch.Tensor:
    """Rows ``rows`` of the merged weight from the same rows ``w`` of the frozen one: every path's
    ``apply`` in PATHS order (differentiable in the adapters unless ``inplace``)."""
    for path in weight_paths(layer):
        w = path.apply(layer, w, rows, inplace)
    return w


def bench_cases() -> dict[str, Path]:
    """{benchmark case: its path} of every path's cases alone, in DISPLAY_ORDER."""
    return {case: p for p in DISPLAY_ORDER for case in p.bench_cases}
