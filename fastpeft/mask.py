"""Counter-based dropout masks shared bit-for-bit by every backend.

The LoRA branch uses inverted dropout: an element of x is kept with probability 1 - p and then
scaled by 1 / (1 - p).  Whether element ``offset`` (its row-major index in x viewed as [M, K]) is
kept is a pure function of ``(seed, offset, p)``, so the backward pass regenerates the mask
instead of saving it, and the C++ and Triton kernels compute exactly the same bits.

The function, on unsigned 32-bit words (all arithmetic modulo 2**32)::

    mix32(v):   v ^= v >> 16;  v *= 0x7FEB352D;  v ^= v >> 15;  v *= 0x846CA68B;  v ^= v >> 16
    key_lo, key_hi = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    off_lo, off_hi = offset & 0xFFFFFFFF, offset >> 32
    h    = mix32(off_lo ^ key_lo)
    h    = mix32(h ^ (off_hi * 0x9E3779B9 + key_hi))
    keep = h >= threshold(p),   threshold(p) = floor(p * 2**32)

``mix32`` is Chris Wellons' "lowbias32" integer hash (full avalanche, bijective on 32 bits), so
adjacent offsets give independent-looking words and the keep rate is p to within 2**-32.
Seeds are integers in [0, 2**63).
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MIX_MUL_1 = 0x7FEB352D
MIX_MUL_2 = 0x846CA68B
GOLDEN = 0x9E3779B9
SEED_LIMIT = 2**63


def keep_threshold(p: float) -> int:
    """The uint32 threshold below which an element is dropped: floor(p * 2**32)."""
    return int(float(p) * 4294967296.0)


def split_seed(seed: int) -> tuple[int, int]:
    """(key_lo, key_hi) 32-bit words of a dropout seed."""
    return seed & MASK32, (seed >> 32) & MASK32


def _mul32(v: torch.Tensor, c: int) -> torch.Tensor:
    # (v * c) mod 2**32 in int64 without overflow: split c into 16-bit halves.
    lo = v * (c & 0xFFFF)
    hi = ((v * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def mix32(v: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values."""
    v = v ^ (v >> 16)
    v = _mul32(v, MIX_MUL_1)
    v = v ^ (v >> 15)
    v = _mul32(v, MIX_MUL_2)
    return v ^ (v >> 16)


def hash_offsets(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """The 32-bit word (as int64) for each element offset (int64 tensor)."""
    key_lo, key_hi = split_seed(seed)
    off_lo = offsets & MASK32
    off_hi = offsets >> 32
    h = mix32(off_lo ^ key_lo)
    return mix32(h ^ ((_mul32(off_hi, GOLDEN) + key_hi) & MASK32))


def keep_mask(seed: int, p: float, rows: int, cols: int, device=None) -> torch.Tensor:
    """Boolean [rows, cols] mask: True where dropout keeps x[row, col] (x viewed as [M, K])."""
    offsets = torch.arange(rows * cols, dtype=torch.int64, device=device).view(rows, cols)
    return hash_offsets(seed, offsets) >= keep_threshold(p)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A fresh seed from torch's default generator, so torch.manual_seed makes runs reproducible."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"dropout_seed must be an int in [0, 2**63) or None, got {type(seed).__name__}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"dropout_seed must be in [0, 2**63), got {seed}")
    return seed
