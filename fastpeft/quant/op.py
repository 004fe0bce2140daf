"""The fused op over a quantized frozen base: ``fastpeft.peft_linear(x, qw, ...)`` with a QuantizedWeight.

    h = x ⊙ ia3_in;   z = h (W + S)ᵀ + bias;   z = z ⊙ ia3_out;   y = z + s · (drop_p(x) Aᵀ) Bᵀ
    DoRA:  y = c ⊙ (h Wᵀ + s · (drop_p(x) Aᵀ) Bᵀ) + bias,   c = m / ‖W + s·B·A‖_row  (detached norm)

The math and the save policy are the fused op's (fastpeft/core/spec.py: OpArgs in, Grads out, the
``dora_scale`` row c); only the frozen products change: h Wᵀ and gz W dequantize one cache-sized
panel of W at a time (fastpeft.quant.linear), so W is never dense.  The sparse delta S is separate
from W and composes: h Sᵀ and gz S are the sparse product kernels (C++ ``fastpeft_cpp::sparse_*``,
else the reference backend's), d sparse_value = SDDMM(gz, h).  DoRA's row norm reads W through
‖W‖²_row (cached on the QuantizedWeight) and W Aᵀ = (quant_linear(A, W))ᵀ (fastpeft.quant.dora).

Backends (``backend=`` as for the dense op; resolved once, up front): "cpp" (the CPU default) runs
the C++ panel products and, for r ≤ 64, the C++ rank-r LoRA kernels: without ia3_out the LoRA
branch and the bias are written into y first and the frozen product accumulates onto them, and dX
starts as LoRA's term; "triton" (the CUDA default) the Triton products of kernels/quant.py, which
decode W inside their K loop; "reference" the torch panel loop.  The reductions (bias, IA3, DoRA's
dc, the SDDMM) are the reference backend's functions.  The dropout mask is regenerated in the
backward (never saved).  Saved for backward: x when a gradient reads it, xa [M, r] when lora_B
trains, z when ia3_out trains (u, the pre-scale output, when DoRA's c trains); never W.  The frozen
weight gets no gradient (a QuantizedWeight is not a Parameter).  The op is once differentiable.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fastpeft.core import backends as _backends
from fastpeft.core import spec
from fastpeft.core.backends import reference as _ref
from fastpeft.core.backends.reference import wide
from fastpeft.core.dora import dora_scale
from fastpeft.core.validation import check_dora_args, check_peft_linear_args, check_scalars, check_tensor_types
from fastpeft.mask import draw_seed
from fastpeft.quant.dora import quant_dora_norm
from fastpeft.quant.linear import quant_linear, quant_linear_add_, quant_linear_grad_input
from fastpeft.quant.weight import QuantizedWeight
from fastpeft.reference import dropout_with_mask

_KERNEL_RANK = 64  # the C++ rank-r kernels' largest rank (csrc/lowrank.cpp kMaxKernelRank)
# The op's backend -> the quantized products' backend (fastpeft.quant.linear).
_PRODUCTS = {"cpp": "cpp", "triton": "triton", "reference": "torch"}
_GRAD_ARG = spec.GRAD_ARG
_N = spec.N_ARGS


def _cpp(products: str, x: Tensor, r: int):
    """torch.ops.fastpeft_cpp when its rank-r / sparse kernels serve this call, else None."""
    if products == "cpp" and x.is_cpu and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        ops = getattr(torch.ops, "fastpeft_cpp", None)
        if ops is not None and hasattr(ops, "lowrank_forward") and r <= _KERNEL_RANK:
            return ops
    return None


def _dropped(ops, t: Tensor, p: float, seed: int) -> Tensor:
    if p == 0.0:
        return t
    return ops.dropout(t, p, seed) if ops is not None else dropout_with_mask(t, p, seed)


def _sparse_add_(out: Tensor, t: Tensor, a, forward: bool, products: str) -> Tensor:
    """out += t Sᵀ (``forward``: t = h [M, K]) or t S (t = gz [M, N]), S the sparse delta."""
    n, k = a.weight.shape
    ops = _cpp(products, t, 0)
    if ops is not None:
        term = (ops.sparse_matmul(t, a.sparse_index, a.sparse_value, n) if forward
                else ops.sparse_matmul_t(t, a.sparse_index, a.sparse_value, k))
    else:
        term = (_ref.sparse_matmul if forward else _ref.sparse_matmul_t)(t, a.sparse_index, a.sparse_value, n, k)
    return out.add_(term)


def _sddmm(gz: Tensor, h: Tensor, a, products: str) -> Tensor:
    ops = _cpp(products, gz, 0)
    if ops is not None:
        g = ops.sddmm(gz.contiguous(), h.contiguous(), a.sparse_index)
    else:
        g = _ref.sddmm(gz, h, a.sparse_index, a.weight.shape[1])
    return g.to(a.sparse_value.dtype)


def _colsum(g: Tensor, other=None) -> Tensor:
    """Σ over rows of g (⊙ other), in accumulation precision: the bias / IA3 / DoRA gradients."""
    return (wide(g) * wide(other)).sum(0) if other is not None else wide(g).sum(0)


def _forward(a, needs, products: str):
    """(y, xa, z): the output, x̃Aᵀ (or None), and z (pre-ia3_out) or u (pre-DoRA-scale) (or None)."""
    dt = a.x.dtype
    x, qw, bias, scale, p, seed = a.x, a.weight, a.bias, a.lora_scale, a.p, a.seed
    scaled = a.dora_scale is not None  # DoRA: the bias joins after the scale
    h = x * a.ia3_in.to(dt) if a.ia3_in is not None else x
    has_lora = a.lora_A is not None
    ops = _cpp(products, x, a.lora_A.shape[0]) if has_lora else None
    lin_bias = bias.to(dt) if bias is not None and not scaled else None
    xa = z = None
    if has_lora and a.ia3_out is None:
        la, lb = a.lora_A.to(dt).contiguous(), a.lora_B.to(dt).contiguous()
        if ops is not None:  # y = bias + s·drop(x)AᵀBᵀ in one pass over x
            y, xa = ops.lowrank_forward(x, la, lb, lin_bias, scale, p, seed)
        else:
            xa = _dropped(None, x, p, seed) @ la.t()
            y = torch.addmm(lin_bias, xa, lb.t(), alpha=scale) if lin_bias is not None else scale * (xa @ lb.t())
        quant_linear_add_(y, h, qw, forward=True, backend=products)  # the frozen product accumulates onto it
        if a.sparse_value is not None:
            _sparse_add_(y, h, a, True, products)
    else:
        z = quant_linear(h, qw, backend=products)
        if a.sparse_value is not None:
            _sparse_add_(z, h, a, True, products)
        if lin_bias is not None:
            z += lin_bias
        y = z * a.ia3_out.to(dt) if a.ia3_out is not None else z
        if has_lora:  # here ia3_out is set (DoRA takes the branch above): y is a fresh tensor
            xa = _dropped(ops, x, p, seed) @ a.lora_A.to(dt).t()
            y.addmm_(xa, a.lora_B.to(dt).t(), alpha=scale)
        z = z if needs.ia3_out else None
    if scaled:
        c = a.dora_scale.to(dt)
        if needs.dora_scale:  # u, the output before the scale: dc reads it
            z = y
            y = torch.addcmul(bias.to(dt), y, c) if bias is not None else y * c
        else:
            y.mul_(c)
            if bias is not None:
                y += bias.to(dt)
    return y, xa, z


def _backward(gy: Tensor, a, xa, z, needs, products: str) -> spec.Grads:
    """The gradients (spec.Grads) of the quantized op, as the reference backend's backward."""
    dt = gy.dtype
    x, qw, s, p, seed = a.x, a.weight, a.lora_scale, a.p, a.seed
    g = dict.fromkeys(spec.GRAD_NAMES)
    if a.dora_scale is not None:  # y = c ⊙ u + bias: dc = Σ gy ⊙ u, d bias = Σ gy; the rest reads c ⊙ gy
        if needs.dora_scale:
            g["dora_scale"] = _colsum(gy, z).to(a.dora_scale.dtype)
        if needs.bias:
            g["bias"] = _colsum(gy).to(a.bias.dtype)
        gy = gy * a.dora_scale.to(dt)
        needs = needs._replace(bias=False)
    gz = gy * a.ia3_out.to(dt) if a.ia3_out is not None else gy
    if needs.ia3_out:
        g["ia3_out"] = _colsum(gy, z).to(a.ia3_out.dtype)
    if needs.bias:
        g["bias"] = _colsum(gz).to(a.bias.dtype)
    if needs.sparse_value:
        h = x * a.ia3_in.to(dt) if a.ia3_in is not None else x
        g["sparse_value"] = _sddmm(gz, h, a, products)
    lora_dx = None
    if a.lora_A is not None and (needs.x or needs.lora_A or needs.lora_B):
        ops = _cpp(products, gy, a.lora_A.shape[0])
        la, lb = a.lora_A.to(dt), a.lora_B.to(dt).contiguous()
        if ops is not None:  # one pass over gy (and x) for gy B, dB and dA
            gyb, gbb, ga = ops.lowrank_backward(gy, lb, xa if needs.lora_B else None, x if needs.lora_A else None,
                                                s, p, seed)
            gyb = gyb.to(dt)
        else:
            gyb = gy @ lb
            gbb = s * (gy.t() @ xa) if needs.lora_B else None
            ga = s * (gyb.t() @ _dropped(None, x, p, seed)) if needs.lora_A else None
        if needs.x:
            lora_dx = _dropped(ops, gyb @ la, p, seed).mul_(s)
        g["lora_A"] = ga.to(a.lora_A.dtype) if needs.lora_A else None
        g["lora_B"] = gbb.to(a.lora_B.dtype) if needs.lora_B else None
    if needs.x or needs.ia3_in:
        if lora_dx is not None and a.ia3_in is None:
            dh = quant_linear_add_(lora_dx.contiguous(), gz, qw, forward=False, backend=products)  # dX += gz W
        else:
            dh = quant_linear_grad_input(gz, qw, backend=products)
        if a.sparse_value is not None:
            _sparse_add_(dh, gz, a, False, products)
        if needs.ia3_in:
            g["ia3_in"] = _colsum(dh, x).to(a.ia3_in.dtype)
        if needs.x:
            gx = dh * a.ia3_in.to(dt) if a.ia3_in is not None else dh
            g["x"] = gx + lora_dx if lora_dx is not None and a.ia3_in is not None else gx
    return spec.Grads(**g)


class _QuantPeftLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, products, *args):
        a = spec.OpArgs(*args)
        needs = spec.Needs(*(bool(ctx.needs_input_grad[1 + i]) for i in _GRAD_ARG))
        y, xa, z = _forward(a, needs, products)
        keep = spec.saved_for_backward(needs)
        ctx.save_for_backward(a.x if keep.x else None, a.bias, a.lora_A, a.lora_B, a.ia3_in, a.ia3_out,
                              a.sparse_index, a.sparse_value, a.dora_scale, xa if keep.xa else None,
                              z if keep.z else None)
        ctx.qw, ctx.scalars, ctx.products, ctx.needs = a.weight, args[spec.N_TENSORS:], products, needs
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, c, xa, z = ctx.saved_tensors
        a = spec.OpArgs(x, ctx.qw, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, c, *ctx.scalars)
        grads = _backward(gy.contiguous(), a, xa, z, ctx.needs, ctx.products)
        out = [None] * (1 + _N)
        for name, i in zip(spec.GRAD_NAMES, _GRAD_ARG):
            out[1 + i] = grads._asdict()[name]
        return tuple(out)


def _check(x, qw: QuantizedWeight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value,
           dora_magnitude) -> None:
    """The op's checks for a quantized weight (same messages as fastpeft.core.validation)."""
    if x.dtype != qw.dtype:
        raise TypeError(f"weight dtype {qw.dtype} must match x dtype {x.dtype} (the QuantizedWeight dequantizes "
                        f"to {qw.dtype})")
    if x.device != qw.device:
        raise ValueError(f"weight is on {qw.device} but x is on {x.device}; move it to {x.device}")
    # The remaining checks read only shapes, dtypes and devices (and the sparse index's values):
    # run them against a weight-shaped view.
    stand_in = torch.empty((), dtype=x.dtype, device=x.device).expand(*qw.shape)
    check_peft_linear_args(x, stand_in, bias, lora_A, lora_B, 1.0, 0.0, ia3_in, ia3_out, sparse_index, sparse_value)
    if dora_magnitude is not None:
        check_dora_args(qw, lora_A, lora_B, dora_magnitude, ia3_in, ia3_out, sparse_value, x.dtype, x.device)


def quant_peft_linear(x: Tensor, weight: QuantizedWeight, bias=None, *, lora_A=None, lora_B=None, lora_scale=1.0,
                      lora_dropout=0.0, dropout_seed=None, ia3_in=None, ia3_out=None, sparse_index=None,
                      sparse_value=None, dora_magnitude=None, backend=None) -> Tensor:
    """``fastpeft.peft_linear`` with a QuantizedWeight ``weight`` (see the module docstring)."""
    scale, p, seed = check_scalars(lora_scale, lora_dropout, dropout_seed)
    check_tensor_types(x=x, bias=bias, lora_A=lora_A, lora_B=lora_B, ia3_in=ia3_in, ia3_out=ia3_out,
                       sparse_index=sparse_index, sparse_value=sparse_value, dora_magnitude=dora_magnitude)
    _check(x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, dora_magnitude)
    products = _PRODUCTS[_backends.resolve(backend, x.device, x.dtype).name]
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), k).contiguous()
    if lora_A is None or p == 0.0:
        p, seed = 0.0, 0
    elif seed is None:
        seed = draw_seed()  # after every check: a rejected call draws nothing
    c = None
    if dora_magnitude is not None:
        c = dora_scale(dora_magnitude, quant_dora_norm(weight, lora_A, lora_B, scale, products))
    args = spec.OpArgs(x2, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, c, scale, p,
                       seed)
    y = _QuantPeftLinear.apply(products, *args)
    return y.reshape(*lead, n)
