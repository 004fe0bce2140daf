"""NF4 in bitsandbytes' layout: quantize and dequantize a weight, without bitsandbytes.

Layout (bnb ``quantize_4bit(w, blocksize, compress_statistics, quant_type="nf4")``): the weight
[N, K] is flattened row-major to n = N*K values and cut into blocks of ``blocksize`` consecutive
values (the last block is partial when blocksize does not divide n; blocks need not align with
rows).  For block b with absmax[b] = max |w| over the block:

    s      = w * (1 / max(absmax[b], 1e-38))   full blocks      (fp32, reciprocal then multiply)
           = w / max(absmax[b], 1e-38)        the last partial block (a true division, as bnb)
    code   = bucketize(clamp(s, -1, 1), midpoints of NF4_CODE)  (a tie goes to the lower code)
    byte j = code[2j] << 4 | code[2j + 1]      (first value in the HIGH nibble; odd n pads code 7)
    decode: w'[i] = NF4_CODE[code[i]] * absmax[i // blocksize]  (fp32), then cast to w's dtype

The partial last block stores its clamped absmax (an all-zero partial block stores 1e-38), the
full blocks their plain absmax, exactly as bnb.  With ``double_quant`` the absmax is stored in
8 bits (``fastpeft.quant.dynamic``).  Every value here equals
``bitsandbytes.functional.dequantize_4bit(*quantize_4bit(w, ...))`` bit for bit.
"""
from __future__ import annotations

import torch

from fastpeft.quant import dynamic

# bitsandbytes' NF4 code (functional.get_4bit_type("nf4")), exact float32 values.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
NF4_CODE = torch.tensor(NF4_VALUES, dtype=torch.float32)
# The code index of 0.0: the pad nibble of an odd-length weight.
ZERO_CODE = 7
# Blocksizes bnb's quantize_4bit / dequantize_4bit accept.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Values quantized per step: bounds the fp32 temporaries (a multiple of every blocksize).
CHUNK = 1 << 20

_per_device: dict = {}


def code_on(device) -> torch.Tensor:
    """NF4_CODE on ``device`` (cached)."""
    key = torch.device(device)
    if key not in _per_device:
        _per_device[key] = NF4_CODE.to(key)
    return _per_device[key]


def _midpoints(device) -> torch.Tensor:
    code = code_on(device)
    return (code[:-1] + code[1:]) / 2


def check_blocksize(blocksize) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))} (as in bitsandbytes), "
                         f"got {blocksize!r}")
    return blocksize


def _codes(scaled: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)


def quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> dict:
    """The NF4 tensors of w (any float dtype, any shape): see ``QuantizedWeight`` for the names.

    Returns {"packed": uint8 [(n+1)//2], "absmax": fp32 [nblocks]} or, with double_quant,
    {"packed", "absmax": uint8 [nblocks] codes, "absmax2": fp32 [ceil(nblocks/256)],
    "absmax_code": fp32 [256], "absmax_offset": fp32 []}.
    """
    flat = w.detach().reshape(-1)
    n = flat.numel()
    device = flat.device
    bounds = _midpoints(device)
    nblocks = -(-n // blocksize)
    rem = n % blocksize
    full = n - rem
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=device)
    # Whole blocks, CHUNK values at a time (a multiple of blocksize, so of 2: bytes never straddle).
    for c0 in range(0, full, CHUNK):
        c1 = min(full, c0 + CHUNK)
        blocks = flat[c0:c1].float().view(-1, blocksize)
        am = blocks.abs().max(dim=-1)[0]
        absmax[c0 // blocksize:c1 // blocksize] = am
        scaled = torch.clamp(blocks * (1.0 / am.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
        q = _codes(scaled, bounds)
        packed[c0 // 2:c1 // 2] = (q[::2] << 4) | q[1::2]
    if rem:
        tail = flat[full:].float()
        am = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = am
        scaled = torch.clamp(tail / am, -1, 1)
        if rem % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        q = _codes(scaled, bounds)
        packed[full // 2:] = (q[::2] << 4) | q[1::2]
    if not double_quant:
        return {"packed": packed, "absmax": absmax}
    # torch's mean, as bnb (an empty weight has no blocks: offset 0)
    offset = absmax.mean() if nblocks else torch.zeros((), dtype=torch.float32, device=device)
    code = dynamic.dynamic_map(device)
    q_absmax, absmax2 = dynamic.quantize_blockwise(absmax - offset, code, dynamic.ABSMAX_BLOCKSIZE)
    return {"packed": packed, "absmax": q_absmax, "absmax2": absmax2, "absmax_code": code,
            "absmax_offset": offset}


def decode_absmax(t: dict, b0: int, b1: int, absmax_blocksize: int = dynamic.ABSMAX_BLOCKSIZE) -> torch.Tensor:
    """fp32 absmax of blocks [b0, b1): stored, or decoded from the double-quantized form."""
    if "absmax2" not in t:
        return t["absmax"][b0:b1].float()
    q = t["absmax"][b0:b1].long()
    j = torch.arange(b0, b1, device=q.device) // absmax_blocksize
    return (t["absmax_code"][q] * t["absmax2"][j]) + t["absmax_offset"]


def dequantize_flat(t: dict, e0: int, e1: int, blocksize: int, out: torch.Tensor, numel: int,
                    absmax_blocksize: int = dynamic.ABSMAX_BLOCKSIZE, via=None) -> torch.Tensor:
    """Values [e0, e1) of the flattened weight (``numel`` values) into the 1-D ``out`` (its dtype),
    rounded to the dtype ``via`` first when given (the weight's dtype)."""
    packed = t["packed"]
    code = code_on(packed.device)
    c0 = e0
    while c0 < e1:
        # whole blocks [a0, a1) around the chunk [c0, c1); a chunk ends on a block boundary
        blk0 = c0 // blocksize
        c1 = min(e1, blk0 * blocksize + CHUNK)
        blk1 = (c1 - 1) // blocksize + 1
        a0, a1 = blk0 * blocksize, min(numel, blk1 * blocksize)
        byts = packed[a0 >> 1:(a1 + 1) >> 1]
        nib = torch.stack((byts >> 4, byts & 15), dim=1).reshape(-1)
        vals = code[nib.long()]
        vals = torch.nn.functional.pad(vals, (0, (blk1 - blk0) * blocksize - vals.numel())).view(-1, blocksize)
        scales = decode_absmax(t, blk0, blk1, absmax_blocksize)
        v = (vals * scales[:, None]).view(-1)[c0 - a0:c1 - a0]
        out[c0 - e0:c1 - e0] = v if via is None else v.to(via)
        c0 = c1
    return out
