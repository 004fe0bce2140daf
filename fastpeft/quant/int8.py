"""Row-wise int8 in bitsandbytes' CB/SCB convention (LLM.int8() weights without outliers).

    SCB[r] = max_k |w[r, k]|                      (float32, one scale per output row)
    CB[r, k] = round(w[r, k] * (127 / SCB[r]))    (fp32 product, round half to even, int8)
    decode: w'[r, k] = (CB[r, k] * SCB[r]) * 7.874015718698502e-3   (fp32, two roundings)

These are bnb's ``int8_vectorwise_quant`` (threshold 0) and ``int8_vectorwise_dequant`` on the
same input; bnb's ``Int8Params`` first casts the weight to float16, so it equals this applied to
``w.half()``.  A row of zeros (where bnb would divide by zero) stores CB = 0 and SCB = 0 and
decodes to zeros.
"""
from __future__ import annotations

import torch

INV_127 = 7.874015718698502e-3  # bnb's reciprocal of 127 (int8_vectorwise_dequant)
CHUNK_ROWS_BYTES = 1 << 22  # rows quantized per step: bounds the fp32 temporaries


def quantize(w: torch.Tensor) -> dict:
    """{"CB": int8 [N, K], "SCB": fp32 [N]} of a 2-D float weight."""
    w = w.detach()
    n, k = w.shape
    cb = torch.empty(n, k, dtype=torch.int8, device=w.device)
    scb = torch.empty(n, dtype=torch.float32, device=w.device)
    if k == 0:  # no values: every row scale is 0
        return {"CB": cb, "SCB": scb.zero_()}
    step = max(1, CHUNK_ROWS_BYTES // max(1, 4 * k))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        rows = w[r0:r1]
        stats = torch.max(rows.abs(), dim=1).values.float()
        q = torch.round(rows * (127.0 / stats.unsqueeze(-1)))
        cb[r0:r1] = torch.where((stats == 0).unsqueeze(-1), torch.zeros_like(q), q).to(torch.int8)
        scb[r0:r1] = stats
    return {"CB": cb, "SCB": scb}


def dequantize_rows(t: dict, r0: int, r1: int, out: torch.Tensor, via=None) -> torch.Tensor:
    """Rows [r0, r1) of the weight into ``out`` [r1 - r0, K] (its dtype), rounded to ``via`` first if given."""
    v = t["CB"][r0:r1] * t["SCB"][r0:r1].view(-1, 1) * INV_127
    out.copy_(v if via is None else v.to(via))
    return out
