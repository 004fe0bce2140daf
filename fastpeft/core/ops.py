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
ia3_out trains (the pre-scale output u when DoRA's dora_scale trains), and never a dropout mask (the
seed is a 0-d tensor; backends regenerate the mask): fastpeft.core.spec.saved_for_backward.

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
from fastpeft.core import dora as _dora
from fastpeft.core import spec
from fastpeft.core import validation as _validation
from fastpeft.core.validation import (
    FORWARD_AD_UNSUPPORTED,
    ONCE_DIFFERENTIABLE,
    check_dora_args,
    check_peft_linear_args,
    check_scalars,
    check_seed,
    check_tensor_types,
    with_lora_bias,
)
from fastpeft.mask import draw_seed
from fastpeft.quant.op import quant_peft_linear
from fastpeft.quant.weight import QuantizedWeight

# What the eager C++ route takes as it is: other scalar types (numpy, tensor seeds) are converted
# and checked first by check_scalars.
_NUMBERS = (float, int)
_CPP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# True while torch.compile traces (then the custom-op route).  Tests make it return True to take that
# route eagerly; patching torch.compiler.is_compiling itself would confuse dynamo if it loads meanwhile.
_tracing = torch.compiler.is_compiling


def _op_seed(p: float, seed: Optional[Tensor]) -> int:
    # A given seed's value is checked here too: while torch.compile traces, a tensor seed is not read.
    s = check_seed(int(seed)) if seed is not None else None
    if p == 0.0:
        return 0 if s is None else s
    return draw_seed() if s is None else s


# The custom ops take spec.schema("custom_forward") / ("custom_backward") positionally: the tensors
# and scalars of an OpArgs (the seed a 0-d tensor or None), then the op's own extras.
_N = spec.N_ARGS
_OpArgs = spec.OpArgs._make
_Needs = spec.Needs._make
_GRAD_POS = spec.GRAD_ARG
_X = spec.TENSOR_NAMES.index("x")
# The gradient tuple autograd wants: one entry per forward input (None for sparse_index, the scalars,
# save_z and backend), else the index of that tensor's gradient.
_INPUT_GRAD = spec.GRAD_INDEX + (None,) * (_N - spec.N_TENSORS + 2)
_NO_GRADS = (None,) * len(_INPUT_GRAD)


def _fwd(*inputs):
    a = _OpArgs(inputs[:_N])
    save_z, backend = inputs[_N:]
    impl = _backends.resolve(backend, a.x.device, a.x.dtype)
    if a.sparse_index is not None:
        n, k = a.weight.shape
        if not _validation.is_validated(a.sparse_index, n, k):
            _validation.check_sparse_values(a.sparse_index, n, k)
    s = _op_seed(a.p, a.seed)  # after every check: a rejected call draws nothing
    y, xa, z = impl.forward(a._replace(seed=s), save_z)
    return y, xa, z, torch.tensor(s, dtype=torch.int64)


def _fwd_fake(*inputs):
    a = _OpArgs(inputs[:_N])
    m, n = a.x.shape[0], a.weight.shape[0]
    y = a.x.new_empty(m, n)
    xa = a.x.new_empty(m, a.lora_A.shape[0]) if a.lora_A is not None else a.x.new_empty(0)
    z = a.x.new_empty(m, n) if inputs[_N] else a.x.new_empty(0)
    return y, xa, z, torch.empty((), dtype=torch.int64)


def _bwd(grad_y, *inputs):
    # inputs: the tensors, the saved outputs (xa, z), the scalars (seed a tensor), needs, backend
    t, n_saved = spec.N_TENSORS, len(spec.SAVED_OUTPUTS)
    xa, z = inputs[t:t + n_saved]
    a = _OpArgs(inputs[:t] + inputs[t + n_saved:t + n_saved + len(spec.SCALARS)])
    needs, backend = inputs[-2:]
    impl = _backends.resolve(backend, grad_y.device, grad_y.dtype)
    grads = impl.backward(grad_y, a._replace(seed=int(a.seed)), xa, z, _Needs(bool(n) for n in needs))
    return [g if g is not None else grad_y.new_empty(0) for g in grads]


def _bwd_fake(grad_y, *inputs):
    needs = inputs[-2]
    m, k = grad_y.shape[0], inputs[spec.TENSOR_NAMES.index("weight")].shape[1]
    return [grad_y.new_empty(0) if not need else grad_y.new_empty(m, k) if i == _X else torch.empty_like(inputs[i])
            for i, need in zip(_GRAD_POS, needs)]


_peft_linear_fwd = torch.library.custom_op("fastpeft::peft_linear_fwd", _fwd, mutates_args=(),
                                           schema=spec.schema("custom_forward"))
_peft_linear_fwd.register_fake(_fwd_fake)
_peft_linear_bwd = torch.library.custom_op("fastpeft::peft_linear_bwd", _bwd, mutates_args=(),
                                           schema=spec.schema("custom_backward"))
_peft_linear_bwd.register_fake(_bwd_fake)


def _second_order(ctx, *grads):
    raise RuntimeError(ONCE_DIFFERENTIABLE)


# The backward op is not differentiable: a double backward reaches this and says so (instead of
# torch's "no autograd formula was registered"), as the C++ op's backward does.
_peft_linear_bwd.register_autograd(_second_order, setup_context=lambda ctx, inputs, output: None)


def _setup_context(ctx, inputs, output):
    a = _OpArgs(inputs[:_N])
    _, xa, z, seed = output
    needs = _Needs(inputs[i] is not None and inputs[i].requires_grad for i in _GRAD_POS)
    keep = spec.saved_for_backward(needs)  # only what some gradient reads; parameters are not copied
    tensors = list(inputs[:spec.N_TENSORS])
    if not keep.x:
        tensors[_X] = None
    ctx.save_for_backward(*tensors, xa if keep.xa else None, z if keep.z else None, seed)
    ctx.needs = needs
    ctx.lora_scale, ctx.p, ctx.backend = a.lora_scale, a.p, inputs[-1]
    ctx.mark_non_differentiable(xa, z, seed)


def _backward(ctx, grad_y, grad_xa, grad_z, grad_seed):
    needs = ctx.needs
    if not any(needs):
        return _NO_GRADS
    saved = ctx.saved_tensors
    grads = _peft_linear_bwd(grad_y.contiguous(), *saved[:-1], ctx.lora_scale, ctx.p, saved[-1], list(needs),
                             ctx.backend)
    return tuple(None if g is None or not needs[g] else grads[g] for g in _INPUT_GRAD)


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


def _autocast(device_type: str, a):
    dt = torch.get_autocast_dtype(device_type)
    return _OpArgs(_autocast_cast(t, device_type, dt) if isinstance(t, Tensor) else t for t in a)


def _check_no_tangent(tensors) -> None:
    if _fwAD._current_level >= 0:  # inside a forward-AD dual level (torch.func.jvp opens one too)
        for t in tensors:
            if t is not None and _fwAD.unpack_dual(t).tangent is not None:
                raise NotImplementedError(FORWARD_AD_UNSUPPORTED)


def peft_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, lora_A: Optional[Tensor] = None,
                lora_B: Optional[Tensor] = None, lora_scale: float = 1.0, lora_dropout: float = 0.0,
                dropout_seed=None, ia3_in: Optional[Tensor] = None, ia3_out: Optional[Tensor] = None,
                sparse_index: Optional[Tensor] = None, sparse_value: Optional[Tensor] = None,
                dora_magnitude: Optional[Tensor] = None, lora_bias: Optional[Tensor] = None,
                backend: Optional[str] = None) -> Tensor:
    """Fused PEFT linear layer (DESIGN.md section 1)::

        h = x * ia3_in;  z = h (W + S)^T + bias;  z = z * ia3_out
        y = z + lora_scale * (dropout(x) lora_A^T) lora_B^T

    Args:
        x: [..., K] input (any leading dims, any strides), float32/bfloat16/float16/float64.
        weight: [N, K] frozen weight, same dtype as x; or a ``fastpeft.QuantizedWeight`` (NF4 / int8,
            dequantized panel by panel inside the products, never densely; fastpeft.quant.op).
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
        dora_magnitude: optional [N] DoRA magnitude m (needs lora_A / lora_B; not with IA3 or a
            sparse delta): y = c ⊙ (x Wᵀ + s·(x̃ Aᵀ) Bᵀ) + bias with c = m / ‖W + s·B·A‖_row, the norm
            detached and computed without forming B·A (fastpeft.core.dora); rows whose adapted weight
            is all zero get c = 0 (output = bias) instead of peft's NaN.
        lora_bias: optional [N] bias of lora_B (peft's ``lora_bias=True``; needs lora_A / lora_B):
            y += lora_scale · lora_bias.  It is folded into ``bias`` (one [N] add) before the op
            runs, so every route and backend computes it (fastpeft.core.validation.with_lora_bias).
        backend: "reference", "cpp", "triton", or None/"auto" (see fastpeft.set_backend).

    Adapter tensors may be float32 while x is bfloat16/float16; their gradients come back in
    their own dtype.  The output has x's dtype (under torch.autocast: the autocast dtype, as
    F.linear) and shape [..., N].  Bad arguments raise TypeError/ValueError naming the argument
    before any work is done or any seed drawn.  NaN propagates as in plain PyTorch.
    """
    if lora_bias is not None:  # a bias term: folded into the op's bias (checked first)
        bias = with_lora_bias(x, weight, bias, lora_A, lora_B, lora_scale, lora_dropout, dropout_seed, lora_bias,
                              read_values=not _tracing())
    if type(weight) is QuantizedWeight:
        return quant_peft_linear(x, weight, bias, lora_A=lora_A, lora_B=lora_B, lora_scale=lora_scale,
                                 lora_dropout=lora_dropout, dropout_seed=dropout_seed, ia3_in=ia3_in, ia3_out=ia3_out,
                                 sparse_index=sparse_index, sparse_value=sparse_value, dora_magnitude=dora_magnitude,
                                 backend=backend)
    op = None
    if dora_magnitude is None and type(x) is Tensor and x.is_cpu and x.dtype in _CPP_DTYPES \
            and (backend is None or backend == "cpp" or backend == "auto") and not _tracing():
        op = _backends.eager_cpu_op(backend)
        # Eager CPU route: one C++ op does the checks, reshape, seed draw and autograd (saving exactly
        # what _setup_context saves).  Any Python here is paid on every layer call, and after a large
        # GEMM has flushed the caches it costs ~10x its warm time, so the common call (tensors,
        # Python numbers, no seed) goes straight in; other scalar forms are converted (and checked)
        # first, below.
        if op is not None and type(lora_scale) in _NUMBERS and type(lora_dropout) in _NUMBERS \
                and dropout_seed is None and isinstance(weight, Tensor) \
                and (bias is None or isinstance(bias, Tensor)) and (lora_A is None or isinstance(lora_A, Tensor)) \
                and (lora_B is None or isinstance(lora_B, Tensor)) and (ia3_in is None or isinstance(ia3_in, Tensor)) \
                and (ia3_out is None or isinstance(ia3_out, Tensor)) \
                and (sparse_index is None or isinstance(sparse_index, Tensor)) \
                and (sparse_value is None or isinstance(sparse_value, Tensor)):
            return op(x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, None,
                      lora_scale, lora_dropout, dropout_seed)
    a = spec.OpArgs(x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, None, lora_scale,
                    lora_dropout, dropout_seed)
    if dora_magnitude is not None:
        return _dora_route(a, dora_magnitude, backend)
    if op is not None:
        return op(*_checked_scalars(a, True))
    return _custom_op_route(a, backend)


def _checked_scalars(a, read_values: bool):
    """Step 1 of the checks (the scalars, converted to Python numbers / a checked seed) and the
    tensors' types: ``a`` with its scalars replaced."""
    scale, p, seed = check_scalars(a.lora_scale, a.p, a.seed, read_values=read_values)
    check_tensor_types(**dict(zip(spec.TENSOR_NAMES, a)))
    return a._replace(lora_scale=scale, p=p, seed=seed)


def _check_tensors(a) -> None:
    """Step 2: the tensors' dtypes, shapes and devices (the forward op reads the index's values)."""
    check_peft_linear_args(a.x, a.weight, a.bias, a.lora_A, a.lora_B, a.lora_scale, a.p, a.ia3_in, a.ia3_out,
                           a.sparse_index, a.sparse_value, check_values=False)


def _dora_route(a, dora_magnitude, backend):
    """DoRA: every argument checked first, then the row norm, then the fused op with its output
    scale c = m / n (the op argument dora_scale; fastpeft.core.dora.dora_linear)."""
    a = _checked_scalars(a, not _tracing())
    _check_tensors(a)
    check_dora_args(a.weight, a.lora_A, a.lora_B, dora_magnitude, a.ia3_in, a.ia3_out, a.sparse_value, a.x.dtype,
                    a.x.device)
    return _dora.dora_linear(lambda c: _route(a._replace(dora_scale=c), backend), a.weight, a.lora_A, a.lora_B,
                             a.lora_scale, dora_magnitude)


def _route(a, backend):
    """The op on checked arguments: the eager C++ op for eager CPU tensors, else the custom ops."""
    x = a.x
    if type(x) is Tensor and x.is_cpu and x.dtype in _CPP_DTYPES and not _tracing() \
            and (backend is None or backend == "cpp" or backend == "auto"):
        op = _backends.eager_cpu_op(backend)
        if op is not None:
            return op(*a)
    return _custom_op_route(a, backend)


def _custom_op_route(a, backend):
    tracing = _tracing()
    a = _checked_scalars(a, not tracing)
    x = a.x
    if torch.is_autocast_enabled(x.device.type):
        a = _autocast(x.device.type, a)
        x = a.x
    _check_tensors(a)
    _check_no_tangent(a[:spec.N_TENSORS])  # after the static checks and before the data checks, as the C++ op
    if a.lora_A is None:
        a = a._replace(p=0.0)
    if tracing:
        # Resolved inside the op at run time: resolving may build the C++ extension, which
        # torch.compile must not trace.
        backend_name = backend or "auto"
    else:
        backend_name = _backends.resolve(backend, x.device, x.dtype).name
    n, k = a.weight.shape
    lead = x.shape[:-1]
    x2d = x.reshape(math.prod(lead), k).contiguous()  # explicit M: reshape(-1, 0) is ambiguous
    save_z = spec.saved_for_backward(_Needs(
        t is not None and t.requires_grad for t in (a[i] for i in _GRAD_POS))).z and torch.is_grad_enabled()
    seed = a.seed
    seed_t = torch.tensor(seed, dtype=torch.int64) if isinstance(seed, int) else seed
    y = _peft_linear_fwd(*a._replace(x=x2d, seed=seed_t), save_z, backend_name)[0]
    return y.reshape(*lead, n)


available_backends = _backends.available_backends
set_backend = _backends.set_backend
