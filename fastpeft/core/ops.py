"""The public fused op: validation, backend dispatch and torch.library registration.

Two custom ops carry every backend: ``fastpeft::peft_linear_fwd`` and ``fastpeft::peft_linear_bwd``.
They are opaque to torch.compile (fake implementations give the shapes), and autograd is
registered on the forward op, so a module using them compiles with ``fullgraph=True``.
What is saved for backward is decided here, once for all backends: x only when a gradient
needs it, the r-wide x~A^T only when lora_B trains, the pre-IA3 output only when ia3_out trains,
and never a dropout mask (the dropout seed is a 0-d tensor; backends regenerate the mask).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastpeft.core import backends as _backends
from fastpeft.mask import check_seed, draw_seed
from fastpeft.core.validation import check_peft_linear_args

# Arguments the eager C++ fast path takes as they are (bool, tensors and numpy scalars go the full path).
_NUMBERS = (float, int)
_CPP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_GRAD_ARGS = ("x", "weight", "bias", "lora_A", "lora_B", "ia3_in", "ia3_out", "sparse_value")


@torch.library.custom_op("fastpeft::peft_linear_fwd", mutates_args=())
def _peft_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Optional[Tensor],
                     lora_B: Optional[Tensor], ia3_in: Optional[Tensor], ia3_out: Optional[Tensor],
                     sparse_index: Optional[Tensor], sparse_value: Optional[Tensor], lora_scale: float,
                     p: float, seed: Tensor, save_z: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    impl = _backends.resolve(backend, x.device, x.dtype)
    return impl.forward(x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value,
                        lora_scale, p, int(seed), save_z)


@_peft_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, lora_scale, p, seed,
      save_z, backend):
    m, n = x.shape[0], weight.shape[0]
    y = x.new_empty(m, n)
    xa = x.new_empty(m, lora_A.shape[0]) if lora_A is not None else x.new_empty(0)
    z = x.new_empty(m, n) if save_z else x.new_empty(0)
    return y, xa, z


@torch.library.custom_op("fastpeft::peft_linear_bwd", mutates_args=())
def _peft_linear_bwd(grad_y: Tensor, x: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                     lora_A: Optional[Tensor], lora_B: Optional[Tensor], ia3_in: Optional[Tensor],
                     ia3_out: Optional[Tensor], sparse_index: Optional[Tensor],
                     sparse_value: Optional[Tensor], xa: Optional[Tensor], z: Optional[Tensor],
                     lora_scale: float, p: float, seed: Tensor, needs: list[bool], backend: str) -> list[Tensor]:
    impl = _backends.resolve(backend, grad_y.device, grad_y.dtype)
    grads = impl.backward(grad_y, x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index,
                          sparse_value, xa, z, lora_scale, p, int(seed), needs)
    return [g if g is not None else grad_y.new_empty(0) for g in grads]


def _like_for_fake(grad_y, m, k, args, needs):
    out = []
    for name, arg, need in zip(_GRAD_ARGS, args, needs):
        if not need:
            out.append(grad_y.new_empty(0))
        elif name == "x":
            out.append(grad_y.new_empty(m, k))
        else:
            out.append(torch.empty_like(arg))
    return out


@_peft_linear_bwd.register_fake
def _(grad_y, x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, xa, z,
      lora_scale, p, seed, needs, backend):
    args = (x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_value)
    return _like_for_fake(grad_y, grad_y.shape[0], weight.shape[1], args, needs)


def _setup_context(ctx, inputs, output):
    (x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, lora_scale, p, seed,
     save_z, backend) = inputs
    _, xa, z = output
    grad_args = (x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_value)
    needs = [t is not None and t.requires_grad for t in grad_args]
    need_x, need_w, _, need_a, need_bb, need_in, need_out, need_val = needs
    # Save only what some gradient reads; the weight and adapters are parameters (no copy).
    keep_x = need_w or need_a or need_in or need_val
    ctx.save_for_backward(x if keep_x else None, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index,
                          sparse_value, xa if need_bb else None, z if need_out else None, seed)
    ctx.needs = needs
    ctx.m = x.shape[0]
    ctx.lora_scale, ctx.p, ctx.backend = lora_scale, p, backend
    ctx.mark_non_differentiable(xa, z)


def _backward(ctx, grad_y, grad_xa, grad_z):
    x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, xa, z, seed = ctx.saved_tensors
    needs = list(ctx.needs)
    if not any(needs):
        return (None,) * 14
    grad_y = grad_y.contiguous()
    grads = _peft_linear_bwd(grad_y, x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index,
                             sparse_value, xa, z, ctx.lora_scale, ctx.p, seed, needs, ctx.backend)
    gx, gw, gb, ga, gbb, gin, gout, gval = [g if need else None for g, need in zip(grads, needs)]
    return gx, gw, gb, ga, gbb, gin, gout, None, gval, None, None, None, None, None


_peft_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def _seed_tensor(lora_dropout: float, dropout_seed) -> Tensor:
    if lora_dropout == 0.0:
        return torch.zeros((), dtype=torch.int64)
    if dropout_seed is None:
        # A tensor, not an int, so torch.compile traces the draw instead of breaking the graph.
        return torch.randint(0, 2**62, (), dtype=torch.int64)
    if isinstance(dropout_seed, Tensor):
        return dropout_seed.to(torch.int64).reshape(())
    return torch.tensor(check_seed(dropout_seed), dtype=torch.int64)


def peft_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, lora_A: Optional[Tensor] = None,
                lora_B: Optional[Tensor] = None, lora_scale: float = 1.0, lora_dropout: float = 0.0,
                dropout_seed=None, ia3_in: Optional[Tensor] = None, ia3_out: Optional[Tensor] = None,
                sparse_index: Optional[Tensor] = None, sparse_value: Optional[Tensor] = None,
                backend: Optional[str] = None) -> Tensor:
    """Fused PEFT linear layer (DESIGN.md section 1)::

        h = x * ia3_in;  z = h (W + S)^T + bias;  z = z * ia3_out
        y = z + lora_scale * (dropout(x) lora_A^T) lora_B^T

    Args:
        x: [..., K] input (any leading dims, any strides), float32/bfloat16/float16/float64.
        weight: [N, K] frozen weight, same dtype as x.
        bias: optional [N] (trainable for BitFit).
        lora_A, lora_B: optional [r, K] and [N, r] low-rank factors (peft's layout).
        lora_scale: scale of the LoRA branch (alpha / r, or alpha / sqrt(r) with rsLoRA).
        lora_dropout: dropout probability p in [0, 1) on the LoRA branch's input.
        dropout_seed: int seed of the counter-based mask (see fastpeft.mask); None draws one
            from torch's default generator.
        ia3_in, ia3_out: optional [K] / [N] IA3 scale vectors.
        sparse_index, sparse_value: optional sparse delta S: int64 [nnz] sorted unique flat
            indices into W and their [nnz] values.
        backend: "reference", "cpp", "triton", or None/"auto" (see fastpeft.set_backend).

    Adapter tensors may be float32 while x is bfloat16/float16; their gradients come back in
    their own dtype.  The output has x's dtype and shape [..., N].
    """
    if (backend is None or backend == "cpp" or backend == "auto") and type(x) is Tensor and x.is_cpu \
            and x.dtype in _CPP_DTYPES and type(lora_scale) in _NUMBERS and type(lora_dropout) in _NUMBERS \
            and (dropout_seed is None or type(dropout_seed) is int) and not torch.compiler.is_compiling():
        # Eager CPU fast path: one C++ op does the reshape, validation, seed draw and autograd
        # (saving exactly what _setup_context saves).  Any Python here is paid on every layer call,
        # and after a large GEMM has flushed the caches it costs ~10x its warm time (~0.2 ms a call
        # for the full path below).  If the op rejects the call, the full path runs and raises
        # the Python error that names the argument.
        op = _backends.eager_cpu_op(backend)
        if op is not None:
            try:
                return op(x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value,
                          lora_scale, lora_dropout, dropout_seed)
            except (RuntimeError, TypeError, ValueError):
                pass
    tracing = torch.compiler.is_compiling()
    check_peft_linear_args(x, weight, bias, lora_A, lora_B, lora_scale, lora_dropout, ia3_in, ia3_out,
                           sparse_index, sparse_value, check_values=not tracing)
    if lora_A is None:
        lora_dropout = 0.0
    p = float(lora_dropout)
    if tracing:
        # Resolved inside the op at run time: resolving may build the C++ extension, which
        # torch.compile must not trace.
        backend_name = backend or "auto"
    else:
        backend_name = _backends.resolve(backend, x.device, x.dtype).name
    n, k = weight.shape
    lead = x.shape[:-1]
    x2d = x.reshape(math.prod(lead), k).contiguous()  # explicit M: reshape(-1, 0) is ambiguous
    save_z = ia3_out is not None and ia3_out.requires_grad and torch.is_grad_enabled()
    seed = _seed_tensor(p, dropout_seed)
    if backend_name == "cpp" and not tracing:
        # Validated arguments the fast path above does not take as they are (a tensor seed, numpy
        # scalars): the same C++ op, which skips the Python custom-op dispatch (~0.3 ms a step).
        from fastpeft.core.backends import cpp as _cpp

        return _cpp.peft_linear(x2d, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value,
                                float(lora_scale), p, int(seed)).reshape(*lead, n)
    y, _, _ = _peft_linear_fwd(x2d, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value,
                               float(lora_scale), p, seed, save_z, backend_name)
    return y.reshape(*lead, n)


available_backends = _backends.available_backends
set_backend = _backends.set_backend
