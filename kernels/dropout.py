"""The counter-based dropout mask of ``fastpeft.mask`` as a Triton helper.

Every kernel that drops elements of x calls ``keep_bits`` on the int64 row-major offsets
``m * K + k`` of the elements it touches, so the forward and backward passes (and the C++ and
reference backends) agree bit for bit without a mask ever being stored.

All hash arithmetic is on ``tl.uint32``: multiplication wraps modulo 2**32 and ``>>`` is a
logical shift, exactly the semantics ``fastpeft.mask`` emulates with int64 tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.kernels import config as _config
from fastpeft.mask import check_seed, keep_threshold, seed_key


@triton.jit
def _mix32(v):
    # lowbias32 (Chris Wellons): the constants >= 2**31 are typed uint32 by Triton, the others
    # are cast so no operand promotes the word to a signed or 64-bit type.
    v = v ^ (v >> 16)
    v = v * tl.full(v.shape, 0x7FEB352D, tl.uint32)
    v = v ^ (v >> 15)
    v = v * tl.full(v.shape, 0x846CA68B, tl.uint32)
    return v ^ (v >> 16)


@triton.jit
def keep_bits(offsets, key_lo, key_hi, threshold):
    """True where dropout keeps the element at int64 ``offsets`` (any shape).

    h = mix32(mix32(off_lo ^ k0) ^ (off_hi * 0x9E3779B9 + k1));  keep = h >= threshold, with the
    seed's round keys (k0, k1) = fastpeft.mask.seed_key(seed) in ``key_lo`` / ``key_hi`` and
    threshold = floor(p * 2**32), all passed as int32 bit patterns (``mask_args``), so every launch
    has the same argument types whatever the seed.  Apply the mask by multiplying by
    ``tl.where(keep, 1/(1-p), 0.0)`` (never by selecting 0): a NaN in a dropped element propagates,
    as in torch's dropout.
    """
    off_lo = (offsets & 0xFFFFFFFF).to(tl.uint32)
    off_hi = (offsets >> 32).to(tl.uint32)
    h = _mix32(off_lo ^ key_lo.to(tl.uint32, bitcast=True))
    h = _mix32(h ^ (off_hi * tl.full(off_hi.shape, 0x9E3779B9, tl.uint32) + key_hi.to(tl.uint32, bitcast=True)))
    return h >= threshold.to(tl.uint32, bitcast=True)


def as_int32(word: int) -> int:
    """The int32 with the bit pattern of a uint32 ``word`` (kernel arguments are typed by value)."""
    return word - (1 << 32) if word >= (1 << 31) else word


def mask_args(seed: int, p: float) -> tuple[int, int, int]:
    """(k0, k1, threshold) as int32 bit patterns for ``keep_bits``: the seed's round keys
    (``fastpeft.mask.seed_key``) and floor(p * 2**32)."""
    k0, k1 = seed_key(seed)
    return as_int32(k0), as_int32(k1), as_int32(keep_threshold(p))


@triton.jit
def keep_mask_kernel(out_ptr, offset_base, numel, key_lo, key_hi, threshold, BLOCK: tl.constexpr):
    # out[i] = keep(offset_base + i): exposes the in-kernel mask so tests compare it bit for bit.
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = idx < numel
    keep = keep_bits(offset_base.to(tl.int64) + idx, key_lo, key_hi, threshold)
    tl.store(out_ptr + idx, keep.to(tl.int8), mask=live)


MASK_BLOCK = 1024


def keep_mask(seed: int, p: float, rows: int, cols: int, offset_base: int = 0, device=None) -> torch.Tensor:
    """Boolean [rows, cols] keep-mask computed by the Triton hash (offsets start at ``offset_base``).

    Same bits as ``fastpeft.mask.keep_mask`` for ``offset_base=0``; a base lets tests reach
    offsets >= 2**32 without allocating that many elements.
    """
    check_seed(seed)
    if not 0 <= offset_base < 2**62:
        raise ValueError(f"offset_base must be in [0, 2**62), got {offset_base}")
    out = torch.empty(rows * cols, dtype=torch.int8, device=device)
    if out.numel():
        grid = (triton.cdiv(out.numel(), MASK_BLOCK),)
        keep_mask_kernel[grid](out, offset_base, out.numel(), *mask_args(seed, p), BLOCK=MASK_BLOCK)
    return out.view(rows, cols).bool()


def aot_variants(dtypes):
    """The one compiled form of the mask kernel (it has no dtype or flag variants)."""
    sig = {"out_ptr": "*i8", "offset_base": "i64", "numel": "i64", "key_lo": "i32", "key_hi": "i32",
           "threshold": "i32", "BLOCK": "constexpr"}
    yield _config.Variant("keep_mask", keep_mask_kernel, sig, {"BLOCK": MASK_BLOCK}, 4, 1)
