"""Reference backend: the fused op in plain PyTorch with a hand-written backward.

Unlike ``fastpeft.reference.peft_linear`` (plain autograd), this saves nothing of dropout: the
backward regenerates the keep-mask from the seed, as the C++ and Triton kernels do.  It is the
fallback wherever no compiled backend runs, and the template the kernels follow.
"""
from __future__ import annotations

import warnings

import torch

from fastpeft.core.backends.base import Backend
from fastpeft.core.spec import Grads
from fastpeft.reference import dropout_with_mask

# Gather-and-reduce in chunks so the SDDMM never holds more than this many M x nnz elements.
_SDDMM_CHUNK_ELEMENTS = 1 << 22


def wide(t: torch.Tensor) -> torch.Tensor:
    """Accumulation precision: fp32 for half types, the tensor's own otherwise (fp64 stays fp64)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def sparse_csr(sparse_index: torch.Tensor, sparse_value: torch.Tensor, n: int, k: int, dtype) -> torch.Tensor:
    """S as a torch sparse CSR [n, k] tensor (indices are sorted, so rows are already grouped)."""
    rows = torch.div(sparse_index, k, rounding_mode="floor")
    cols = sparse_index - rows * k
    crow = torch.zeros(n + 1, dtype=torch.int64, device=sparse_index.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    with warnings.catch_warnings():  # "CSR support is in beta" and invariant-check notices
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, sparse_value.to(dtype), (n, k), check_invariants=False)


def sparse_matmul(h: torch.Tensor, sparse_index, sparse_value, n: int, k: int) -> torch.Tensor:
    """h @ S^T, [M, n], never forming S densely (fp32 math for half inputs)."""
    work = torch.float32 if h.dtype in (torch.bfloat16, torch.float16) else h.dtype
    s = sparse_csr(sparse_index, sparse_value, n, k, work)
    return (s @ h.to(work).t()).t().to(h.dtype)


def sparse_matmul_t(g: torch.Tensor, sparse_index, sparse_value, n: int, k: int) -> torch.Tensor:
    """g @ S, [M, k], for the input gradient."""
    work = torch.float32 if g.dtype in (torch.bfloat16, torch.float16) else g.dtype
    rows = torch.div(sparse_index, k, rounding_mode="floor")
    cols = sparse_index - rows * k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        s_t = torch.sparse_coo_tensor(torch.stack([cols, rows]), sparse_value.to(work), (k, n),
                                      check_invariants=False).coalesce()
    return torch.sparse.mm(s_t, g.to(work).t()).t().to(g.dtype)


def sddmm(g: torch.Tensor, h: torch.Tensor, sparse_index: torch.Tensor, k: int) -> torch.Tensor:
    """out[j] = sum_m g[m, row_j] * h[m, col_j] (fp32 accumulation): the gradient of sparse_value."""
    rows = torch.div(sparse_index, k, rounding_mode="floor")
    cols = sparse_index - rows * k
    out = torch.empty(sparse_index.numel(), dtype=wide(g[:0]).dtype, device=g.device)
    chunk = max(1, _SDDMM_CHUNK_ELEMENTS // max(1, g.shape[0]))
    for start in range(0, sparse_index.numel(), chunk):
        r, c = rows[start:start + chunk], cols[start:start + chunk]
        out[start:start + chunk] = (wide(g[:, r]) * wide(h[:, c])).sum(0)
    return out


def forward(a, save_z):
    dt = a.x.dtype
    n, k = a.weight.shape
    scaled = a.dora_scale is not None  # DoRA: y = c * u + bias, the bias after the scale
    h = a.x * a.ia3_in.to(dt) if a.ia3_in is not None else a.x
    z = torch.nn.functional.linear(h, a.weight, a.bias.to(dt) if a.bias is not None and not scaled else None)
    if a.sparse_index is not None:
        z = z + sparse_matmul(h, a.sparse_index, a.sparse_value, n, k)
    z_saved = z if save_z and not scaled else _empty(a.x)
    y = z * a.ia3_out.to(dt) if a.ia3_out is not None else z
    if a.lora_A is not None:
        xa = dropout_with_mask(a.x, a.p, a.seed) @ a.lora_A.to(dt).t()
        if a.lora_scale != 0.0:
            y = torch.addmm(y, xa, a.lora_B.to(dt).t(), alpha=a.lora_scale)
        else:  # BLAS skips the product when alpha = 0, which would hide a NaN in it (0 * NaN is NaN)
            y = y + 0.0 * (xa @ a.lora_B.to(dt).t())
    else:
        xa = _empty(a.x)
    if scaled:
        c = a.dora_scale.to(dt)
        if save_z:  # u, the output before the scale: d dora_scale reads it
            z_saved = y if y is not a.x else y.clone()
        y = torch.addcmul(a.bias.to(dt), y, c) if a.bias is not None else y * c
    if y is a.x or y is z_saved:  # custom ops may not return aliases of inputs or of each other
        y = y.clone()
    return y, xa, z_saved


def backward(grad_y, a, xa, z, needs):
    dt = grad_y.dtype  # x's dtype; a.x itself is None when only dX is needed (ops.py does not save it)
    n, k = a.weight.shape
    gx = gw = gb = ga = gbb = gin = gout = gval = gc = None  # in GRAD_NAMES order (spec.Grads)
    if a.dora_scale is not None:
        # y = c * u + bias: dc = sum gy * u, d bias = sum gy, and everything before the scale reads c * gy.
        if needs.dora_scale:
            gc = (wide(grad_y) * wide(z)).sum(0).to(a.dora_scale.dtype)
        if needs.bias:
            gb = wide(grad_y).sum(0).to(a.bias.dtype)
        grad_y = grad_y * a.dora_scale.to(dt)
        needs = needs._replace(bias=False)
    gz = grad_y * a.ia3_out.to(dt) if a.ia3_out is not None else grad_y
    if needs.ia3_out:
        gout = (wide(grad_y) * wide(z)).sum(0).to(a.ia3_out.dtype)
    if needs.bias:
        gb = wide(gz).sum(0).to(a.bias.dtype)
    h = a.x * a.ia3_in.to(dt) if a.ia3_in is not None and a.x is not None else a.x
    if needs.weight:
        gw = (gz.t() @ h).to(a.weight.dtype)
    if needs.sparse_value:
        gval = sddmm(gz, h, a.sparse_index, k).to(a.sparse_value.dtype)
    if needs.x or needs.ia3_in:
        dh = gz @ a.weight
        if a.sparse_index is not None:
            dh = dh + sparse_matmul_t(gz, a.sparse_index, a.sparse_value, n, k)
        if needs.ia3_in:
            gin = (wide(dh) * wide(a.x)).sum(0).to(a.ia3_in.dtype)
        if needs.x:
            gx = dh * a.ia3_in.to(dt) if a.ia3_in is not None else dh
    if a.lora_A is not None and (needs.x or needs.lora_A or needs.lora_B):
        a_dt, b_dt = a.lora_A.to(dt), a.lora_B.to(dt)
        if needs.lora_B:
            gbb = (a.lora_scale * (grad_y.t() @ xa)).to(a.lora_B.dtype)
        if needs.x or needs.lora_A:
            gyb = grad_y @ b_dt  # [M, r]: the rank-sized intermediate both gradients share
            if needs.lora_A:
                ga = (a.lora_scale * (gyb.t() @ dropout_with_mask(a.x, a.p, a.seed))).to(a.lora_A.dtype)
            if needs.x:
                gx_lora = dropout_with_mask(gyb @ a_dt, a.p, a.seed)
                gx = torch.add(gx, gx_lora, alpha=a.lora_scale) if gx is not None else a.lora_scale * gx_lora
    return Grads(x=gx, weight=gw, bias=gb, lora_A=ga, lora_B=gbb, ia3_in=gin, ia3_out=gout, sparse_value=gval,
                 dora_scale=gc)


BACKEND = Backend(
    name="reference",
    forward=forward,
    backward=backward,
    unavailable=lambda: None,
    device_error=lambda device: None,
)
