"""Block configurations shared by the kernels, and the description of a compiled variant.

On a GPU the GEMMs are autotuned over configs that fit both sm_80 (163 KiB shared memory per
block) and sm_90 (227 KiB); under ``TRITON_INTERPRET=1`` every kernel gets one small config so
CPU tests stay fast while still covering several tiles and ragged edges.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Shared memory per block (bytes) of each compile target: a config above it cannot launch.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass
class Variant:
    """One ahead-of-time compilation unit: a kernel, its argument types and constexpr values."""

    name: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int


def _cfg(num_warps, num_stages, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# Main GEMM out[M, N] = a[M, C] @ b[C, N]: (BLOCK_M, BLOCK_N, BLOCK_C, warps, stages).
# 16-bit configs use BLOCK_C=64, fp32 configs BLOCK_C=32 (same shared memory); the pruner
# keeps the ones matching the operand width.
if INTERPRET:
    GEMM_CONFIGS = [_cfg(1, 1, BLOCK_M=16, BLOCK_N=16, BLOCK_C=16, GROUP_M=2)]
    SKINNY_CONFIGS = [_cfg(1, 1, BLOCK_M=16, BLOCK_C=16)]
    TN_CONFIGS = [_cfg(1, 1, BLOCK_M=16)]
    REDUCE_CONFIGS = [_cfg(1, 1, BLOCK_M=16, BLOCK_N=16)]
else:
    GEMM_CONFIGS = [
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_C=64, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_C=64, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_C=64, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_C=64, GROUP_M=8),
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_C=64, GROUP_M=8),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_C=32, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_C=32, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_C=32, GROUP_M=8),
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_C=32, GROUP_M=8),
    ]
    # r-wide outputs (x A^T, dY B): BLOCK_N is fixed by the caller from r; the pass is
    # bandwidth-bound, so small BLOCK_M keeps enough programs in flight.
    SKINNY_CONFIGS = [
        _cfg(4, 4, BLOCK_M=64, BLOCK_C=64),
        _cfg(4, 3, BLOCK_M=32, BLOCK_C=128),
        _cfg(4, 3, BLOCK_M=128, BLOCK_C=64),
        _cfg(4, 4, BLOCK_M=32, BLOCK_C=64),
    ]
    # Contractions over M (dA, dB, dW, split over M): BLOCK_P/BLOCK_Q fixed by the caller.
    TN_CONFIGS = [
        _cfg(4, 4, BLOCK_M=64),
        _cfg(8, 3, BLOCK_M=64),
        _cfg(4, 4, BLOCK_M=32),
        _cfg(8, 3, BLOCK_M=32),
    ]
    REDUCE_CONFIGS = [
        _cfg(4, 1, BLOCK_M=64, BLOCK_N=128),
        _cfg(4, 1, BLOCK_M=32, BLOCK_N=256),
    ]

# The smallest BLOCK_M any GEMM config uses: partial-sum buffers are sized for it.
MIN_GEMM_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in GEMM_CONFIGS)


# Pipeline buffers must fit the smaller of the two targets (sm_80: 163 KiB per block).  The
# estimate below counts operand tiles only; layout conversions add up to ~20% (measured by the
# AOT check: a 147 KiB estimate compiled to 172 KiB), hence the margin.
SHARED_BUDGET = 136 * 1024


def shared_estimate(cfg, elem: int, **blocks) -> int:
    """Bytes of shared memory the software pipeline of ``cfg`` buffers (operand tiles x stages)."""
    b = {**blocks, **cfg.kwargs}
    if "BLOCK_C" in b:  # fused_matmul: a[BM, BC] and b[BC, BN] tiles
        per_stage = b["BLOCK_M"] * b["BLOCK_C"] + b["BLOCK_C"] * b["BLOCK_N"]
    elif "BLOCK_P" in b:  # matmul_tn: l[BM, BP] and r[BM, BQ] tiles
        per_stage = b["BLOCK_M"] * (b["BLOCK_P"] + b["BLOCK_Q"])
    else:
        return 0
    return per_stage * elem * max(1, cfg.num_stages)


def usable_configs(configs, elem: int, **blocks):
    """The configs for operands of ``elem`` bytes: BLOCK_C matched to the width, pipeline in budget."""
    want = 32 if elem >= 4 else 64
    kept = [c for c in configs
            if ("BLOCK_N" not in c.kwargs or "BLOCK_C" not in c.kwargs or c.kwargs["BLOCK_C"] == want)
            and shared_estimate(c, elem, **blocks) <= SHARED_BUDGET]
    return kept or configs[-1:]


# FASTPEFT_TRITON_AUTOTUNE=0 (or ``no_autotune()``) takes the first usable config instead of
# benchmarking them all: one compile per kernel variant, for checks where speed does not matter.
AUTOTUNE = os.environ.get("FASTPEFT_TRITON_AUTOTUNE", "1") != "0"


@contextlib.contextmanager
def no_autotune():
    """Within the block, new (shape, dtype) keys take the first usable config without tuning."""
    global AUTOTUNE
    saved, AUTOTUNE = AUTOTUNE, False
    try:
        yield
    finally:
        AUTOTUNE = saved


def prune_configs(configs, named_args, **kwargs):
    """Autotune pruner: ``usable_configs`` for the first operand's width and the caller's blocks."""
    if INTERPRET:
        return configs
    first = next(named_args[k] for k in ("a_ptr", "l_ptr", "gy_ptr") if k in named_args)
    blocks = {k: v for k, v in kwargs.items() if k in ("BLOCK_N", "BLOCK_P", "BLOCK_Q")}
    usable = usable_configs(configs, first.element_size(), **blocks)
    return usable if AUTOTUNE else usable[:1]


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision.  fp32 follows torch.set_float32_matmul_precision: "highest" (the
    default) uses tf32x3, three tensor-core products that keep fp32 accuracy (~1e-6), anything
    else plain tf32 (~1e-3, what cuBLAS does when torch allows tf32).  16-bit inputs ignore it."""
    if dtype == torch.float32:
        return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return "ieee"


def block_for(dim: int, lo: int = 16, hi: int = 64) -> int:
    """A power-of-two block covering ``dim`` (tl.dot needs >= 16), capped at ``hi``."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, dim))))


# Triton's name for each torch dtype, for ahead-of-time signatures.
TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
