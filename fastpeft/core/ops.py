"""The public fused op: validation, backend dispatch and torch.library registration.

One route per call, chosen up front and never retried:
- eager CPU tensors on the C++ backend (the default on CPU): straight into the C++ op
  ``fastpeft_cpp::peft_linear`` (csrc/autograd.cpp), which checks every argument itself (with the
  messages of fastpeft.core.validation), draws the dropout seed, and has its autograd in C++;
- everything else (the reference and Triton backends, torch.compile on any backend): the Python
  custom ops ``fastpeft::peft_linear_fwd`` / ``fastpeft::peft_linear_bwd`` below.  They are opaque
  to torch.compile (fake implementations give the shapes) and autograd is registered on the
  forward op, so a module using them compiles with ``fullgraph=True``.

Every argument is checked before any work: the scalars and tensor types here, shapes and dtypes in
``check_peft_linear_args``, and what reads data (the sparse index's values, a traced tensor seed's
value) inside the forward op just before it draws the seed and calls the backend, so it also holds
under torch.compile.  What is saved for backward is decided here, once for all backends: x only
when a gradient needs it, the r-wide x~A^T only when lora_B trains, the pre-IA3 output only when
ia3_out trains, and never a dropout mask (the seed is a 0-d tensor; backends regenerate the mask).

The op follows torch.autocast as F.linear does (floating tensors other than float64 are cast to
the autocast dtype; the C++ op registers the same rule for AutocastCPU).  It is once
differentiable (a second backward raises ``ONCE_DIFFERENTIABLE``) and supports no forward-mode AD
(``FORWARD_AD_UNSUPPORTED``); fastpeft.reference.peft_linear is the plain-PyTorch escape hatch.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.autograd.forward_ad as _fwAD
from torch import Tensor

from fastpeft.core import backends as _backends
from fastpeft.core import validation as _validation
from fastpeft.core.validation import (FORWARD_AD_UNSUPPORTED, ONCE_DIFFERENTIABLE, check_peft_linear_args,
                                      check_scalars, check_seed, check_tensor_types)
from fastpeft.mask import draw_seed

# What the eager C++ route takes as it is: other scalar types (numpy, tensor seeds) are converted
# and checked first by check_scalars.
_NUMBERS = (float, int)
_CPP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_GRAD_ARGS = ("x", "weight", "bias", "lora_A", "lora_B", "ia3_in", "ia3_out", "sparse_value")
# True while torch.compile traces (then the custom-op route).  Tests make it return True to take that
# route eagerly; patching torch.compiler.is_compiling itself would confuse dynamo if it loads meanwhile.
_tracing = torch.compiler.is_compiling


def _op_seed(p: float, seed: Optional[Tensor]) -> int:
    # A given seed's value is checked here too: while torch.compile traces, a tensor seed is not read.
    s = check_seed(int(seed)) if seed is not None else None
    if p == 0.0:
        return 0 if s is None else s
    return draw_seed() if s is None else s


@torch.library.custom_op("fastpeft::peft_linear_fwd", mutates_args=())
def _peft_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Optional[Tensor],
                     lora_B: Optional[Tensor], ia3_in: Optional[Tensor], ia3_out: Optional[Tensor],
                     sparse_index: Optional[Tensor], sparse_value: Optional[Tensor], lora_scale: float,
                     p: float, seed: Optional[Tensor], save_z: bool,
                     backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = _backends.resolve(backend, x.device, x.dtype)
    if sparse_index is not None:
        n, k = weight.shape
        if not _validation.is_validated(sparse_index, n, k):
            _validation.check_sparse_values(sparse_index, n, k)
    s = _op_seed(p, seed)  # after every check: a rejected call draws nothing
    y, xa, z = impl.forward(x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value,
                            lora_scale, p, s, save_z)
    return y, xa, z, torch.tensor(s, dtype=torch.int64)


@_peft_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, lora_scale, p, seed,
      save_z, backend):
    m, n = x.shape[0], weight.shape[0]
    y = x.new_empty(m, n)
    xa = x.new_empty(m, lora_A.shape[0]) if lora_A is not None else x.new_empty(0)
    z = x.new_empty(m, n) if save_z else x.new_empty(0)
    return y, xa, z, torch.empty((), dtype=torch.int64)


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


def _second_order(ctx, *grads):
    raise RuntimeError(ONCE_DIFFERENTIABLE)


# The backward op is not differentiable: a double backward reaches this and says so (instead of
# torch's "no autograd formula was registered"), as the C++ op's backward does.
_peft_linear_bwd.register_autograd(_second_order, setup_context=lambda ctx, inputs, output: None)


def _setup_context(ctx, inputs, output):
    (x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, lora_scale, p, _,
     save_z, backend) = inputs
    _, xa, z, seed = output
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
    ctx.mark_non_differentiable(xa, z, seed)


def _backward(ctx, grad_y, grad_xa, grad_z, grad_seed):
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


def _autocast_cast(t, device_type: str, dt):
    """F.linear's autocast rule: a floating tensor on the autocast device other than float64 -> dt."""
    if t is not None and t.is_floating_point() and t.dtype != torch.float64 and t.device.type == device_type:
        return t.to(dt)
    return t


# Autocast for the custom ops, as torch.library.register_autocast does but with the dtype of the
# autocast region (register_autocast fixes one): the forward casts its floating inputs, both ops run
# with autocast off (the backends compute in the dtypes they are given; a backward called inside an
# autocast region must not recast them).
_AUTOCAST_LIB = torch.library.Library("fastpeft", "IMPL")


def _register_autocast(device_type: str) -> None:
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    def forward(_, *args):
        dt = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return torch.ops.fastpeft.peft_linear_fwd.default(
                *[_autocast_cast(a, device_type, dt) if isinstance(a, Tensor) else a for a in args])

    def backward(_, *args):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return torch.ops.fastpeft.peft_linear_bwd.default(*args)

    _AUTOCAST_LIB.impl("peft_linear_fwd", forward, key.name, with_keyset=True)
    _AUTOCAST_LIB.impl("peft_linear_bwd", backward, key.name, with_keyset=True)


for _device_type in ("cpu", "cuda"):
    if torch._C._is_autocast_available(_device_type):
        _register_autocast(_device_type)


def _autocast(device_type: str, tensors: tuple) -> tuple:
    dt = torch.get_autocast_dtype(device_type)
    return tuple(_autocast_cast(t, device_type, dt) for t in tensors)


def _check_no_tangent(tensors) -> None:
    if _fwAD._current_level >= 0:  # inside a forward-AD dual level (torch.func.jvp opens one too)
        for t in tensors:
            if t is not None and _fwAD.unpack_dual(t).tangent is not None:
                raise NotImplementedError(FORWARD_AD_UNSUPPORTED)


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
        lora_dropout: dropout probability p in [0, 1) on the LoRA branch's input (a Python or
            numpy number).
        dropout_seed: seed of the counter-based mask (see fastpeft.mask): an int in [0, 2**63), a
            numpy integer or a one-element integer tensor; None draws one from torch's default
            generator (only when dropout is on).
        ia3_in, ia3_out: optional [K] / [N] IA3 scale vectors.
        sparse_index, sparse_value: optional sparse delta S: int64 [nnz] sorted unique flat
            indices into W and their [nnz] values.
        backend: "reference", "cpp", "triton", or None/"auto" (see fastpeft.set_backend).

    Adapter tensors may be float32 while x is bfloat16/float16; their gradients come back in
    their own dtype.  The output has x's dtype (under torch.autocast: the autocast dtype, as
    F.linear) and shape [..., N].  Bad arguments raise TypeError/ValueError naming the argument
    before any work is done or any seed drawn.  NaN propagates as in plain PyTorch.
    """
    if type(x) is Tensor and x.is_cpu and (backend is None or backend == "cpp" or backend == "auto") \
            and x.dtype in _CPP_DTYPES and not _tracing():
        op = _backends.eager_cpu_op(backend)
        if op is not None:
            # Eager CPU route: one C++ op does the checks, reshape, seed draw and autograd (saving
            # exactly what _setup_context saves).  Any Python here is paid on every layer call, and
            # after a large GEMM has flushed the caches it costs ~10x its warm time, so the common
            # call (tensors, Python numbers, no seed) goes straight in; other scalar forms are
            # converted (and checked) first.
            if not (type(lora_scale) in _NUMBERS and type(lora_dropout) in _NUMBERS and dropout_seed is None
                    and isinstance(weight, Tensor) and (bias is None or isinstance(bias, Tensor))
                    and (lora_A is None or isinstance(lora_A, Tensor))
                    and (lora_B is None or isinstance(lora_B, Tensor))
                    and (ia3_in is None or isinstance(ia3_in, Tensor))
                    and (ia3_out is None or isinstance(ia3_out, Tensor))
                    and (sparse_index is None or isinstance(sparse_index, Tensor))
                    and (sparse_value is None or isinstance(sparse_value, Tensor))):
                lora_scale, lora_dropout, dropout_seed = check_scalars(lora_scale, lora_dropout, dropout_seed)
                check_tensor_types(weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, ia3_in=ia3_in,
                                   ia3_out=ia3_out, sparse_index=sparse_index, sparse_value=sparse_value)
            return op(x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value,
                      lora_scale, lora_dropout, dropout_seed)
    return _custom_op_route(x, weight, bias, lora_A, lora_B, lora_scale, lora_dropout, dropout_seed, ia3_in,
                            ia3_out, sparse_index, sparse_value, backend)


def _custom_op_route(x, weight, bias, lora_A, lora_B, lora_scale, lora_dropout, dropout_seed, ia3_in, ia3_out,
                     sparse_index, sparse_value, backend):
    tracing = _tracing()
    scale, p, seed = check_scalars(lora_scale, lora_dropout, dropout_seed, read_values=not tracing)
    check_tensor_types(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, ia3_in=ia3_in,
                       ia3_out=ia3_out, sparse_index=sparse_index, sparse_value=sparse_value)
    tensors = (x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_value)
    if torch.is_autocast_enabled(x.device.type):
        x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_value = _autocast(x.device.type, tensors)
        tensors = (x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_value)
    check_peft_linear_args(x, weight, bias, lora_A, lora_B, scale, p, ia3_in, ia3_out, sparse_index, sparse_value,
                           check_values=False)  # the forward op reads the index's values when it runs
    _check_no_tangent(tensors)  # after the static checks and before the data checks, as the C++ op
    if lora_A is None:
        p = 0.0
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
    seed_t = torch.tensor(seed, dtype=torch.int64) if isinstance(seed, int) else seed
    y, _, _, _ = _peft_linear_fwd(x2d, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value,
                                  scale, p, seed_t, save_z, backend_name)
    return y.reshape(*lead, n)


available_backends = _backends.available_backends
set_backend = _backends.set_backend
