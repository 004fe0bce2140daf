"""The op's math in plain PyTorch (DESIGN.md section 1); autograd does the backward.

This is the definition every backend is checked against.  It is deliberately simple: it forms
the dropped-out copy of x and lets autograd save whatever it needs.  ``fastpeft.peft_linear``
with ``backend="reference"`` computes the same function with a hand-written backward that saves
no mask (see ``fastpeft.core.backends.reference``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastpeft.core.validation import check_dora_args, check_scalars, with_lora_bias
from fastpeft.mask import draw_seed, keep_mask


def sparse_delta(sparse_index: torch.Tensor, sparse_value: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Dense [n, k] matrix S with S.view(-1)[sparse_index] = sparse_value (differentiable in value)."""
    dense = torch.zeros(n * k, dtype=sparse_value.dtype, device=sparse_value.device)
    return dense.index_put((sparse_index,), sparse_value).view(n, k)


def dropout_with_mask(x2d: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Inverted dropout of a [M, K] tensor with the counter-based mask of fastpeft.mask."""
    if p == 0.0:
        return x2d
    keep = keep_mask(seed, p, x2d.shape[0], x2d.shape[1], device=x2d.device)
    return x2d * keep.to(x2d.dtype) * (1.0 / (1.0 - p))


def peft_linear(x, weight, bias=None, *, lora_A=None, lora_B=None, lora_scale=1.0, lora_dropout=0.0,
                dropout_seed=None, ia3_in=None, ia3_out=None, sparse_index=None, sparse_value=None,
                dora_magnitude=None, lora_bias=None, backend=None):
    """Reference fused PEFT linear: y = ((x*ia3_in)(W+S)^T + b) * ia3_out + s * (drop(x) A^T) B^T.

    With ``dora_magnitude`` m (DoRA): y = c ⊙ (x Wᵀ + s·(drop(x) Aᵀ) Bᵀ) + b with c = m / n and
    n = ‖W + s·B·A‖_row formed densely and detached (c = 0 on rows where n = 0).

    With ``lora_bias`` (peft's bias on lora_B): y += s · lora_bias, folded into b.

    Same signature as ``fastpeft.peft_linear``; ``backend`` is accepted and ignored.  Adapters
    are used in x's precision; the output has x's dtype.  The scalars are checked and converted
    as ``fastpeft.peft_linear`` does (numpy numbers, one-element tensor seeds).  Being plain
    PyTorch, it supports what the fused op does not: double backward and forward-mode AD.
    """
    if lora_bias is not None:
        bias = with_lora_bias(x, weight, bias, lora_A, lora_B, lora_scale, lora_dropout, dropout_seed, lora_bias)
    lora_scale, p, dropout_seed = check_scalars(lora_scale, lora_dropout, dropout_seed)
    if dora_magnitude is not None:
        check_dora_args(weight, lora_A, lora_B, dora_magnitude, ia3_in, ia3_out, sparse_value, x.dtype, x.device)
    dt = x.dtype
    n, k = weight.shape
    lead = x.shape[:-1]
    x2d = x.reshape(math.prod(lead), k)  # explicit M: reshape(-1, 0) is ambiguous for K = 0
    h = x2d * ia3_in.to(dt) if ia3_in is not None else x2d
    w = weight
    if sparse_index is not None:
        w = w + sparse_delta(sparse_index, sparse_value.to(dt), n, k)
    z = F.linear(h, w, bias.to(dt) if bias is not None and dora_magnitude is None else None)
    if ia3_out is not None:
        z = z * ia3_out.to(dt)
    if lora_A is not None:
        if p > 0.0 and dropout_seed is None:
            dropout_seed = draw_seed()
        xd = dropout_with_mask(x2d, p, dropout_seed if p > 0 else 0)
        z = z + lora_scale * ((xd @ lora_A.to(dt).t()) @ lora_B.to(dt).t())
    if dora_magnitude is not None:
        with torch.no_grad():
            norm = (weight + lora_scale * (lora_B.to(dt) @ lora_A.to(dt))).norm(dim=1)
        m = dora_magnitude.to(dt)
        c = torch.where(norm > 0, m / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(m))
        z = z * c
        if bias is not None:
            z = z + bias.to(dt)
    return z.reshape(*lead, n)
