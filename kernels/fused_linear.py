"""The fused PEFT linear GEMMs, forward and backward (DESIGN.md section 1).

One blocked GEMM kernel, ``fused_matmul_kernel``, computes out[M, N] = epilogue(prologue(a) @ b)
with constexpr flags, and serves every large product of the op:

    forward   y   = (h W^T + h S^T + bias) * ia3_out + s * xa B^T,  h = x * ia3_in    (a = x,  b = W^T)
    LoRA down xa  = dropout(x) A^T                                                  (a = x,  b = A^T, r-wide)
    LoRA up   gyb = dY B                                                            (a = dY, b = B,   r-wide)
    backward  dX  = ((dY * ia3_out) W + gz S) * ia3_in + s * ((gyb A) * mask / (1-p))  (a = dY, b = W)

so the forward reads x twice (once r-wide) and writes y once, and dX is one GEMM with the LoRA,
sparse, and IA3 terms in its epilogue.  ``matmul_tn_kernel`` contracts over M for the
rank-sized and weight gradients (dA, dB, dW), and ``bias_scale_grad_kernel`` reduces dY over M
for d_bias and d_ia3_out.  d_ia3_in comes out of the dX epilogue as per-row-block partial sums.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.kernels import config as _config
from fastpeft.kernels._math import dot_acc, grouped_tile, round_to
from fastpeft.kernels.dropout import keep_bits
from fastpeft.kernels.sparse import sparse_rows_accumulate


@triton.jit
def fused_matmul_kernel(
    a_ptr, b_ptr, out_ptr, M, N, C,
    stride_am, stride_ac, stride_bc, stride_bn, stride_om,
    pro_ptr,  # [C] scale on a's columns (prologue): ia3_in forward, ia3_out backward
    bias_ptr, stride_bias, col_ptr, stride_col,  # [N] epilogue add / scale (stride 0: a broadcast identity)
    post_ptr,  # [N] output scale after the LoRA add, before the bias (DoRA's dora_scale; POST_SCALE)
    z_ptr, save_z,  # the output before the column scale (forward with a trainable ia3_out)
    seg_ptr, sp_idx_ptr, sp_val_ptr,  # sparse delta grouped by output column (CSR forward, CSC backward)
    lo_ptr, up_ptr, R, stride_lom, stride_upr, stride_upn, lora_scale,  # + lora_scale * lo[M, R] @ up[R, N]
    red_ptr, red_src_ptr,  # red[pid_m, n] = sum over the tile's rows of acc * red_src (d_ia3_in)
    key_lo, key_hi, threshold, inv_keep,  # dropout: keep(row * (C or N) + col), kept values * 1/(1-p)
    PRO_SCALE: tl.constexpr, A_DROPOUT: tl.constexpr, SPARSE: tl.constexpr, LORA: tl.constexpr,
    LORA_DROPOUT: tl.constexpr, COL_REDUCE: tl.constexpr, DOT_PRECISION: tl.constexpr, POST_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # acc = (a * pro)[M, C] @ b[C, N] + sparse;  z = acc + bias;  y = z * col + lora_scale * lo @ up
    # POST_SCALE: u = acc * col + lora_scale * lo @ up (stored in z);  y = u * post + bias
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in = rm < M
    n_in = rn < N
    rm64 = rm.to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    # Out-of-range rows/columns read row/column 0 so the main loop needs only the C-tail mask.
    a_ptrs = a_ptr + tl.where(m_in, rm64, 0)[:, None] * stride_am + offs_c[None, :] * stride_ac
    b_ptrs = b_ptr + offs_c[:, None] * stride_bc + tl.where(n_in, rn, 0).to(tl.int64)[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c_in = (c0 + offs_c) < C
        a = tl.load(a_ptrs, mask=c_in[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=c_in[:, None], other=0.0)
        if PRO_SCALE:
            s = tl.load(pro_ptr + c0 + offs_c, mask=c_in, other=0.0).to(tl.float32)
            a = round_to(a.to(tl.float32) * s[None, :], a_ptr.dtype.element_ty)
        if A_DROPOUT:
            keep = keep_bits(rm64[:, None] * C + (c0 + offs_c)[None, :], key_lo, key_hi, threshold)
            a = round_to(a.to(tl.float32) * tl.where(keep, inv_keep, 0.0), a_ptr.dtype.element_ty)
        # b may be an fp32 adapter (A or B) with 16-bit activations: compute in a's precision.
        acc = dot_acc(a, round_to(b, a_ptr.dtype.element_ty), acc, DOT_PRECISION)
        a_ptrs += BLOCK_C * stride_ac
        b_ptrs += BLOCK_C * stride_bc

    if SPARSE:
        acc = sparse_rows_accumulate(acc, a_ptr, rm, m_in, stride_am, stride_ac, pro_ptr, seg_ptr, sp_idx_ptr,
                                     sp_val_ptr, rn, n_in, PRO_SCALE)
    out_mask = m_in[:, None] & n_in[None, :]
    if COL_REDUCE:
        src = tl.load(red_src_ptr + rm64[:, None] * N + rn[None, :], mask=out_mask, other=0.0)
        tl.store(red_ptr + pid_m.to(tl.int64) * N + rn, tl.sum(acc * src.to(tl.float32), axis=0), mask=n_in)
    if not POST_SCALE:
        acc += tl.load(bias_ptr + rn * stride_bias, mask=n_in, other=0.0).to(tl.float32)[None, :]
        if save_z != 0:  # runtime flag: a uniform branch around one store
            tl.store(z_ptr + rm64[:, None] * stride_om + rn[None, :], round_to(acc, z_ptr.dtype.element_ty),
                     mask=out_mask)
    acc *= tl.load(col_ptr + rn * stride_col, mask=n_in, other=0.0).to(tl.float32)[None, :]
    if LORA:
        offs_r = tl.arange(0, BLOCK_R)
        low_rank = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r_in = (r0 + offs_r) < R
            lo = tl.load(lo_ptr + rm64[:, None] * stride_lom + (r0 + offs_r)[None, :],
                         mask=m_in[:, None] & r_in[None, :], other=0.0)
            up = tl.load(up_ptr + (r0 + offs_r)[:, None] * stride_upr + rn[None, :] * stride_upn,
                         mask=r_in[:, None] & n_in[None, :], other=0.0)
            low_rank = dot_acc(lo, round_to(up, lo_ptr.dtype.element_ty), low_rank, DOT_PRECISION)
        if LORA_DROPOUT:  # backward: the LoRA input gradient passes through the same mask
            keep = keep_bits(rm64[:, None] * N + rn[None, :], key_lo, key_hi, threshold)
            low_rank = low_rank * tl.where(keep, inv_keep, 0.0)  # NaN * 0 stays NaN, as in torch
        acc += lora_scale * low_rank
    if POST_SCALE:
        if save_z != 0:
            tl.store(z_ptr + rm64[:, None] * stride_om + rn[None, :], round_to(acc, z_ptr.dtype.element_ty),
                     mask=out_mask)
        # u in x's precision, then scaled and the bias added (as y = c * u + bias in x's dtype)
        u = round_to(acc, out_ptr.dtype.element_ty).to(tl.float32)
        post = tl.load(post_ptr + rn, mask=n_in, other=0.0).to(tl.float32)
        acc = u * post[None, :] + tl.load(bias_ptr + rn * stride_bias, mask=n_in, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm64[:, None] * stride_om + rn[None, :], round_to(acc, out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def matmul_tn_kernel(
    l_ptr, r_ptr, out_ptr, M, P, Q, stride_lm, stride_rm, rows_per_split, scale,
    ls_ptr, rs_ptr, key_lo, key_hi, threshold, inv_keep,
    L_SCALE: tl.constexpr, R_SCALE: tl.constexpr, R_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    # out[s, p, q] = scale * sum_{m in split s} (l[m, p] * ls[p]) * (r[m, q] * rs[q] * keep(m*Q + q) / (1-p))
    # dA = s * gyb^T x~ (R_DROPOUT), dB = s * dY^T xa, dW = (dY * ia3_out)^T (x * ia3_in).
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_q = tl.cdiv(Q, BLOCK_Q)
    rp = (pid // num_pid_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    rq = (pid % num_pid_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_in = rp < P
    q_in = rq < Q
    if L_SCALE:
        ls = tl.load(ls_ptr + rp, mask=p_in, other=0.0).to(tl.float32)
    if R_SCALE:
        rs = tl.load(rs_ptr + rq, mask=q_in, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    m_lo = split * rows_per_split
    m_hi = tl.minimum(M, m_lo + rows_per_split)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        rm64 = rm.to(tl.int64)[:, None]
        m_ok = (rm < m_hi)[:, None]
        lt = tl.load(l_ptr + rm64 * stride_lm + rp[None, :], mask=m_ok & p_in[None, :], other=0.0)
        rt = tl.load(r_ptr + rm64 * stride_rm + rq[None, :], mask=m_ok & q_in[None, :], other=0.0)
        if L_SCALE:
            lt = round_to(lt.to(tl.float32) * ls[None, :], l_ptr.dtype.element_ty)
        if R_SCALE:
            rt = round_to(rt.to(tl.float32) * rs[None, :], r_ptr.dtype.element_ty)
        if R_DROPOUT:
            keep = keep_bits(rm64 * Q + rq[None, :], key_lo, key_hi, threshold)
            rt = round_to(rt.to(tl.float32) * tl.where(keep, inv_keep, 0.0), r_ptr.dtype.element_ty)
        acc = dot_acc(tl.trans(lt), round_to(rt, l_ptr.dtype.element_ty), acc, DOT_PRECISION)
    out = out_ptr + split.to(tl.int64) * P * Q + rp.to(tl.int64)[:, None] * Q + rq[None, :]
    tl.store(out, round_to(acc * scale, out_ptr.dtype.element_ty), mask=p_in[:, None] & q_in[None, :])


@triton.jit
def bias_scale_grad_kernel(gy_ptr, z_ptr, scale_ptr, stride_scale, db_ptr, ds_ptr, M, N, rows_per_split,
                           NEED_BIAS: tl.constexpr, NEED_SCALE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # db[s, n] = sum_{m in split s} dY[m, n] * ia3_out[n];   ds[s, n] = sum_{m in split s} dY[m, n] * z[m, n]
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = rn < N
    scale = tl.load(scale_ptr + rn * stride_scale, mask=n_in, other=0.0).to(tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    ds = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m_lo = split * rows_per_split
    m_hi = tl.minimum(M, m_lo + rows_per_split)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        both = (rm < m_hi)[:, None] & n_in[None, :]
        offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
        gy = tl.load(gy_ptr + offs, mask=both, other=0.0)
        if NEED_BIAS:  # gz = dY * ia3_out in x's precision, as the dX GEMM sees it
            db += tl.sum(round_to(gy.to(tl.float32) * scale[None, :], gy_ptr.dtype.element_ty).to(tl.float32), axis=0)
        if NEED_SCALE:
            z = tl.load(z_ptr + offs, mask=both, other=0.0)
            ds += tl.sum(gy.to(tl.float32) * z.to(tl.float32), axis=0)
    if NEED_BIAS:
        tl.store(db_ptr + split.to(tl.int64) * N + rn, db, mask=n_in)
    if NEED_SCALE:
        tl.store(ds_ptr + split.to(tl.int64) * N + rn, ds, mask=n_in)


_prune = {"early_config_prune": _config.prune_configs}
_gemm = triton.autotune(configs=_config.GEMM_CONFIGS, key=["M", "N", "C"], reset_to_zero=["red_ptr"],
                        prune_configs_by=_prune)(fused_matmul_kernel)
_gemm_skinny = triton.autotune(configs=_config.SKINNY_CONFIGS, key=["M", "N", "C"],
                               prune_configs_by=_prune)(fused_matmul_kernel)
_matmul_tn = triton.autotune(configs=_config.TN_CONFIGS, key=["M", "P", "Q"],
                             prune_configs_by=_prune)(matmul_tn_kernel)
_bias_scale_grad = triton.autotune(configs=_config.REDUCE_CONFIGS, key=["M", "N"],
                                   prune_configs_by=_prune)(bias_scale_grad_kernel)

# Enough programs to fill an H100/H200 twice (132 SMs): row splits are chosen to reach it.
TARGET_PROGRAMS = 264
_IDENTITY: dict = {}


def identity(value: float, like: torch.Tensor) -> torch.Tensor:
    """A cached 1-element tensor holding ``value``, read with stride 0 where a vector is absent."""
    key = (value, like.dtype, like.device)
    if key not in _IDENTITY:
        _IDENTITY[key] = torch.full((1,), value, dtype=like.dtype, device=like.device)
    return _IDENTITY[key]


def fused_matmul(a, b, stride_bc, stride_bn, n, out, *, pro=None, bias=None, col=None, z=None, sparse=None,
                 lora=None, reduce_src=None, dropout=None, dropout_on="a", skinny=False, post=None):
    """out[M, n] = epilogue(prologue(a)[M, C] @ b[C, n]); returns the d_ia3_in partial sums or None.

    b is addressed through (stride_bc, stride_bn) so W^T, A^T, B and W need no copies.
    pro: [C] scale of a's columns.  bias / col: [n] epilogue add / scale.  z: buffer for the
    output before ``col``.  sparse: (segment pointer [n+1], contraction index, value) of the
    nonzeros grouped by output column.  lora: (lo [M, r], up, stride_upr, stride_upn, scale)
    adds scale * lo @ up.  reduce_src: [M, n]; returns fp32 partials whose sum over dim 0 is
    sum_m acc * reduce_src (acc before bias and col).  dropout: (key_lo, key_hi, threshold, 1/(1-p)) from ``_dropout``
    applied to a's tiles (``dropout_on="a"``) or to the LoRA term (``"lora"``).  post: [n] scale
    of the output after the LoRA add, before the bias (then z gets the output before ``post``).
    """
    m, c = a.shape
    if m == 0 or n == 0:  # nothing to launch (a zero-sized grid is not a launch)
        return torch.zeros(0, n, dtype=torch.float32, device=a.device) if reduce_src is not None else None
    key_lo, key_hi, threshold, inv_keep = dropout if dropout is not None else (0, 0, 0, 1.0)
    lo, up, stride_upr, stride_upn, lora_scale = lora if lora is not None else (out, out, 0, 0, 0.0)
    r = lo.shape[1] if lora is not None else 1
    seg, sp_idx, sp_val = sparse if sparse is not None else (out, out, out)
    red = None
    if reduce_src is not None:
        red = torch.zeros(triton.cdiv(m, _config.MIN_GEMM_BLOCK_M), n, dtype=torch.float32, device=a.device)
    bias_t = bias if bias is not None else identity(0.0, a)
    col_t = col if col is not None else identity(1.0, a)
    args = (a, b, out, m, n, c, a.stride(0), a.stride(1), stride_bc, stride_bn, out.stride(0),
            pro if pro is not None else a, bias_t, 1 if bias is not None else 0, col_t, 1 if col is not None else 0,
            post if post is not None else a,
            z if z is not None else out, 1 if z is not None else 0, seg, sp_idx, sp_val,
            lo, up, r, lo.stride(0), stride_upr, stride_upn, float(lora_scale),
            red if red is not None else out, reduce_src if reduce_src is not None else out,
            key_lo, key_hi, threshold, float(inv_keep))
    flags = dict(PRO_SCALE=pro is not None, A_DROPOUT=dropout is not None and dropout_on == "a",
                 SPARSE=sparse is not None, LORA=lora is not None,
                 LORA_DROPOUT=dropout is not None and dropout_on == "lora",
                 COL_REDUCE=reduce_src is not None, DOT_PRECISION=_config.dot_precision(a.dtype),
                 POST_SCALE=post is not None, BLOCK_R=_config.block_for(r))
    if skinny:
        block_n = _config.block_for(n, hi=128)
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, block_n),)  # noqa: E731
        _gemm_skinny[grid](*args, **flags, BLOCK_N=block_n, GROUP_M=1)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _gemm[grid](*args, **flags)
    return red


def _row_splits(m: int, tiles: int, block_m: int) -> tuple[int, int]:
    """(splits, rows_per_split): split the M contraction so tiles * splits fills the GPU."""
    splits = max(1, min(triton.cdiv(TARGET_PROGRAMS, max(tiles, 1)), triton.cdiv(m, block_m * 4)))
    rows = triton.cdiv(triton.cdiv(m, splits), 128) * 128
    return triton.cdiv(m, rows), rows


def matmul_tn(l, r, out_dtype, *, scale=1.0, l_scale=None, r_scale=None, dropout=None):  # noqa: E741 (l, r: the math)
    """scale * (l * l_scale)^T @ (r * r_scale * mask), [P, Q] in ``out_dtype`` (fp32 accumulation).

    l [M, P] and r [M, Q] are row-major (unit column stride); mask is the dropout keep-mask of r
    viewed as x [M, Q] when ``dropout`` is given.
    """
    m, p = l.shape
    q = r.shape[1]
    if m == 0 or p == 0 or q == 0:
        return torch.zeros(p, q, dtype=out_dtype, device=l.device)
    block_p, block_q = _config.block_for(p, hi=128), _config.block_for(q, hi=128)
    tiles = triton.cdiv(p, block_p) * triton.cdiv(q, block_q)
    splits, rows = _row_splits(m, tiles, 64)
    # One slice: store the final dtype directly; several: fp32 slices summed here.
    out = torch.empty(splits, p, q, dtype=out_dtype if splits == 1 else torch.float32, device=l.device)
    key_lo, key_hi, threshold, inv_keep = dropout if dropout is not None else (0, 0, 0, 1.0)
    _matmul_tn[(tiles, splits)](
        l, r, out, m, p, q, l.stride(0), r.stride(0), rows, float(scale),
        l_scale if l_scale is not None else l, r_scale if r_scale is not None else r, key_lo, key_hi,
        threshold, float(inv_keep), L_SCALE=l_scale is not None, R_SCALE=r_scale is not None,
        R_DROPOUT=dropout is not None, DOT_PRECISION=_config.dot_precision(l.dtype), BLOCK_P=block_p,
        BLOCK_Q=block_q)
    return out[0] if splits == 1 else out.sum(0).to(out_dtype)


def bias_scale_grad(grad_y, z, scale, need_bias: bool, need_scale: bool):
    """(sum_m dY * scale, sum_m dY * z) in fp32, each None when not needed."""
    m, n = grad_y.shape
    if m == 0 or n == 0:
        zeros = torch.zeros(n, dtype=torch.float32, device=grad_y.device)
        return (zeros if need_bias else None), (zeros.clone() if need_scale else None)
    splits, rows = _row_splits(m, triton.cdiv(n, 128), 64)
    db = torch.empty(splits, n, dtype=torch.float32, device=grad_y.device) if need_bias else None
    ds = torch.empty(splits, n, dtype=torch.float32, device=grad_y.device) if need_scale else None
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
    _bias_scale_grad[grid](
        grad_y, z if need_scale else grad_y, scale if scale is not None else identity(1.0, grad_y),
        1 if scale is not None else 0, db if need_bias else grad_y, ds if need_scale else grad_y, m, n, rows,
        NEED_BIAS=need_bias, NEED_SCALE=need_scale)
    return (db.sum(0) if need_bias else None), (ds.sum(0) if need_scale else None)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time variants: every flag combination the backend launches (fastpeft.core.backends.triton).

def _gemm_signature(x, ad, b_dtype, flags):
    """Argument types of fused_matmul_kernel as the backend passes them (absent vectors: x's type)."""
    sig = {"a_ptr": x, "b_ptr": b_dtype, "out_ptr": x, "M": "i32", "N": "i32", "C": "i32",
           "stride_am": "i32", "stride_ac": "i32", "stride_bc": "i32", "stride_bn": "i32", "stride_om": "i32",
           "pro_ptr": ad if flags["PRO_SCALE"] else x, "bias_ptr": ad, "stride_bias": "i32", "col_ptr": ad,
           "stride_col": "i32", "post_ptr": ad if flags["POST_SCALE"] else x, "z_ptr": x, "save_z": "i32",
           "seg_ptr": "*i64" if flags["SPARSE"] else x, "sp_idx_ptr": "*i64" if flags["SPARSE"] else x,
           "sp_val_ptr": ad if flags["SPARSE"] else x, "lo_ptr": x, "up_ptr": ad if flags["LORA"] else x,
           "R": "i32", "stride_lom": "i32", "stride_upr": "i32", "stride_upn": "i32", "lora_scale": "fp32",
           "red_ptr": "*fp32" if flags["COL_REDUCE"] else x, "red_src_ptr": x,
           "key_lo": "i32", "key_hi": "i32", "threshold": "i32", "inv_keep": "fp32"}
    return sig


def _config_tag(cfg):
    blocks = "x".join(f"{k.split('_')[-1]}{v}" for k, v in cfg.kwargs.items())
    return f"{blocks}/w{cfg.num_warps}/s{cfg.num_stages}"


def _variant(name, fn, sig, flags, cfg, extra=None):
    const = {**flags, **cfg.kwargs, **(extra or {})}
    sig = dict(sig)
    for key in const:
        sig[key] = "constexpr"
    tag = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in flags.items())
    return _config.Variant(f"{name}[{tag},{_config_tag(cfg)}]", fn, sig, const, cfg.num_warps, cfg.num_stages)


def aot_variants(x_dtype: str, adapter_dtype: str, precision: str, full: bool = True):
    """Compiled forms of the GEMM kernels for one dtype pairing and fp32 dot precision.

    ``full``: every flag combination the backend launches with the first usable config of its
    autotune list, plus every usable config with the heaviest combination (all epilogue paths
    on: the most registers and shared memory).  Otherwise only the heaviest combination of each
    kernel with its first config (every code path compiled once).
    """
    x, ad = f"*{x_dtype}", f"*{adapter_dtype}"
    elem = 4 if x_dtype == "fp32" else 2

    def pick(configs, heaviest, **blocks):
        usable = _config.usable_configs(configs, elem, **blocks)
        return usable if (heaviest and full) else usable[:1]

    def gemm_flags(pro, a_drop, sparse, lora, lora_drop, reduce, post=False):
        return dict(PRO_SCALE=pro, A_DROPOUT=a_drop, SPARSE=sparse, LORA=lora, LORA_DROPOUT=lora_drop,
                    COL_REDUCE=reduce, DOT_PRECISION=precision, POST_SCALE=post)

    # Forward main GEMM (reduce and LoRA dropout off) and dX GEMM: together every combination.
    heaviest = gemm_flags(True, False, True, True, True, True, True)
    combos = [gemm_flags(pro, False, sparse, lora, lora_drop, reduce)
              for pro in (False, True) for sparse in (False, True) for reduce in (False, True)
              for lora, lora_drop in ((False, False), (True, False), (True, True))]
    # DoRA's forward: the output scale after the LoRA add (fastpeft.core.backends.triton).
    combos += [gemm_flags(pro, False, sparse, True, False, False, True) for pro in (False, True)
               for sparse in (False, True)]
    for flags in (combos if full else [heaviest]):
        for cfg in pick(_config.GEMM_CONFIGS, flags == heaviest):
            yield _variant("fused_matmul", fused_matmul_kernel, _gemm_signature(x, ad, x, flags), flags, cfg,
                           {"BLOCK_R": 64 if flags["LORA"] else 16})
    # r-wide passes: xa = dropout(x) A^T and gyb = dY B (b is the adapter), at r = 16 and 64.
    for a_drop in ((False, True) if full else (True,)):
        flags = gemm_flags(False, a_drop, False, False, False, False)
        for block_n in ((16, 64) if full else (64,)):
            for cfg in pick(_config.SKINNY_CONFIGS, a_drop and block_n == 64, BLOCK_N=block_n):
                yield _variant(f"fused_matmul_rank{block_n}", fused_matmul_kernel,
                               _gemm_signature(x, ad, ad, flags), flags, cfg,
                               {"BLOCK_N": block_n, "GROUP_M": 1, "BLOCK_R": 16})
    # Contractions over M: dB (plain), dA (dropout on x), dW (ia3 scales on either side).
    tn_combos = ((False, False, False), (False, False, True), (True, False, False), (False, True, False),
                 (True, True, False))
    for ls, rs, drop in (tn_combos if full else ((True, True, True),)):
        flags = dict(L_SCALE=ls, R_SCALE=rs, R_DROPOUT=drop, DOT_PRECISION=precision)
        sig = {"l_ptr": x, "r_ptr": x, "out_ptr": x, "M": "i32", "P": "i32", "Q": "i32", "stride_lm": "i32",
               "stride_rm": "i32", "rows_per_split": "i32", "scale": "fp32", "ls_ptr": ad if ls else x,
               "rs_ptr": ad if rs else x, "key_lo": "i32", "key_hi": "i32", "threshold": "i32",
               "inv_keep": "fp32"}
        blocks = [(16, 128), (128, 16)] if not (ls or rs) else [(128, 128)]
        for block_p, block_q in blocks:
            for cfg in pick(_config.TN_CONFIGS, ls and rs, BLOCK_P=block_p, BLOCK_Q=block_q):
                yield _variant(f"matmul_tn_{block_p}x{block_q}", matmul_tn_kernel, sig, flags, cfg,
                               {"BLOCK_P": block_p, "BLOCK_Q": block_q})
    for need_bias, need_scale in (((True, False), (False, True), (True, True)) if full else ((True, True),)):
        flags = dict(NEED_BIAS=need_bias, NEED_SCALE=need_scale)
        sig = {"gy_ptr": x, "z_ptr": x, "scale_ptr": ad, "stride_scale": "i32", "db_ptr": "*fp32" if need_bias else x,
               "ds_ptr": "*fp32" if need_scale else x, "M": "i32", "N": "i32", "rows_per_split": "i32"}
        for cfg in pick(_config.REDUCE_CONFIGS, need_bias and need_scale):
            yield _variant("bias_scale_grad", bias_scale_grad_kernel, sig, flags, cfg)
