"""Counter-based dropout masks shared bit-for-bit by every backend.

The LoRA branch uses inverted dropout: an element of x is kept with probability 1 - p and then
scaled by 1 / (1 - p) (multiplied by 0 or 1/(1-p), as torch's dropout does, so a NaN or Inf in a
dropped element still propagates).  Whether element ``offset`` (its row-major index in x viewed
as [M, K]) is kept is a pure function of ``(seed, offset, p)``, so the backward pass regenerates
the mask instead of saving it, and the C++ and Triton kernels compute exactly the same bits.

The function, on unsigned 32-bit words (all arithmetic modulo 2**32)::

    mix32(v):   v ^= v >> 16;  v *= 0x7FEB352D;  v ^= v >> 15;  v *= 0x846CA68B;  v ^= v >> 16
    seed_lo, seed_hi = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    k0   = mix32(seed_lo ^ mix32(seed_hi ^ 0x243F6A88))          # the round keys: computed once
    k1   = mix32(seed_hi ^ mix32(k0 ^ 0x85A308D3))               # per call, not per element
    off_lo, off_hi = offset & 0xFFFFFFFF, offset >> 32
    h    = mix32(off_lo ^ k0)
    h    = mix32(h ^ (off_hi * 0x9E3779B9 + k1))
    keep = h >= threshold(p),   threshold(p) = floor(p * 2**32)

``mix32`` is Chris Wellons' "lowbias32" integer hash (full avalanche, bijective on 32 bits), so
adjacent offsets give independent-looking words and the keep rate is p to within 2**-32.
The seed enters only through the round keys, a bijection of the 64-bit seed in which every seed
bit changes both keys: seeds s and s + 1 (``dropout_seed=step``) key both rounds differently, and
no offset shift maps one seed's masks onto another's.  (Mixing the raw seed into the counter, as
``mix32(off_lo ^ seed_lo)`` would, makes seed s at offset o equal seed 0 at offset o ^ s: for
s < K the same per-row kept counts at every step.)  Seeds are integers in [0, 2**63).
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MIX_MUL_1 = 0x7FEB352D
MIX_MUL_2 = 0x846CA68B
GOLDEN = 0x9E3779B9
SEED_KEY_0 = 0x243F6A88  # hex digits of pi: any constants do, these are the documented ones
SEED_KEY_1 = 0x85A308D3
SEED_LIMIT = 2**63


def keep_threshold(p: float) -> int:
    """The uint32 threshold below which an element is dropped: floor(p * 2**32)."""
    return int(float(p) * 4294967296.0)


def _mix32_int(v: int) -> int:
    v ^= v >> 16
    v = (v * MIX_MUL_1) & MASK32
    v ^= v >> 15
    v = (v * MIX_MUL_2) & MASK32
    return v ^ (v >> 16)


def seed_key(seed: int) -> tuple[int, int]:
    """The round keys (k0, k1), 32-bit words, of a dropout seed in [0, 2**63)."""
    lo, hi = seed & MASK32, (seed >> 32) & MASK32
    k0 = _mix32_int(lo ^ _mix32_int(hi ^ SEED_KEY_0))
    k1 = _mix32_int(hi ^ _mix32_int(k0 ^ SEED_KEY_1))
    return k0, k1


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
    k0, k1 = seed_key(seed)
    off_lo = offsets & MASK32
    off_hi = offsets >> 32
    h = mix32(off_lo ^ k0)
    return mix32(h ^ ((_mul32(off_hi, GOLDEN) + k1) & MASK32))


def keep_mask(seed: int, p: float, rows: int, cols: int, device=None) -> torch.Tensor:
    """Boolean [rows, cols] mask: True where dropout keeps x[row, col] (x viewed as [M, K])."""
    offsets = torch.arange(rows * cols, dtype=torch.int64, device=device).view(rows, cols)
    return hash_offsets(seed, offsets) >= keep_threshold(p)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A fresh seed from torch's default generator, so torch.manual_seed makes runs reproducible."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def check_seed(seed) -> int:
    """An int seed (Python or numpy integer) in [0, 2**63), else TypeError/ValueError naming dropout_seed."""
    from fastpeft.core.validation import check_seed as check

    return check(seed)
