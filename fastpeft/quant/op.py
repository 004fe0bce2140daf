"""The fused op over a quantized frozen base: ``fastpeft.peft_linear(x, qw, ...)`` with a QuantizedWeight.

    h = x ⊙ ia3_in;   z = h Wᵀ + bias;   z = z ⊙ ia3_out;   y = z + s · (drop_p(x) Aᵀ) Bᵀ

The math and the save policy are the fused op's (fastpeft/core/spec.py); only the two frozen
products change: h Wᵀ and gz W dequantize one cache-sized panel of W at a time
(fastpeft.quant.linear: C++ panel kernels, or a torch panel loop), so W is never dense.  As in the
dense C++ op, without ia3_out the LoRA branch and the bias are written into y first (the C++ rank-r
kernels on CPU for r ≤ 64) and the frozen product accumulates onto them; likewise dX starts as
LoRA's term.  The dropout mask is regenerated in the backward (never saved).  Saved for backward:
x when a gradient reads it, xa [M, r] when lora_B trains, z when ia3_out trains; never W.  The
frozen weight gets no gradient (a QuantizedWeight is not a Parameter).  The op is once
differentiable.  A sparse delta and DoRA over a quantized base are not implemented yet and raise
NotImplementedError naming them.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fastpeft.core.backends.reference import wide
from fastpeft.core.validation import check_peft_linear_args, check_scalars, check_tensor_types
from fastpeft.mask import draw_seed
from fastpeft.quant.linear import quant_linear, quant_linear_add_, quant_linear_grad_input
from fastpeft.quant.weight import QuantizedWeight
from fastpeft.reference import dropout_with_mask

_KERNEL_RANK = 64  # the C++ rank-r kernels' largest rank (csrc/lowrank.cpp kMaxKernelRank)


def _cpp(x: Tensor, r: int):
    """torch.ops.fastpeft_cpp when its rank-r kernels serve this call, else None."""
    if x.is_cpu and r <= _KERNEL_RANK and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        ops = getattr(torch.ops, "fastpeft_cpp", None)
        if ops is not None and hasattr(ops, "lowrank_forward"):
            return ops
    return None


def _dropped(ops, t: Tensor, p: float, seed: int) -> Tensor:
    if p == 0.0:
        return t
    return ops.dropout(t, p, seed) if ops is not None else dropout_with_mask(t, p, seed)


class _QuantPeftLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qw, bias, lora_A, lora_B, ia3_in, ia3_out, scale, p, seed):
        dt = x.dtype
        h = x * ia3_in.to(dt) if ia3_in is not None else x
        has_lora = lora_A is not None
        ops = _cpp(x, lora_A.shape[0]) if has_lora else None
        a = lora_A.to(dt).contiguous() if has_lora else None
        b = lora_B.to(dt).contiguous() if has_lora else None
        xa = z = None
        if has_lora and ia3_out is None:
            if ops is not None:  # y = bias + s·drop(x)AᵀBᵀ in one pass over x
                y, xa = ops.lowrank_forward(x, a, b, None if bias is None else bias.to(dt), scale, p, seed)
            else:
                xa = _dropped(None, x, p, seed) @ a.t()
                y = torch.addmm(bias.to(dt), xa, b.t(), alpha=scale) if bias is not None else scale * (xa @ b.t())
            quant_linear_add_(y, h, qw, forward=True)  # the frozen product accumulates onto it
        else:
            z = quant_linear(h, qw)
            if bias is not None:
                z += bias.to(dt)
            y = z * ia3_out.to(dt) if ia3_out is not None else z
            if has_lora:
                xa = _dropped(ops, x, p, seed) @ a.t()
                y.addmm_(xa, b.t(), alpha=scale)  # here ia3_out is set: y is a fresh tensor
        need_x, _, need_b, need_a, need_bb, need_in, need_out = ctx.needs_input_grad[:7]
        ctx.qw, ctx.scale, ctx.p, ctx.seed = qw, scale, p, seed
        ctx.save_for_backward(x if (need_a or need_in) else None, ia3_in, ia3_out, lora_A, lora_B,
                              xa if need_bb else None, z if need_out else None)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, ia3_in, ia3_out, lora_A, lora_B, xa, z = ctx.saved_tensors
        need_x, _, need_b, need_a, need_bb, need_in, need_out = ctx.needs_input_grad[:7]
        s, p, seed, qw = ctx.scale, ctx.p, ctx.seed, ctx.qw
        gy = gy.contiguous()
        dt = gy.dtype
        gx = gb = ga = gbb = gin = gout = None
        gz = gy * ia3_out.to(dt) if ia3_out is not None else gy
        if need_out:
            gout = (wide(gy) * wide(z)).sum(0).to(ia3_out.dtype)
        if need_b:
            gb = wide(gz).sum(0).to(ctx.bias_dtype)
        lora_dx = None
        if lora_A is not None and (need_x or need_a or need_bb):
            ops = _cpp(gy, lora_A.shape[0])
            a, b = lora_A.to(dt), lora_B.to(dt).contiguous()
            if ops is not None:  # one pass over gy (and x) for gy B, dB and dA
                gyb, gbb, ga = ops.lowrank_backward(gy, b, xa if need_bb else None, x if need_a else None, s, p, seed)
                gyb = gyb.to(dt)
            else:
                gyb = gy @ b
                gbb = s * (gy.t() @ xa) if need_bb else None
                ga = s * (gyb.t() @ _dropped(None, x, p, seed)) if need_a else None
            if need_x:
                lora_dx = _dropped(ops, gyb @ a, p, seed).mul_(s)
            ga = ga.to(lora_A.dtype) if need_a else None
            gbb = gbb.to(lora_B.dtype) if need_bb else None
        if need_x or need_in:
            if lora_dx is not None and ia3_in is None:
                dh = quant_linear_add_(lora_dx.contiguous(), gz, qw, forward=False)  # dX += gz W
            else:
                dh = quant_linear_grad_input(gz, qw)
            if need_in:
                gin = (wide(dh) * wide(x)).sum(0).to(ia3_in.dtype)
            if need_x:
                gx = dh * ia3_in.to(dt) if ia3_in is not None else dh
                if lora_dx is not None and ia3_in is not None:
                    gx = gx + lora_dx
        return gx, None, gb, ga, gbb, gin, gout, None, None, None


def _check(x, qw: QuantizedWeight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_value, dora_magnitude) -> None:
    """The op's checks for a quantized weight (same messages as fastpeft.core.validation)."""
    if sparse_value is not None:
        raise NotImplementedError("a sparse delta (sparse_index / sparse_value) over a quantized weight is not "
                                  "implemented yet; dequantize the base (weight.dequantize()) to use it")
    if dora_magnitude is not None:
        raise NotImplementedError("dora_magnitude over a quantized weight is not implemented yet; dequantize the "
                                  "base (weight.dequantize()) to use DoRA")
    if x.dtype != qw.dtype:
        raise TypeError(f"weight dtype {qw.dtype} must match x dtype {x.dtype} (the QuantizedWeight dequantizes "
                        f"to {qw.dtype})")
    if x.device != qw.device:
        raise ValueError(f"weight is on {qw.device} but x is on {x.device}; move it to {x.device}")
    # The remaining checks read only shapes, dtypes and devices: run them against a weight-shaped view.
    stand_in = torch.empty((), dtype=x.dtype, device=x.device).expand(*qw.shape)
    check_peft_linear_args(x, stand_in, bias, lora_A, lora_B, 1.0, 0.0, ia3_in, ia3_out, None, None)


def quant_peft_linear(x: Tensor, weight: QuantizedWeight, bias=None, *, lora_A=None, lora_B=None, lora_scale=1.0,
                      lora_dropout=0.0, dropout_seed=None, ia3_in=None, ia3_out=None, sparse_index=None,
                      sparse_value=None, dora_magnitude=None) -> Tensor:
    """``fastpeft.peft_linear`` with a QuantizedWeight ``weight`` (see the module docstring)."""
    scale, p, seed = check_scalars(lora_scale, lora_dropout, dropout_seed)
    check_tensor_types(x=x, bias=bias, lora_A=lora_A, lora_B=lora_B, ia3_in=ia3_in, ia3_out=ia3_out,
                       sparse_index=sparse_index, sparse_value=sparse_value, dora_magnitude=dora_magnitude)
    _check(x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_value, dora_magnitude)
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), k).contiguous()
    if lora_A is None or p == 0.0:
        p, seed = 0.0, 0
    elif seed is None:
        seed = draw_seed()  # after every check: a rejected call draws nothing
    y = _QuantPeftLinear.apply(x2, weight, bias, lora_A, lora_B, ia3_in, ia3_out, scale, p, seed)
    return y.reshape(*lead, n)
