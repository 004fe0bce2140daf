"""Block configurations shared by the kernels, and the description of a compiled variant.

On a GPU the GEMMs are autotuned over configs that fit both sm_80 (163 KiB shared memory per
block) and sm_90 (227 KiB); under ``TRITON_INTERPRET=1`` every kernel gets one small config so
CPU tests stay fast while still covering several tiles and ragged edges.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

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
    tags: dict = field(default_factory=dict)


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
        _cfg(4, 4, BLOCK_M=128, BLOCK_C=64),
        _cfg(4, 4, BLOCK_M=32, BLOCK_C=64),
    ]
    # Contractions over M (dA, dB, dW, split over M): BLOCK_P/BLOCK_Q fixed by the caller.
    TN_CONFIGS = [
        _cfg(4, 4, BLOCK_M=64),
        _cfg(8, 3, BLOCK_M=64),
        _cfg(4, 4, BLOCK_M=32),
    ]
    REDUCE_CONFIGS = [
        _cfg(4, 1, BLOCK_M=64, BLOCK_N=128),
        _cfg(4, 1, BLOCK_M=32, BLOCK_N=256),
    ]

# The smallest BLOCK_M any GEMM config uses: partial-sum buffers are sized for it.
MIN_GEMM_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in GEMM_CONFIGS)


def prune_by_width(configs, named_args, **kwargs):
    """Keep the configs whose BLOCK_C matches the operand width (fp32: smaller K tiles)."""
    wide = named_args["a_ptr"].element_size() >= 4
    if INTERPRET:
        return configs
    want = 32 if wide else 64
    kept = [c for c in configs if c.kwargs.get("BLOCK_C", want) == want or "BLOCK_N" not in c.kwargs]
    return kept or configs


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 follows torch.set_float32_matmul_precision (tf32 unless
    "highest", like cuBLAS under torch); 16-bit inputs ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def block_for(dim: int, lo: int = 16, hi: int = 64) -> int:
    """A power-of-two block covering ``dim`` (tl.dot needs >= 16), capped at ``hi``."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, dim))))


# Triton's name for each torch dtype, for ahead-of-time signatures.
TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
