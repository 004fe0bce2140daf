"""DoRA's row norm over a quantized frozen base (W = the QuantizedWeight dequantized), without a dense W.

    n² = ‖W‖²_row + 2s·rowsum((W Aᵀ) ⊙ B) + s²·rowsum((B (A Aᵀ)) ⊙ B),   n = sqrt(max(n², 0))

as fastpeft.core.dora states it for a dense W.  Only the two terms that read W change:

- ‖W‖²_row [N] (fp32) is computed once per QuantizedWeight by dequantizing one ~1 MiB panel of
  rows at a time (the C++ panel dequantization when built, else ``dequantize_rows``) and cached on
  the QuantizedWeight, keyed on its tensors' version counters and storages (a ``load_state_dict``
  into its buffers, or a move, recomputes it);
- W Aᵀ [N, r] is the quantized product with A as the activation: ``quant_linear(A, qw)`` = A Wᵀ
  [r, N], the same panel / in-loop-dequantizing GEMM as the forward, r/M of its FLOPs.

Adapters are used in the weight's dequantized dtype with fp32 accumulation (as the dense norm does).
n is detached and cached per lora_B until W, A or B changes (version counters), like the dense one;
c = m / n is ``fastpeft.core.dora.dora_scale`` and goes into the op's epilogue (fastpeft.quant.op).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from fastpeft.quant.linear import PANEL_BYTES, cpp_available, dequantize_rows_cpp, panel_rows, quant_linear
from fastpeft.quant.weight import QuantizedWeight

_NORMS = WeakIdKeyDictionary()  # lora_B -> (key of (W, A, B, s) versions and storages, n)


def _weight_key(qw: QuantizedWeight) -> tuple:
    return tuple((t._version, t.data_ptr(), t.device) for t in qw.tensors().values()) + (qw.dtype,)


def row_sq_norms(qw: QuantizedWeight, products: Optional[str] = None) -> Tensor:
    """‖W‖²_row [N] in fp32 for the dequantized W, one panel of rows at a time; cached on ``qw``.

    ``products``: "cpp" (the C++ panel dequantization), anything else the torch ``dequantize_rows``
    (None: C++ when built and ``qw`` is on the CPU).
    """
    key = _weight_key(qw)
    if not hasattr(qw, "_cache"):  # a QuantizedWeight pickled before it had one
        qw._cache = {}
    hit = qw._cache.get("row_sq_norms")
    if hit is not None and hit[0] == key:
        return hit[1]
    n, k = qw.shape
    use_cpp = qw.device.type == "cpu" and cpp_available() if products is None else products == "cpp"
    sq = torch.zeros(n, dtype=torch.float32, device=qw.device)
    if k:
        step = panel_rows(k, 4, PANEL_BYTES)
        buf = torch.empty(min(step, n) * k, dtype=torch.float32, device=qw.device)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            panel = buf[:(r1 - r0) * k].view(r1 - r0, k)
            if use_cpp:
                dequantize_rows_cpp(qw, r0, r1, out=panel)
            else:
                qw.dequantize_rows(r0, r1, out=panel)
            sq[r0:r1] = torch.linalg.vector_norm(panel, dim=1).square()
    qw._cache["row_sq_norms"] = (key, sq)
    return sq


def quant_dora_norm(qw: QuantizedWeight, lora_A: Tensor, lora_B: Tensor, lora_scale: float,
                    products: Optional[str] = None) -> Tensor:
    """n = ‖W + s·B·A‖_row [N] (fp32, detached) for a quantized W; no [N, K] tensor at any time.

    ``products`` is the quantized products' backend (fastpeft.quant.linear: None, "cpp", "torch",
    "triton").  Cached per lora_B until W, A or B changes in place or the scale changes.
    """
    key = (_weight_key(qw), tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in (lora_A, lora_B)),
           float(lora_scale))
    hit = _NORMS.get(lora_B)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        a = lora_A.detach().to(qw.dtype)
        b = lora_B.detach().to(qw.dtype).float()
        wa = quant_linear(a, qw, backend=products).t().float()  # (A Wᵀ)ᵀ = W Aᵀ [N, r]
        a_f = a.float()
        bg = b @ (a_f @ a_f.t())
        s = float(lora_scale)
        sq = row_sq_norms(qw, products) + 2.0 * s * (wa * b).sum(1) + (s * s) * (bg * b).sum(1)
        norm = sq.clamp_min_(0.0).sqrt_()
    _NORMS[lora_B] = (key, norm)
    return norm
