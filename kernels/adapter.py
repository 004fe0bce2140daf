"""Triton kernels of the bottleneck adapter (fastpeft.methods.adapters): y = h + act(h W_dᵀ + b_d) W_uᵀ + b_u.

One blocked GEMM kernel, C = A·Bᵀ with A [M, K] and B [N, K] given by strides (so transposed
views cost nothing), carries every pass of forward and backward through constexpr flags:

    forward   a   = h·W_dᵀ + b_d ; g = act(a)          down GEMM, bias + activation epilogue (stores a too
                                                           when training: backward needs it, g is recomputed)
              y   = g·W_uᵀ + b_u + h                     up GEMM, bias + residual epilogue
    backward  da  = (dy·W_u) ⊙ act'(a)                   GEMM with an act' epilogue
              dh  = da·W_d + dy                          GEMM with a residual epilogue
              dW_u = dyᵀ·act(a),  db_u = Σ_m dy          act applied to B tiles as they load; the bias
              dW_d = daᵀ·h,       db_d = Σ_m da          gradient is the row sum of the A tiles the
                                                           first column of programs already reads

Accumulation is fp32 (fp64 for fp64 inputs); fp32 dots use IEEE precision so results meet the
1e-5 tolerance of DESIGN.md.  With TRITON_INTERPRET=1 the same kernels run on CPU tensors.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _act(x, ACT: tl.constexpr):
    # codes: 0 identity, 1 relu, 2 gelu (erf), 3 silu, 4 tanh (same as fastpeft.methods.adapters.ACTIVATIONS)
    if ACT == 1:
        x = tl.where(x < 0, 0.0, x)  # torch.relu: NaN stays NaN
    elif ACT == 2:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 3:
        x = x / (1.0 + tl.exp(-x))
    elif ACT == 4:
        # tanh(|x|) = (1 - e^{-2|x|}) / (1 + e^{-2|x|}): no overflow for large |x|
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        x = tl.where(x < 0, -t, t)
    return x


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    # act'(x): relu 1[not x <= 0] (torch's threshold_backward: NaN passes the gradient); gelu Φ(x) + x φ(x);
    # silu σ(1 + x(1-σ)); tanh 1 - tanh²
    if ACT == 1:
        d = tl.where(x <= 0, 0.0, 1.0)
    elif ACT == 2:
        d = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-x))
        d = s * (1.0 + x * (1.0 - s))
    elif ACT == 4:
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        d = 1.0 - t * t
    else:
        d = x * 0.0 + 1.0
    return d


def _configs():
    if INTERPRET:  # one config: the interpreter's cost is per program, bigger tiles mean fewer programs
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    ]


@triton.autotune(configs=_configs(), key=["M", "N", "K", "ACT", "HAS_BIAS", "HAS_RES", "ACT_GRAD", "ACT_ON_B"])
@triton.jit
def adapter_gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, res_ptr, pre_ptr, rowsum_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_rm, stride_rn, stride_pm, stride_pn,
    ACT: tl.constexpr,          # activation code
    HAS_BIAS: tl.constexpr,     # c += bias[n]
    ACT_OUT: tl.constexpr,      # c = act(c); with SAVE_PRE the value before act goes to pre
    SAVE_PRE: tl.constexpr,
    HAS_RES: tl.constexpr,      # c += res[m, n]
    ACT_GRAD: tl.constexpr,     # c *= act'(pre[m, n])
    ACT_ON_B: tl.constexpr,     # B tiles are pre-activations: use act(B)
    ROWSUM_A: tl.constexpr,     # rowsum[m] = Σ_k A[m, k], written by the programs of column 0
    ACC_F64: tl.constexpr,      # accumulate in fp64 (fp64 inputs)
    IEEE: tl.constexpr,         # fp32 dot in IEEE precision (not tf32)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # C[m, n] = Σ_k A[m, k] B[n, k] with the epilogues above, one BLOCK_M x BLOCK_N tile per program.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    acc_t = tl.float64 if ACC_F64 else tl.float32
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_t)
    rowsum = tl.zeros((BLOCK_M,), dtype=acc_t)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[None, :] * stride_bn + ks[:, None] * stride_bk,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if ACT_ON_B:
            b = _act(b.to(acc_t), ACT).to(a.dtype)
        if ROWSUM_A:
            rowsum += tl.sum(a.to(acc_t), axis=1)
        if ACC_F64:
            acc = tl.dot(a.to(tl.float64), b.to(tl.float64), acc)
        elif IEEE:
            # fp32 inputs, or half inputs under the interpreter (whose bf16 dot is wrong in triton 3.9):
            # half products are exact in fp32, so this is the half MMA's math with fp32 accumulation
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if ROWSUM_A:
        if pid_n == 0:
            tl.store(rowsum_ptr + offs_m, rowsum, mask=mask_m)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(acc_t)[None, :]
    if ACT_GRAD:
        pre = tl.load(pre_ptr + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn, mask=mask, other=0.0)
        acc = acc * _act_grad(pre.to(acc_t), ACT)
    if SAVE_PRE:
        tl.store(pre_ptr + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn,
                 acc.to(pre_ptr.dtype.element_ty), mask=mask)
    if ACT_OUT:
        # act of the value as stored (rounded to the output dtype), so backward's recomputation matches
        acc = _act(acc.to(c_ptr.dtype.element_ty).to(acc_t), ACT)
    if HAS_RES:
        acc += tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask,
                       other=0.0).to(acc_t)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=mask)


def gemm(a: torch.Tensor, b: torch.Tensor, *, out_dtype=None, bias=None, act: int = 0, act_out: bool = False,
         pre_out: bool = False, res=None, act_grad_of=None, act_on_b: bool = False, rowsum_a: bool = False):
    """C = A·Bᵀ (A [M, K], B [N, K], any strides) with the adapter epilogues; returns (C, pre, rowsum).

    bias [N] is added; act_out applies the activation ``act`` (and pre_out returns the value
    before it); res [M, N] is added last; act_grad_of [M, N] multiplies by act'(·); act_on_b uses
    act(B); rowsum_a also returns Σ_k A[m, k] in the accumulation dtype.
    """
    m, k = a.shape
    n = b.shape[0]
    acc_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    c = torch.empty(m, n, dtype=out_dtype or a.dtype, device=a.device)
    pre = torch.empty(m, n, dtype=a.dtype, device=a.device) if pre_out else None
    rowsum = torch.empty(m, dtype=acc_dtype, device=a.device) if rowsum_a else None
    if m == 0 or n == 0:
        return c, pre, rowsum
    bias = bias.contiguous() if bias is not None else None  # the epilogue reads it with unit stride
    side = pre if pre_out else act_grad_of
    dummy = c
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    adapter_gemm_kernel[grid](
        a, b, c, bias if bias is not None else dummy, res if res is not None else dummy,
        side if side is not None else dummy, rowsum if rowsum is not None else dummy,
        m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        res.stride(0) if res is not None else 0, res.stride(1) if res is not None else 0,
        side.stride(0) if side is not None else 0, side.stride(1) if side is not None else 0,
        ACT=act, HAS_BIAS=bias is not None, ACT_OUT=act_out, SAVE_PRE=pre_out, HAS_RES=res is not None,
        ACT_GRAD=act_grad_of is not None, ACT_ON_B=act_on_b, ROWSUM_A=rowsum_a,
        ACC_F64=a.dtype == torch.float64, IEEE=a.dtype == torch.float32 or INTERPRET,
    )
    return c, pre, rowsum


def adapter_forward(h, wd, bd, wu, bu, act: int, save_pre: bool):
    """(y, pre): y = h + act(h W_dᵀ + b_d) W_uᵀ + b_u on 2-D h; pre = h W_dᵀ + b_d when save_pre."""
    g, pre, _ = gemm(h, wd, bias=bd, act=act, act_out=True, pre_out=save_pre)
    y, _, _ = gemm(g, wu, bias=bu, res=h)
    return y, (pre if save_pre else h.new_empty(0))


def adapter_backward(dy, h, pre, wd, wu, act: int, needs):
    """[dh, dW_d, db_d, dW_u, db_u] (None where ``needs`` is False); weight grads in fp32 for half dy."""
    need_h, need_wd, need_bd, need_wu, need_bu = needs
    wide = torch.float64 if dy.dtype == torch.float64 else torch.float32
    m = dy.shape[0]
    dh = d_wd = d_bd = d_wu = d_bu = None
    if need_h or need_wd or need_bd:
        # da = (dy W_u) ⊙ act'(a): B = W_uᵀ viewed [m, d]
        da, _, _ = gemm(dy, wu.t(), act=act, act_grad_of=pre)
        if need_h:
            dh, _, _ = gemm(da, wd.t(), res=dy)
        if need_wd or need_bd:
            if m == 0:
                d_wd, d_bd = wd.new_zeros(wd.shape, dtype=wide), wd.new_zeros(wd.shape[0], dtype=wide)
            elif need_wd:
                # dW_d = daᵀ h: A = daᵀ [m_b, M], B = hᵀ [d, M]; row sums of daᵀ are db_d
                d_wd, _, d_bd = gemm(da.t(), h.t(), out_dtype=wide, rowsum_a=need_bd)
            else:  # only the bias trains (h was not saved): a plain reduction
                d_bd = da.sum(0, dtype=wide)
            d_wd = d_wd if need_wd else None
            d_bd = d_bd if need_bd else None
    if need_wu or need_bu:
        if m == 0:
            d_wu, d_bu = wu.new_zeros(wu.shape, dtype=wide), wu.new_zeros(wu.shape[0], dtype=wide)
        else:
            # dW_u = dyᵀ act(a): A = dyᵀ [d, M], B = aᵀ [m_b, M] with act on its tiles; row sums are db_u
            d_wu, _, d_bu = gemm(dy.t(), pre.t(), out_dtype=wide, act=act, act_on_b=True, rowsum_a=need_bu)
        d_wu = d_wu if need_wu else None
        d_bu = d_bu if need_bu else None
    return [dh, d_wd, d_bd, d_wu, d_bu]


# ----------------------------------------------------------------------------- ahead-of-time compile
# The flag combinations forward and backward launch (activation: gelu, the one with most code).
VARIANTS = {
    "down_fwd": dict(ACT=2, HAS_BIAS=True, ACT_OUT=True, SAVE_PRE=True),
    "up_fwd": dict(HAS_BIAS=True, HAS_RES=True),
    "act_grad": dict(ACT=2, ACT_GRAD=True),
    "dh": dict(HAS_RES=True),
    "wd_grad": dict(ROWSUM_A=True),
    "wu_grad": dict(ACT=2, ACT_ON_B=True, ROWSUM_A=True),
}
_FLAGS = ("ACT", "HAS_BIAS", "ACT_OUT", "SAVE_PRE", "HAS_RES", "ACT_GRAD", "ACT_ON_B", "ROWSUM_A")


def aot_compile(capabilities=(80, 90), variants=None, dtypes=("bf16", "fp16", "fp32")) -> list[str]:
    """Compile kernel variants for CUDA targets without a GPU (``triton.compile`` + ``GPUTarget``).

    dtypes: any of "bf16", "fp16", "fp32", "fp64".

    Needs TRITON_INTERPRET unset.  Returns "variant/dtype/sm_XX" for each compiled kernel and raises
    on the first compile error.  Used by ``fastpeft check --compile`` and the tests.
    """
    if INTERPRET:
        raise RuntimeError("aot_compile needs TRITON_INTERPRET unset (the interpreter does not compile)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = adapter_gemm_kernel.fn  # the jit function under the autotuner
    done = []
    for name in variants or VARIANTS:
        flags = {f: 0 if f == "ACT" else False for f in _FLAGS} | VARIANTS[name]
        for dt in dtypes:
            sig = {p: f"*{dt}" for p in ("a_ptr", "b_ptr", "c_ptr", "bias_ptr", "res_ptr", "pre_ptr")}
            sig["rowsum_ptr"] = "*fp64" if dt == "fp64" else "*fp32"
            for p in ("M", "N", "K", "stride_am", "stride_ak", "stride_bn", "stride_bk", "stride_cm", "stride_cn",
                      "stride_rm", "stride_rn", "stride_pm", "stride_pn"):
                sig[p] = "i32"
            consts = dict(flags, ACC_F64=dt == "fp64", IEEE=dt == "fp32", BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
            sig.update({c: "constexpr" for c in consts})
            for cc in capabilities:
                triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", cc, 32))
                done.append(f"{name}/{dt}/sm_{cc}")
    return done
