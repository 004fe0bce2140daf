"""Argument checks for fastpeft.peft_linear: every message names the argument and what was expected."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_positive_int(name: str, value) -> int:
    """``value`` if it is an int >= 1 (bools excluded), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


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


def check_peft_linear_args(x, weight, bias, lora_A, lora_B, lora_scale, lora_dropout, ia3_in, ia3_out,
                           sparse_index, sparse_value, check_values: bool = True) -> None:
    """Raise a TypeError/ValueError naming the first bad argument.

    ``check_values`` also checks data-dependent properties (sparse indices sorted, unique and in
    range), which read the index tensor; it is skipped while torch.compile traces.
    """
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
    if isinstance(lora_scale, bool) or not isinstance(lora_scale, (int, float)):
        raise TypeError(f"lora_scale must be a float, got {type(lora_scale).__name__}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)):
        raise TypeError(f"lora_dropout must be a float in [0, 1), got {type(lora_dropout).__name__}")
    if not 0.0 <= float(lora_dropout) < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
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
        check_sparse(sparse_index, sparse_value, n, k, x.device, check_values)
        _adapter_dtype("sparse_value", sparse_value, x.dtype)


def check_sparse(sparse_index, sparse_value, n, k, device=None, check_values: bool = True) -> None:
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
    if check_values and sparse_index.numel() > 0:
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
