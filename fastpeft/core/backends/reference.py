"""Reference backend: the fused op in plain PyTorch with a hand-written backward.

Unlike ``fastpeft.reference.peft_linear`` (plain autograd), this saves nothing of dropout: the
backward regenerates the keep-mask from the seed, as the C++ and Triton kernels do.  It is the
fallback wherever no compiled backend runs, and the template the kernels follow.
"""
from __future__ import annotations

import warnings

import torch

from fastpeft.reference import dropout_with_mask
from fastpeft.core.backends import Backend

# Gather-and-reduce in chunks so the SDDMM never holds more than this many M x nnz elements.
_SDDMM_CHUNK_ELEMENTS = 1 << 22


def _wide(t: torch.Tensor) -> torch.Tensor:
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
    out = torch.empty(sparse_index.numel(), dtype=_wide(g[:0]).dtype, device=g.device)
    chunk = max(1, _SDDMM_CHUNK_ELEMENTS // max(1, g.shape[0]))
    for start in range(0, sparse_index.numel(), chunk):
        r, c = rows[start:start + chunk], cols[start:start + chunk]
        out[start:start + chunk] = (_wide(g[:, r]) * _wide(h[:, c])).sum(0)
    return out


def forward(x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value,
            lora_scale, p, seed, save_z):
    dt = x.dtype
    n, k = weight.shape
    h = x * ia3_in.to(dt) if ia3_in is not None else x
    z = torch.nn.functional.linear(h, weight, bias.to(dt) if bias is not None else None)
    if sparse_index is not None:
        z = z + sparse_matmul(h, sparse_index, sparse_value, n, k)
    z_saved = z if save_z else _empty(x)
    y = z * ia3_out.to(dt) if ia3_out is not None else z
    if lora_A is not None:
        xa = dropout_with_mask(x, p, seed) @ lora_A.to(dt).t()
        if lora_scale != 0.0:
            y = torch.addmm(y, xa, lora_B.to(dt).t(), alpha=lora_scale)
        else:  # BLAS skips the product when alpha = 0, which would hide a NaN in it (0 * NaN is NaN)
            y = y + 0.0 * (xa @ lora_B.to(dt).t())
    else:
        xa = _empty(x)
    if y is x or y is z_saved:  # custom ops may not return aliases of inputs or of each other
        y = y.clone()
    return y, xa, z_saved


def backward(grad_y, x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value,
             xa, z, lora_scale, p, seed, needs):
    need_x, need_w, need_b, need_a, need_bb, need_in, need_out, need_val = needs
    dt = grad_y.dtype  # x's dtype; x itself is None when only dX is needed (ops.py does not save it)
    n, k = weight.shape
    gx = gw = gb = ga = gbb = gin = gout = gval = None
    gz = grad_y * ia3_out.to(dt) if ia3_out is not None else grad_y
    if need_out:
        gout = (_wide(grad_y) * _wide(z)).sum(0).to(ia3_out.dtype)
    if need_b:
        gb = _wide(gz).sum(0).to(bias.dtype)
    h = x * ia3_in.to(dt) if ia3_in is not None and x is not None else x
    if need_w:
        gw = (gz.t() @ h).to(weight.dtype)
    if need_val:
        gval = sddmm(gz, h, sparse_index, k).to(sparse_value.dtype)
    if need_x or need_in:
        dh = gz @ weight
        if sparse_index is not None:
            dh = dh + sparse_matmul_t(gz, sparse_index, sparse_value, n, k)
        if need_in:
            gin = (_wide(dh) * _wide(x)).sum(0).to(ia3_in.dtype)
        if need_x:
            gx = dh * ia3_in.to(dt) if ia3_in is not None else dh
    if lora_A is not None and (need_x or need_a or need_bb):
        a, b = lora_A.to(dt), lora_B.to(dt)
        if need_bb:
            gbb = (lora_scale * (grad_y.t() @ xa)).to(lora_B.dtype)
        if need_x or need_a:
            gyb = grad_y @ b  # [M, r]: the rank-sized intermediate both gradients share
            if need_a:
                ga = (lora_scale * (gyb.t() @ dropout_with_mask(x, p, seed))).to(lora_A.dtype)
            if need_x:
                gx_lora = dropout_with_mask(gyb @ a, p, seed)
                gx = torch.add(gx, gx_lora, alpha=lora_scale) if gx is not None else lora_scale * gx_lora
    return gx, gw, gb, ga, gbb, gin, gout, gval


BACKEND = Backend(
    name="reference",
    forward=forward,
    backward=backward,
    unavailable=lambda: None,
    device_error=lambda device: None,
)
