"""Argument checks for fastpeft.peft_linear: every message names the argument and what was expected.

One order on every route, so a call with several faults reports the same one everywhere:
    1. the scalars (``check_scalars``): lora_scale, lora_dropout, dropout_seed;
    2. the tensors' types, dtypes, shapes and devices (``check_peft_linear_args``);
    3. what reads data: the sparse index's values (``check_sparse_values``), and a tensor seed's value.
Nothing is computed and no seed is drawn before all three have passed.

csrc/checks.cpp makes the same checks, in the same order, with the same messages, for the eager
C++ route (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE raise Python's ValueError / TypeError);
tests/test_validation.py runs one table of bad input through every route and compares them.

A layer's fixed sparse index need not be re-read on every call: ``mark_validated`` checks it once
and records that; the Python routes then skip its value checks while the tensor is unmodified.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SEED_LIMIT = 2**63

ONCE_DIFFERENTIABLE = (
    "fastpeft.peft_linear is once differentiable: its backward is not itself differentiable, so a second "
    "backward through the gradients it computed (create_graph=True: gradient penalties, MAML, "
    "Hessian-vector products) is not supported; use fastpeft.reference.peft_linear for higher-order "
    "gradients")
FORWARD_AD_UNSUPPORTED = (
    "fastpeft.peft_linear does not support forward-mode AD (torch.func.jvp, torch.autograd.forward_ad dual "
    "tensors): the tangent would be lost; use fastpeft.reference.peft_linear, which plain PyTorch "
    "differentiates in both modes")


def check_positive_int(name: str, value) -> int:
    """``value`` if it is an int >= 1 (bools excluded), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# ---- 1. scalars ---------------------------------------------------------------------------------------

def _real(value) -> bool:
    """An int or float, Python's or numpy's, that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) \
        and not isinstance(value, torch.Tensor)


def check_seed(seed) -> int:
    """An int dropout seed (Python or numpy integer) as an int in [0, 2**63), else TypeError/ValueError."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"dropout_seed must be an int in [0, 2**63) or None, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"dropout_seed must be in [0, 2**63), got {seed}")
    return seed


def check_seed_tensor(seed: torch.Tensor, read_value: bool = True):
    """A tensor dropout seed: one integer element; its value as an int (``read_value``) or, while
    torch.compile traces, the 0-d int64 tensor (the op checks the value when it runs)."""
    if seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
        raise TypeError(f"dropout_seed must be an int in [0, 2**63) or None, got a tensor of dtype {seed.dtype}")
    if seed.numel() != 1:
        raise ValueError(f"dropout_seed must hold a single integer, got a tensor of shape {list(seed.shape)}")
    if not read_value:
        return seed.reshape(()).to(torch.int64)
    return check_seed(int(seed.item()))


def check_scalars(lora_scale, lora_dropout, dropout_seed, read_values: bool = True):
    """(scale: float, p: float, seed: int | 0-d int64 Tensor | None) from the op's scalar arguments.

    Python and numpy numbers are accepted (bools are not); a seed may also be a one-element integer
    tensor.  ``read_values=False`` (torch.compile tracing) leaves a tensor seed's value to the op.
    """
    if not _real(lora_scale):
        raise TypeError(f"lora_scale must be a float, got {type(lora_scale).__name__}")
    if not _real(lora_dropout):
        raise TypeError(f"lora_dropout must be a float in [0, 1), got {type(lora_dropout).__name__}")
    p = float(lora_dropout)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {p!r}")
    if dropout_seed is None:
        seed = None
    elif isinstance(dropout_seed, torch.Tensor):
        seed = check_seed_tensor(dropout_seed, read_values)
    else:
        seed = check_seed(dropout_seed)
    return float(lora_scale), p, seed


# ---- 2. tensors ---------------------------------------------------------------------------------------

def _tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _shape(name, t, expected):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {list(expected)}, got {list(t.shape)}")


def _device(name, t, device):
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; move it to {device}")


def _adapter_dtype(name, t, x_dtype):
    if t.dtype not in (x_dtype, torch.float32):
        raise TypeError(f"{name} must have x's dtype ({x_dtype}) or torch.float32, got {t.dtype}")


def check_tensor_types(**tensors) -> None:
    """TypeError for the first argument that is neither None nor a tensor (cheap: no attribute reads)."""
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_dora_args(weight, lora_A, lora_B, dora_magnitude, ia3_in, ia3_out, sparse_value, x_dtype, x_device) -> None:
    """DoRA's own checks (the other arguments are checked by check_peft_linear_args)."""
    _tensor("dora_magnitude", dora_magnitude)
    if lora_A is None or lora_B is None:
        raise ValueError("dora_magnitude needs lora_A and lora_B (DoRA scales the LoRA-adapted weight)")
    conflicts = [name for name, t in (("ia3_in", ia3_in), ("ia3_out", ia3_out), ("sparse_value", sparse_value))
                 if t is not None]
    if conflicts:
        raise ValueError(f"dora_magnitude cannot be combined with {', '.join(conflicts)}: DoRA's row norm is "
                         "defined for W + s·B·A only")
    _shape("dora_magnitude", dora_magnitude, (weight.shape[0],))
    _device("dora_magnitude", dora_magnitude, x_device)
    _adapter_dtype("dora_magnitude", dora_magnitude, x_dtype)


def check_peft_linear_args(x, weight, bias, lora_A, lora_B, lora_scale, lora_dropout, ia3_in, ia3_out,
                           sparse_index, sparse_value, check_values: bool = True) -> None:
    """Raise a TypeError/ValueError naming the first bad tensor argument (steps 2 and 3 above).

    ``lora_scale`` and ``lora_dropout`` are checked by ``check_scalars`` (step 1) and ignored here.
    ``check_values`` also reads the sparse index (sorted, unique, in range); the op does that itself
    when it runs (and skips it for an index ``mark_validated`` has seen).
    """
    del lora_scale, lora_dropout
    _tensor("x", x)
    _tensor("weight", weight)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a floating tensor (float32, bfloat16, float16 or float64), got {x.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {list(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match x dtype {x.dtype}")
    _device("weight", weight, x.device)
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape [..., {k}] to match weight [{n}, {k}], got {list(x.shape)}")
    if bias is not None:
        _tensor("bias", bias)
        _shape("bias", bias, (n,))
        _device("bias", bias, x.device)
        _adapter_dtype("bias", bias, x.dtype)
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must be given together")
    if lora_A is not None:
        _tensor("lora_A", lora_A)
        _tensor("lora_B", lora_B)
        if lora_A.dim() != 2 or lora_A.shape[1] != k:
            raise ValueError(f"lora_A must have shape [r, {k}], got {list(lora_A.shape)}")
        r = lora_A.shape[0]
        if lora_B.dim() != 2 or lora_B.shape[0] != n:
            raise ValueError(f"lora_B must have shape [{n}, r], got {list(lora_B.shape)}")
        if lora_B.shape[1] != r:
            raise ValueError(f"rank mismatch: lora_A has rank {r} ([{r}, {k}]) but lora_B has rank "
                             f"{lora_B.shape[1]} ([{n}, {lora_B.shape[1]}])")
        if r == 0:
            raise ValueError("lora rank r must be at least 1, got lora_A of shape [0, K]")
        _device("lora_A", lora_A, x.device)
        _device("lora_B", lora_B, x.device)
        _adapter_dtype("lora_A", lora_A, x.dtype)
        _adapter_dtype("lora_B", lora_B, x.dtype)
    if ia3_in is not None:
        _tensor("ia3_in", ia3_in)
        _shape("ia3_in", ia3_in, (k,))
        _device("ia3_in", ia3_in, x.device)
        _adapter_dtype("ia3_in", ia3_in, x.dtype)
    if ia3_out is not None:
        _tensor("ia3_out", ia3_out)
        _shape("ia3_out", ia3_out, (n,))
        _device("ia3_out", ia3_out, x.device)
        _adapter_dtype("ia3_out", ia3_out, x.dtype)
    if (sparse_index is None) != (sparse_value is None):
        raise ValueError("sparse_index and sparse_value must be given together")
    if sparse_index is not None:
        check_sparse(sparse_index, sparse_value, n, k, x.device, check_values=False)
        _adapter_dtype("sparse_value", sparse_value, x.dtype)
        if check_values and not is_validated(sparse_index, n, k):
            check_sparse_values(sparse_index, n, k)


def check_sparse(sparse_index, sparse_value, n, k, device=None, check_values: bool = True) -> None:
    """The sparse delta's index and values: types, dtypes, shapes, devices, and (``check_values``)
    the index's values (``check_sparse_values``)."""
    _tensor("sparse_index", sparse_index)
    _tensor("sparse_value", sparse_value)
    if sparse_index.dtype != torch.int64:
        raise TypeError(f"sparse_index must be int64, got {sparse_index.dtype}")
    if sparse_index.dim() != 1:
        raise ValueError(f"sparse_index must be 1-D [nnz], got shape {list(sparse_index.shape)}")
    if sparse_value.dim() != 1 or sparse_value.shape[0] != sparse_index.shape[0]:
        raise ValueError(f"sparse_value must have shape [{sparse_index.shape[0]}] like sparse_index, "
                         f"got {list(sparse_value.shape)}")
    if not sparse_value.is_floating_point():
        raise TypeError(f"sparse_value must be a floating tensor, got {sparse_value.dtype}")
    if device is not None:
        _device("sparse_index", sparse_index, device)
        _device("sparse_value", sparse_value, device)
    if check_values:
        check_sparse_values(sparse_index, n, k)


# ---- 3. data ----------------------------------------------------------------------------------------

def check_sparse_values(sparse_index: torch.Tensor, n: int, k: int) -> None:
    """ValueError unless the int64 [nnz] index holds sorted, unique flat indices into an [n, k] weight.

    Out of range is reported first (with the range found), then duplicates, then order.
    """
    if sparse_index.numel() == 0:
        return
    lo, hi = int(sparse_index.min()), int(sparse_index.max())
    if lo < 0 or hi >= n * k:
        raise ValueError(f"sparse_index values must be flat indices in [0, {n * k}) for a [{n}, {k}] "
                         f"weight, got range [{lo}, {hi}]")
    if sparse_index.numel() > 1:
        steps = sparse_index[1:] - sparse_index[:-1]
        if bool((steps == 0).any()):
            raise ValueError("sparse_index must hold unique indices; found duplicates")
        if bool((steps < 0).any()):
            raise ValueError("sparse_index must be sorted ascending")


_MARK = "_fastpeft_validated"


def _fingerprint(index: torch.Tensor, n: int, k: int):
    # The version counter moves on every in-place write (load_state_dict, index[i] = v, ...); the data
    # pointer changes when the tensor is given other storage.
    return (index._version, index.data_ptr(), index.numel(), int(n), int(k))


def mark_validated(index: torch.Tensor, n: int, k: int) -> None:
    """Check a fixed sparse index once (e.g. when a layer is built) and remember that it passed.

    Raises the TypeError/ValueError ``peft_linear`` would.  Afterwards the Python routes (reference
    and Triton backends, torch.compile) skip the per-call value checks for this tensor for an [n, k]
    weight until it is modified in place or given other storage (then it is checked again on the
    next call).  A copy (``.to``, ``.clone``, ``copy.deepcopy``) is a new tensor: mark it again.
    The eager C++ route needs no mark: it reads the index once per call anyway to build the row
    pointers its kernels use, and checks it in that pass, before any other work.
    """
    _tensor("sparse_index", index)
    if index.dtype != torch.int64:
        raise TypeError(f"sparse_index must be int64, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"sparse_index must be 1-D [nnz], got shape {list(index.shape)}")
    if index.is_inference():
        raise ValueError("mark_validated needs a normal tensor: inference tensors have no version counter")
    check_sparse_values(index, n, k)
    setattr(index, _MARK, _fingerprint(index, n, k))


def is_validated(index: torch.Tensor, n: int, k: int) -> bool:
    """True when ``mark_validated(index, n, k)`` passed and the tensor has not changed since."""
    mark = getattr(index, _MARK, None)
    return mark is not None and not index.is_inference() and mark == _fingerprint(index, n, k)


def with_lora_bias(x, weight, bias, lora_A, lora_B, lora_scale, lora_dropout, dropout_seed, lora_bias,
                   read_values: bool = True):
    """The op's ``bias`` with LoRA's bias term folded in: bias + s·lora_bias (peft's ``lora_B`` bias,
    ``lora_bias=True``: lora_B(lora_A(x))·s adds s·b_B to the output).

    The kernels see one [N] bias (a fused sum is one cheap [N] add; autograd gives lora_bias
    s·Σ grad_y and the base bias Σ grad_y).  Checks the scalars first and then lora_bias itself
    (a [N] floating tensor in x's dtype or float32, on x's device, with lora_A and lora_B given),
    before any work; the other tensors are checked by the op as usual.
    """
    scale = check_scalars(lora_scale, lora_dropout, dropout_seed, read_values=read_values)[0]
    check_tensor_types(x=x, bias=bias, lora_A=lora_A, lora_B=lora_B, lora_bias=lora_bias)
    if lora_A is None or lora_B is None:
        raise ValueError("lora_bias needs lora_A and lora_B (it is the bias of LoRA's lora_B)")
    _tensor("x", x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a floating tensor (float32, bfloat16, float16 or float64), got {x.dtype}")
    shape = getattr(weight, "shape", None)  # a Tensor or a QuantizedWeight
    if shape is None or len(shape) != 2:
        raise TypeError(f"weight must be a 2-D torch.Tensor or a fastpeft.QuantizedWeight, got {type(weight).__name__}")
    _shape("lora_bias", lora_bias, (shape[0],))
    _device("lora_bias", lora_bias, x.device)
    _adapter_dtype("lora_bias", lora_bias, x.dtype)
    if bias is not None:
        _device("bias", bias, x.device)
        _adapter_dtype("bias", bias, x.dtype)
        _shape("bias", bias, (weight.shape[0],))
        return torch.add(bias, lora_bias, alpha=scale)
    return lora_bias * scale
