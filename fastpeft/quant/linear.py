"""Products with a quantized weight, one dequantized panel at a time (no dense [N, K] ever exists).

    quant_linear(x, qw)             y  = x  @ Wᵀ   x [..., K]  -> y  [..., N]
    quant_linear_grad_input(gy, qw) dX = gy @ W    gy [..., N] -> dX [..., K]

W is ``qw.dequantize().to(x.dtype)`` (bit for bit the dequantized panel values).  The C++ kernels
(csrc/quant.cpp, ``torch.ops.fastpeft_cpp.quant_*``) dequantize a panel of W's rows (forward) or
columns (dX) of ``panel_bytes`` (default 1 MiB) into a buffer and run the GEMM on it through
ATen (MKL / oneDNN), each thread on its own panels.  ``backend="triton"`` (the default for CUDA
tensors when Triton imports; on the CPU under ``TRITON_INTERPRET=1``) runs kernels/quant.py, which
decodes W inside its K loop.  Elsewhere (no extension, or ``backend="torch"``) a pure-torch loop does
the same panels with ``qw.dequantize_rows`` + ``mm``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fastpeft.quant.weight import FLOAT_DTYPES, QuantizedWeight

PANEL_BYTES = 1 << 20
BACKENDS = (None, "cpp", "torch", "triton")


def _ops():
    """torch.ops.fastpeft_cpp when the extension is built and has the quant kernels, else None."""
    try:
        from fastpeft.core.backends import cpp
    except Exception:  # pragma: no cover - the package always has it
        return None
    if cpp.unavailable() is not None:
        return None
    ops = torch.ops.fastpeft_cpp
    return ops if hasattr(ops, "quant_linear") else None


def cpp_available() -> bool:
    """True when the C++ quant kernels are built and loaded."""
    return _ops() is not None


def panel_rows(width: int, elem: int, panel_bytes: int = PANEL_BYTES) -> int:
    """Rows of ``width`` values of ``elem`` bytes in a panel of about ``panel_bytes`` (a multiple of 16 if >= 16)."""
    rows = max(1, panel_bytes // max(1, width * elem))
    return rows - rows % 16 if rows >= 16 else rows


def kernel_args(qw: QuantizedWeight) -> tuple:
    """The quantized tensors and layout as the C++ ops take them (after the activation)."""
    t = qw.tensors()
    n, k = qw.shape
    if qw.format == "nf4":
        return (t["packed"], t["absmax"], t.get("absmax2"), t.get("absmax_code"), t.get("absmax_offset"), "nf4",
                n, k, qw.blocksize, qw.absmax_blocksize or 256, qw.dtype)
    return (t["CB"], t["SCB"], None, None, None, "int8", n, k, 0, 256, qw.dtype)


def _check(a: torch.Tensor, qw: QuantizedWeight, width: int, name: str, backend, panel_bytes) -> None:
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a QuantizedWeight, got {type(qw).__name__}")
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(a).__name__}")
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {a.dtype}")
    if a.dim() < 1 or a.shape[-1] != width:
        raise ValueError(f"{name} must have shape [..., {width}] for a {list(qw.shape)} weight, got {list(a.shape)}")
    if a.device != qw.device:
        raise ValueError(f"{name} is on {a.device} but the quantized weight is on {qw.device}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None, 'cpp', 'torch' or 'triton', got {backend!r}")
    if panel_bytes is not None and (isinstance(panel_bytes, bool) or not isinstance(panel_bytes, int)
                                    or panel_bytes < 1):
        raise ValueError(f"panel_bytes must be a positive int, got {panel_bytes!r}")


def _triton():
    """fastpeft.kernels.quant (the Triton products), or None when Triton does not import."""
    try:
        from fastpeft.kernels import quant as kq
    except ImportError:
        return None
    return kq


def _resolve(a: torch.Tensor, backend):
    """(kind, kernels): ("cpp", torch.ops.fastpeft_cpp), ("triton", fastpeft.kernels.quant) or ("torch", None)."""
    if backend == "torch":
        return "torch", None
    if backend == "triton" or (backend is None and a.device.type == "cuda"):
        kq = _triton()
        if kq is not None:
            return "triton", kq
        if backend == "triton":
            raise RuntimeError("backend='triton' for a quantized product: Triton is not installed")
        return "torch", None
    ops = _ops() if a.device.type == "cpu" else None
    if backend == "cpp" and ops is None:
        why = "the tensors are not on the CPU" if a.device.type != "cpu" else "the C++ extension is not available"
        raise RuntimeError(f"backend='cpp' for a quantized product: {why}")
    return ("cpp", ops) if ops is not None else ("torch", None)


def _product(t: torch.Tensor, qw: QuantizedWeight, forward: bool, backend: Optional[str],
             panel_bytes: Optional[int]) -> torch.Tensor:
    """t @ W^T (forward: t [..., K] -> [..., N]) or t @ W (t [..., N] -> [..., K]) on the chosen kernel."""
    n, k = qw.shape if isinstance(qw, QuantizedWeight) else (None, None)
    inner, outer = (k, n) if forward else (n, k)
    _check(t, qw, inner, "x" if forward else "grad_y", backend, panel_bytes)
    lead = t.shape[:-1]
    t2 = t.detach().reshape(math.prod(lead), inner)
    kind, kern = _resolve(t, backend)
    if kind == "cpp":
        run = kern.quant_linear if forward else kern.quant_linear_grad_input
        out = run(t2, *kernel_args(qw), panel_bytes or 0)
    elif kind == "triton":
        out = kern.quant_matmul(t2, qw, forward)
    else:
        out = (_torch_linear if forward else _torch_grad_input)(t2, qw, panel_bytes or PANEL_BYTES)
    return out.reshape(*lead, outer)


def quant_linear(x: torch.Tensor, qw: QuantizedWeight, *, backend: Optional[str] = None,
                 panel_bytes: Optional[int] = None) -> torch.Tensor:
    """y = x @ W^T for x [..., K] and a quantized W [N, K]; y [..., N] in x's dtype (no autograd)."""
    return _product(x, qw, True, backend, panel_bytes)


def quant_linear_grad_input(grad_y: torch.Tensor, qw: QuantizedWeight, *, backend: Optional[str] = None,
                            panel_bytes: Optional[int] = None) -> torch.Tensor:
    """dX = grad_y @ W for grad_y [..., N] and a quantized W [N, K]; dX [..., K] in grad_y's dtype."""
    return _product(grad_y, qw, False, backend, panel_bytes)


def quant_linear_add_(out: torch.Tensor, a: torch.Tensor, qw: QuantizedWeight, *, forward: bool = True,
                      backend: Optional[str] = None, panel_bytes: Optional[int] = None) -> torch.Tensor:
    """out += a @ Wᵀ (``forward``) or a @ W, in place (2-D contiguous ``out`` of a's dtype); returns out.

    The fused op over a quantized base writes its other terms (bias, LoRA) first and accumulates the
    frozen product onto them, so the output takes no extra pass (the C++ kernels; the other
    backends add the product).
    """
    n, k = qw.shape if isinstance(qw, QuantizedWeight) else (None, None)
    _check(a, qw, k if forward else n, "x" if forward else "grad_y", backend, panel_bytes)
    kind, kern = _resolve(a, backend)
    if kind == "cpp" and out.is_contiguous() and a.dim() == 2:
        kern.quant_linear_add_(out, a.contiguous(), *kernel_args(qw), forward, panel_bytes or 0)
    else:
        out += (quant_linear if forward else quant_linear_grad_input)(a, qw, backend=backend, panel_bytes=panel_bytes)
    return out


def dequantize_rows_cpp(qw: QuantizedWeight, start: int, stop: int, out: Optional[torch.Tensor] = None,
                        col_start: int = 0, col_stop: Optional[int] = None) -> torch.Tensor:
    """The C++ panel dequantization: W[start:stop, col_start:col_stop] into ``out`` (default qw.dtype)."""
    _, ops = _resolve(torch.empty(0, device=qw.device), "cpp")
    n, k = qw.shape
    col_stop = k if col_stop is None else col_stop
    if not (0 <= start <= stop <= n and 0 <= col_start <= col_stop <= k):
        raise ValueError(f"rows [{start}, {stop}) and columns [{col_start}, {col_stop}) must lie in {list(qw.shape)}")
    if out is None:
        out = torch.empty(stop - start, col_stop - col_start, dtype=qw.dtype)
    ops.quant_dequantize(*kernel_args(qw), start, stop, col_start, col_stop, out)
    return out


# ---------------------------------------------------------------------------------------------
# pure-torch fallback: the same panels, through QuantizedWeight.dequantize_rows

def _torch_linear(x2: torch.Tensor, qw: QuantizedWeight, panel_bytes: int) -> torch.Tensor:
    n, k = qw.shape
    y = torch.empty(x2.shape[0], n, dtype=x2.dtype, device=x2.device)
    if x2.shape[0] == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_()
    step = panel_rows(k, x2.element_size(), panel_bytes)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        panel = qw.dequantize_rows(r0, r1).to(x2.dtype)
        y[:, r0:r1] = x2 @ panel.t()
    return y


def _torch_grad_input(g2: torch.Tensor, qw: QuantizedWeight, panel_bytes: int) -> torch.Tensor:
    n, k = qw.shape
    m = g2.shape[0]
    # Row panels each add a rank-`step` update to all of dX: accumulate in fp32 for 16-bit dtypes.
    acc_dtype = torch.float32 if g2.dtype != torch.float32 else g2.dtype
    acc = torch.zeros(m, k, dtype=acc_dtype, device=g2.device)
    if m == 0 or k == 0 or n == 0:
        return acc.to(g2.dtype)
    step = panel_rows(k, g2.element_size(), panel_bytes)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        panel = qw.dequantize_rows(r0, r1).to(g2.dtype)
        acc.addmm_(g2[:, r0:r1].to(acc_dtype), panel.to(acc_dtype))
    return acc.to(g2.dtype)
