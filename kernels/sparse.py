"""Sparse-delta kernels: S applied without ever forming a dense N x K tensor.

S is given by flat row-major indices into W [N, K] (sorted, unique) and their values.
* Forward  z += h S^T:  for output column n, sum over the nonzeros (n, k) of row n of h[:, k] * S[n, k];
  done in the fused GEMM's epilogue with ``sparse_rows_accumulate`` over a CSR row pointer.
* Backward dh += gz S:  the same helper over S's columns (a CSC view built on the host).
* Backward d sparse_value (SDDMM):  for each nonzero (n, k): sum_m gz[m, n] * h[m, k]
  (``sddmm_kernel``), O(nnz) memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.kernels import config as _config
from fastpeft.kernels._math import round_to

SDDMM_BLOCK_NZ = 16 if _config.INTERPRET else 128
SDDMM_BLOCK_M = 16 if _config.INTERPRET else 32


@triton.jit
def sparse_rows_accumulate(acc, a_ptr, rows, row_in, stride_am, stride_ac, pro_ptr, seg_ptr, idx_ptr, val_ptr,
                           cols, col_in, PRO_SCALE: tl.constexpr):
    # acc[m, n] += sum_{j in [seg[n], seg[n+1])} (a[m, idx[j]] * pro[idx[j]]) * val[j]
    # (rows m and output columns n of this tile; idx are contraction indices.)  The loop runs as
    # many times as the longest segment in the tile; shorter ones are masked.
    start = tl.load(seg_ptr + cols, mask=col_in, other=0)
    end = tl.load(seg_ptr + cols + 1, mask=col_in, other=0)
    longest = tl.max(end - start, axis=0)
    row_off = rows.to(tl.int64)[:, None] * stride_am
    for t in range(0, longest):
        j = start + t
        live = j < end
        c = tl.load(idx_ptr + j, mask=live, other=0)
        v = round_to(tl.load(val_ptr + j, mask=live, other=0.0), a_ptr.dtype.element_ty).to(tl.float32)
        g = tl.load(a_ptr + row_off + c[None, :] * stride_ac, mask=row_in[:, None] & live[None, :], other=0.0)
        if PRO_SCALE:
            s = tl.load(pro_ptr + c, mask=live, other=0.0).to(tl.float32)
            g = round_to(g.to(tl.float32) * s[None, :], a_ptr.dtype.element_ty)
        acc += g.to(tl.float32) * v[None, :]
    return acc


@triton.jit
def sddmm_kernel(g_ptr, h_ptr, idx_ptr, out_ptr, gs_ptr, hs_ptr, M, N, K, nnz, rows_per_split,
                 G_SCALE: tl.constexpr, H_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_NZ: tl.constexpr):
    # out[s, j] = sum_{m in split s} (g[m, n_j] * gs[n_j]) * (h[m, k_j] * hs[k_j]),  (n_j, k_j) = divmod(idx[j], K)
    # One program owns BLOCK_NZ nonzeros and one slice of rows; the host sums the slices.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    j = pid * BLOCK_NZ + tl.arange(0, BLOCK_NZ)
    live = j < nnz
    flat = tl.load(idx_ptr + j, mask=live, other=0)
    n = flat // K
    k = flat - n * K
    if G_SCALE:
        gs = tl.load(gs_ptr + n, mask=live, other=0.0).to(tl.float32)
    if H_SCALE:
        hs = tl.load(hs_ptr + k, mask=live, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_NZ,), dtype=tl.float32)
    m_lo = split * rows_per_split
    m_hi = tl.minimum(M, m_lo + rows_per_split)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        both = (rm < m_hi)[:, None] & live[None, :]
        rm64 = rm.to(tl.int64)[:, None]
        g = tl.load(g_ptr + rm64 * N + n[None, :], mask=both, other=0.0)
        h = tl.load(h_ptr + rm64 * K + k[None, :], mask=both, other=0.0)
        if G_SCALE:  # gz = dY * ia3_out, rounded to x's precision like the dense path
            g = round_to(g.to(tl.float32) * gs[None, :], g_ptr.dtype.element_ty)
        if H_SCALE:  # h = x * ia3_in
            h = round_to(h.to(tl.float32) * hs[None, :], h_ptr.dtype.element_ty)
        acc += tl.sum(g.to(tl.float32) * h.to(tl.float32), axis=0)
    tl.store(out_ptr + split.to(tl.int64) * nnz + j, acc, mask=live)


def csr(sparse_index: torch.Tensor, sparse_value: torch.Tensor, n: int, k: int):
    """(row_ptr [n+1], col [nnz], value [nnz]) of S: indices are sorted, so rows are contiguous."""
    rows = torch.div(sparse_index, k, rounding_mode="floor")
    row_ptr = torch.searchsorted(rows, torch.arange(n + 1, device=rows.device, dtype=rows.dtype))
    return row_ptr, sparse_index - rows * k, sparse_value


def csc(sparse_index: torch.Tensor, sparse_value: torch.Tensor, n: int, k: int):
    """(col_ptr [k+1], row [nnz], value [nnz]) of S: the nonzeros regrouped by column of W."""
    rows = torch.div(sparse_index, k, rounding_mode="floor")
    cols = sparse_index - rows * k
    cols_sorted, order = torch.sort(cols, stable=True)  # stable: rows stay ascending in a column
    col_ptr = torch.searchsorted(cols_sorted, torch.arange(k + 1, device=cols.device, dtype=cols.dtype))
    return col_ptr, rows[order], sparse_value[order]


def sddmm(g: torch.Tensor, h: torch.Tensor, sparse_index: torch.Tensor, n: int, k: int, g_scale=None,
          h_scale=None, target_programs: int = 528) -> torch.Tensor:
    """fp32 [nnz]: out[j] = sum_m (g*g_scale)[m, n_j] * (h*h_scale)[m, k_j] over the nonzeros of S.

    g is [M, n] (the output gradient), h is [M, k] (x); the optional scales are ia3_out / ia3_in.
    """
    m, nnz = g.shape[0], sparse_index.numel()
    if nnz == 0 or m == 0:
        return torch.zeros(nnz, dtype=torch.float32, device=g.device)
    blocks = triton.cdiv(nnz, SDDMM_BLOCK_NZ)
    # Split rows when there are too few nonzero blocks to fill the machine; slices are summed here.
    splits = max(1, min(triton.cdiv(target_programs, blocks), triton.cdiv(m, SDDMM_BLOCK_M * 4)))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), SDDMM_BLOCK_M) * SDDMM_BLOCK_M
    splits = triton.cdiv(m, rows_per_split)
    out = torch.empty(splits, nnz, dtype=torch.float32, device=g.device)
    sddmm_kernel[(blocks, splits)](
        g, h, sparse_index, out, g_scale if g_scale is not None else g, h_scale if h_scale is not None else h,
        m, n, k, nnz, rows_per_split, G_SCALE=g_scale is not None, H_SCALE=h_scale is not None,
        BLOCK_M=SDDMM_BLOCK_M, BLOCK_NZ=SDDMM_BLOCK_NZ, num_warps=1 if _config.INTERPRET else 4)
    return out[0] if splits == 1 else out.sum(0)


def aot_variants(x_dtype: str, adapter_dtype: str, full: bool = True):
    """Every SDDMM flag combination the backend launches (ia3_out x ia3_in present or not);
    only both scales on unless ``full``."""
    for g_scale in ((False, True) if full else (True,)):
        for h_scale in ((False, True) if full else (True,)):
            sig = {"g_ptr": f"*{x_dtype}", "h_ptr": f"*{x_dtype}", "idx_ptr": "*i64", "out_ptr": "*fp32",
                   "gs_ptr": f"*{adapter_dtype}" if g_scale else f"*{x_dtype}",
                   "hs_ptr": f"*{adapter_dtype}" if h_scale else f"*{x_dtype}",
                   "M": "i32", "N": "i32", "K": "i32", "nnz": "i32", "rows_per_split": "i32"}
            const = {"G_SCALE": g_scale, "H_SCALE": h_scale, "BLOCK_M": 32, "BLOCK_NZ": 128}
            for name in const:
                sig[name] = "constexpr"
            yield _config.Variant(f"sddmm[gs={int(g_scale)},hs={int(h_scale)}]", sddmm_kernel, sig, const, 4, 1)
