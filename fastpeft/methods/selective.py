"""Selective layer tuning and regularisation toward the pre-trained model.

``select_layers(model, patterns)`` trains exactly the parameters whose qualified name matches a
pattern (``re.search``, so a plain substring works) and freezes the rest.

``delta_penalty(model, kind)`` is a differentiable penalty on how far training has moved the
model from its pre-trained weights, summed over every adapted part:

===================  =====================================================================
part                 what is penalised ("l2": sum of squares, no root, no 1/2; "l1": sum of |.|)
===================  =====================================================================
LoRA (only path)     ΔW = s·BA.  l2 = s²·tr((AAᵀ)(BᵀB)) from two r×r Gram matrices, never
                     forming ΔW; l1 forms s·BA in row chunks (no closed form exists).
IA3 (only path)      ΔW = W·diag(ℓ−1) (inputs) or diag(ℓ−1)·W (outputs):
                     l2 = Σ_k (ℓ_k−1)²·‖W[:,k]‖², l1 = Σ_k |ℓ_k−1|·‖W[:,k]‖₁ (rows for outputs);
                     the column (row) norms of the frozen W are cached.
sparse (only path)   ΔW = S: Σ v² or Σ |v| over its values.
several paths        ΔW = diag(ℓ_out)(W+S)diag(ℓ_in) + s·BA − W, formed in row chunks.
trained in place     parameters that fastpeft made trainable and snapshotted (BitFit biases,
                     ``select_layers``, ``modules_to_save``): p − p₀ against the snapshot.
bottleneck adapter   its up projection (W_up, b_up): the adapter adds exactly
                     up(act(down(h))) to the pre-trained function, zero iff the up projection
                     is zero (it starts there), so that is its distance from the pre-trained model.
===================  =====================================================================

The formulas are the PEFT paths' own (fastpeft.paths): ΔW is their one merged-weight formula
(``merged_rows``), the single-path closed forms their ``penalty_alone``, BitFit's added bias its
``penalty_extra``.  Prompt/prefix embeddings and task heads have no pre-trained counterpart and are
not penalised.
Merged fastpeft layers raise (their weight already holds ΔW; unmerge first).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Union

import torch
import torch.nn as nn

from fastpeft.methods.adapters import BottleneckAdapter
from fastpeft.nn.modules import PEFTLinear
from fastpeft.nn.pretrained import initial_values, remember_pretrained
from fastpeft.paths import KINDS, merged_rows, present, weight_paths
from fastpeft.paths.base import measure

_CHUNK_ELEMENTS = 1 << 22  # dense ΔW is formed at most this many entries at a time


def _compile(patterns) -> list[re.Pattern]:
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    try:
        patterns = list(patterns)
    except TypeError:
        raise TypeError(f"patterns must be a str or a list of str, got {type(patterns).__name__}") from None
    if not patterns:
        raise ValueError("patterns is empty: give at least one regular expression or substring")
    out = []
    for p in patterns:
        if isinstance(p, re.Pattern):
            out.append(p)
            continue
        if not isinstance(p, str):
            raise TypeError(f"every pattern must be a str, got {type(p).__name__}")
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise ValueError(f"pattern {p!r} is not a valid regular expression: {exc}") from None
    return out


def select_layers(model: nn.Module, patterns: Union[str, Iterable[str]]) -> nn.Module:
    """Train only the parameters whose qualified name matches a pattern; freeze the rest.

    Args:
        model: any nn.Module.
        patterns: a regular expression or a list of them, matched with ``re.search`` against
            names from ``model.named_parameters()`` (so "encoder.layer.5." or r"layer\\.(4|5)\\."
            select layers, "bias" every bias).

    Returns the model.  Raises ValueError when no parameter matches.  Call it before training:
    the selected parameters are snapshotted (once) so ``count_parameters`` and ``delta_penalty``
    know their pre-trained values.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    regexes = _compile(patterns)
    named = list(model.named_parameters())
    chosen = {name for name, _ in named if any(r.search(name) for r in regexes)}
    if not chosen:
        sample = [n for n, _ in named[:6]]
        raise ValueError(f"no parameter name matches {[r.pattern for r in regexes]} (names look like {sample})")
    for name, p in named:
        if name in chosen:
            remember_pretrained(p)  # first call wins: the values before any training
            p.requires_grad_(True)
        else:
            p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- delta penalty
def _work_dtype(*ts) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _dense_rows(layer, rows: slice, dtype) -> torch.Tensor:
    """ΔW[rows] = diag(ℓ_out)(W+S)diag(ℓ_in) + s·BA − W for a block of rows, differentiable in the
    adapters: the paths' merged-weight formula (fastpeft.paths.merged_rows) minus the frozen rows."""
    w = layer.weight_nk.detach()[rows].to(dtype)
    return merged_rows(layer, w, rows) - w


def _peft_linear_penalty(name: str, layer, kind: str) -> torch.Tensor:
    if layer.merged:
        raise RuntimeError(f"layer {name!r} is merged: its weight already holds ΔW; unmerge it before delta_penalty")
    paths = weight_paths(layer)
    dtype = _work_dtype(layer.weight, *(t for p in paths for t in p.penalised(layer)))
    if not paths:
        return torch.zeros((), dtype=dtype, device=layer.weight.device)
    if len(paths) == 1:  # the path's closed form, when it has one
        closed = paths[0].penalty_alone(layer, kind, dtype)
        if closed is not NotImplemented:
            return closed
    n, k = layer.out_features, layer.in_features
    step = max(1, _CHUNK_ELEMENTS // max(1, k))
    return sum(measure(_dense_rows(layer, slice(i, min(n, i + step)), dtype), kind) for i in range(0, n, step))


def delta_penalty(model: nn.Module, kind: str = "l2") -> torch.Tensor:
    """Differentiable distance of ``model`` from its pre-trained weights (see the module docstring).

    kind: "l2" sums squared entries of every ΔW (Σ‖ΔW‖²_F, no square root, no ½), "l1" sums
    absolute values (Σ‖ΔW‖₁).  Returns a 0-d tensor (float32, or float64 if the adapters are);
    zero when the model has nothing adapted.  Typical use: ``loss = task_loss + λ·delta_penalty(model)``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be 'l2' or 'l1', got {kind!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    terms = []
    handled: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, PEFTLinear):
            terms.append(_peft_linear_penalty(name, module, kind))
            for path in present(module):
                extra, covered = path.penalty_extra(module, kind)
                terms += extra
                handled.update(id(p) for p in covered)
                if path.changes_weight:
                    handled.update(id(p) for p in path.penalised(module))
        elif isinstance(module, BottleneckAdapter):
            handled.update(id(p) for p in module.parameters(recurse=False))
            for p in (module.up_weight, module.up_bias):
                if p is not None:
                    terms.append(measure(p.to(_work_dtype(p)), kind))
        elif getattr(module, "PARAM_CATEGORIES", None) and "prompt" in module.PARAM_CATEGORIES.values():
            handled.update(id(p) for p in module.parameters(recurse=False))
    for p in model.parameters():
        base = initial_values(p)
        if id(p) in handled or not p.requires_grad or base is None:
            continue
        handled.add(id(p))
        dtype = _work_dtype(p)
        terms.append(measure(p.to(dtype) - base.to(p.device, dtype), kind))
    if not terms:
        ref = next(iter(model.parameters()), None)
        return torch.zeros((), device=ref.device if ref is not None else None)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in terms) else torch.float32
    return torch.stack([t.to(dtype) for t in terms]).sum()
