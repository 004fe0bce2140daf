"""bitsandbytes' 8-bit dynamic code and its blockwise quantization: the double-quantized NF4 absmax.

With double quantization (bnb ``compress_statistics=True``) the per-block fp32 absmax of an NF4
weight is itself stored in 8 bits:

    offset   = mean(absmax)                                   (fp32, torch's mean)
    a        = absmax - offset
    a2[j]    = max |a| over second-level block j (256 entries, last block partial)
    q[b]     = nearest-code index of a[b] / a2[b // 256] in the 256-entry dynamic code
    decode:  absmax'[b] = (code[q[b]] * a2[b // 256]) + offset     (two fp32 roundings, no FMA)

"Nearest" is bitsandbytes' CPU algorithm (csrc/cpu_ops.cpp ``quantize_cpu_impl``, the one its CPU
backend runs for ``quantize_blockwise``), reproduced here step for step so the codes match bit for
bit: v = clamp(a * (1/a2), -1, 1); i = trunc(fma((v + 1) * 0.5, 65535, 0.5)); q = LUT[i], where
LUT[i] is the number of code midpoints below -1 + 2i/65535.  The fused multiply-add is exact here
in float64 (the product has at most 42 significant bits), rounded once to fp32 as the FMA does.

Nothing in this module imports bitsandbytes.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

ABSMAX_BLOCKSIZE = 256  # bnb quantize_4bit: quantize_blockwise(absmax - offset, blocksize=256)
_LUT_SIZE = 65536


@functools.cache
def _dynamic_map_cpu() -> torch.Tensor:
    # bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8),
    # the same torch operations in the same order (float32 linspace, fp32 scale, sort).
    max_exponent_bits, non_sign_bits = 7, 7
    data: list = []
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    assert len(data) == 256
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_map(device=None) -> torch.Tensor:
    """A fresh copy of bnb's signed 8-bit dynamic code (256 sorted float32 values in [-1, 1])."""
    return _dynamic_map_cpu().to(device if device is not None else "cpu", copy=True)


@functools.lru_cache(maxsize=8)
def _code_lut(code_bytes: bytes) -> torch.Tensor:
    # bnb build_quantize_lut: fp32 midpoints 0.5f * (c[i] + c[i+1]); bin i stands for the fp32 value
    # -1.0f + (2.0f * i) / 65535.0f; LUT[i] = number of midpoints strictly below it (<= 255).
    # numpy float32 arithmetic: one IEEE rounding per operation, as in the C code.
    code = np.frombuffer(code_bytes, dtype=np.float32)
    mid = np.float32(0.5) * (code[:-1] + code[1:])
    val = np.float32(-1.0) + (np.float32(2.0) * np.arange(_LUT_SIZE, dtype=np.float32)) / np.float32(_LUT_SIZE - 1)
    lut = np.minimum(np.searchsorted(mid, val, side="left"), 255).astype(np.uint8)
    return torch.from_numpy(lut)


def quantize_blockwise(a: torch.Tensor, code: torch.Tensor, blocksize: int = ABSMAX_BLOCKSIZE):
    """(q uint8 [n], absmax fp32 [ceil(n / blocksize)]) of a 1-D float32 tensor, as bnb's CPU kernel."""
    a = a.reshape(-1).float()
    n = a.numel()
    nblocks = -(-n // blocksize)
    pad = nblocks * blocksize - n
    blocks = torch.nn.functional.pad(a, (0, pad)).view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    lut = _code_lut(code.detach().float().cpu().contiguous().numpy().tobytes()).to(a.device)
    inv = 1.0 / torch.where(absmax == 0, torch.ones_like(absmax), absmax)  # fp32 1.0f / absmax
    v = (blocks * inv[:, None]).clamp_(-1.0, 1.0)
    t = (v + 1.0) * 0.5  # two fp32 roundings, as the C code
    r = (t.double() * float(_LUT_SIZE - 1) + 0.5).float()  # fma(t, 65535, 0.5): exact, one rounding
    q = lut[r.to(torch.int32).long()]
    q = torch.where((absmax == 0)[:, None], torch.zeros_like(q), q)  # an all-zero block stores code 0
    return q.reshape(-1)[:n].contiguous(), absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         offset: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``code[q] * absmax[i // blocksize]`` (+ offset, a second rounding), as bnb's dequantize."""
    n = q.numel()
    idx = torch.arange(n, device=q.device) // blocksize
    out = code[q.long()] * absmax[idx]
    if offset is not None:
        out = out + offset
    return out
