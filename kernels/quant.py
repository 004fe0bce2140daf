"""GEMMs with a quantized weight, dequantized inside the contraction loop (fastpeft.quant formats).

    forward  out[M, N] = a[M, K] @ W^T     (a = x,  TRANS_W)
    dX       out[M, K] = a[M, N] @ W       (a = dY)

W [N, K] is never materialised: each [BLOCK_C, BLOCK_N] tile of W is decoded in registers from
its quantized form, for element (r, c) of W at flat index e = r * K + c:

    nf4   byte = packed[e >> 1];  code = e even ? byte >> 4 : byte & 15        (bnb's nibble order)
          w = NF4[code] * absmax[e // blocksize]      absmax double-quantized when NESTED:
          absmax[b] = (absmax_code[absmax_q[b]] * absmax2[b // absmax_blocksize]) + absmax_offset
    int8  w = (CB[r, c] * SCB[r]) * 7.874015718698502e-3

then rounded to the weight's dtype (W_DTYPE) and to a's, exactly as ``QuantizedWeight.dequantize()``
(the kernels launch with fp fusion off, so the absmax product and sum round separately, as
bitsandbytes).  The blocking follows fused_linear.fused_matmul_kernel (grouped tile order, fp32
accumulation, one store per tile).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.kernels import config as _config
from fastpeft.kernels._math import dot_acc, grouped_tile, round_to

INV_127 = 7.874015718698502e-3
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _nf4_scale(blk, mask, absmax_ptr, absmax2_ptr, absmax_code_ptr, absmax_offset_ptr, absmax_blocksize,
               NESTED: tl.constexpr):
    # the fp32 absmax of blocks `blk`: stored, or decoded from its 8-bit code
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        c = tl.load(absmax_code_ptr + q)
        s2 = tl.load(absmax2_ptr + blk // absmax_blocksize, mask=mask, other=0.0)
        return c * s2 + tl.load(absmax_offset_ptr)
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def _nf4_codes(byte_lo_hi_ptrs, mask, code_ptr):
    # (the high-nibble values, the low-nibble values) of the bytes at the pointers
    byte = tl.load(byte_lo_hi_ptrs, mask=mask, other=0)
    hi = tl.load(code_ptr + (byte >> 4).to(tl.int32))
    lo = tl.load(code_ptr + (byte & 15).to(tl.int32))
    return hi, lo


@triton.jit
def quant_matmul_kernel(
    a_ptr, data_ptr, scale_ptr, absmax2_ptr, absmax_code_ptr, absmax_offset_ptr, code_ptr, out_ptr,
    M, N, C, stride_am, stride_ac, stride_om, WK, blocksize, absmax_blocksize,
    FORMAT: tl.constexpr,  # 0: nf4 (data = packed, scale = absmax), 1: int8 (data = CB, scale = SCB)
    NESTED: tl.constexpr, TRANS_W: tl.constexpr, ALIGNED: tl.constexpr, W_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # out[M, N] = a[M, C] @ B[C, N], B = W^T (TRANS_W: W is [N, C]) or W (W is [C, N]); W's rows are WK long.
    # ALIGNED (nf4): WK % blocksize == 0 and blocksize % (BLOCK_C if TRANS_W else BLOCK_N) == 0, so a
    # tile's segment of each W row lies in one quantization block and starts on a byte: the tile
    # loads bytes (two codes each) and one absmax per W row.
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in = rm < M
    n_in = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = tl.where(n_in, rn, 0).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    a_ptrs = a_ptr + tl.where(m_in, rm64, 0)[:, None] * stride_am + offs_c[None, :] * stride_ac

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        rc = c0 + offs_c
        c_in = rc < C
        a = tl.load(a_ptrs, mask=c_in[None, :], other=0.0)
        w_in = c_in[:, None] & n_in[None, :]
        rc64 = tl.where(c_in, rc, 0).to(tl.int64)
        if FORMAT == 1:  # int8: one scale per W row
            if TRANS_W:
                row = rn64[None, :]
                e = row * WK + rc64[:, None]
                s = tl.load(scale_ptr + row, mask=n_in[None, :], other=0.0)
            else:
                row = rc64[:, None]
                e = row * WK + rn64[None, :]
                s = tl.load(scale_ptr + row, mask=c_in[:, None], other=0.0)
            cb = tl.load(data_ptr + e, mask=w_in, other=0)
            w = (cb.to(tl.float32) * s) * 7.874015718698502e-3
        elif ALIGNED:
            half = tl.arange(0, BLOCK_C // 2) if TRANS_W else tl.arange(0, BLOCK_N // 2)
            if TRANS_W:  # W[n, c0 + 2h], W[n, c0 + 2h + 1] share byte n * WK/2 + c0/2 + h
                h_in = (c0 + 2 * half) < C
                ptrs = data_ptr + rn64[None, :] * (WK // 2) + (c0 // 2 + half)[:, None]
                hi, lo = _nf4_codes(ptrs, h_in[:, None] & n_in[None, :], code_ptr)
                v = tl.reshape(tl.permute(tl.join(hi, lo), (0, 2, 1)), (BLOCK_C, BLOCK_N))
                blk = rn64 * (WK // blocksize) + c0 // blocksize
                s = _nf4_scale(blk, n_in, scale_ptr, absmax2_ptr, absmax_code_ptr, absmax_offset_ptr,
                               absmax_blocksize, NESTED)[None, :]
            else:  # W[c, n0 + 2h], W[c, n0 + 2h + 1] share byte c * WK/2 + n0/2 + h
                n0 = pid_n * BLOCK_N
                h_in = (n0 + 2 * half) < N
                ptrs = data_ptr + rc64[:, None] * (WK // 2) + (n0 // 2 + half)[None, :]
                hi, lo = _nf4_codes(ptrs, c_in[:, None] & h_in[None, :], code_ptr)
                v = tl.reshape(tl.join(hi, lo), (BLOCK_C, BLOCK_N))
                blk = rc64 * (WK // blocksize) + n0 // blocksize
                s = _nf4_scale(blk, c_in, scale_ptr, absmax2_ptr, absmax_code_ptr, absmax_offset_ptr,
                               absmax_blocksize, NESTED)[:, None]
            w = v * s
        else:  # any layout: element (r, c) of W at flat index e = r * WK + c
            if TRANS_W:
                e = rn64[None, :] * WK + rc64[:, None]
            else:
                e = rc64[:, None] * WK + rn64[None, :]
            byte = tl.load(data_ptr + (e >> 1), mask=w_in, other=0)
            shift = ((1 - (e & 1)) * 4).to(tl.uint8)
            v = tl.load(code_ptr + ((byte >> shift) & 15).to(tl.int32))
            s = _nf4_scale(e // blocksize, w_in, scale_ptr, absmax2_ptr, absmax_code_ptr, absmax_offset_ptr,
                           absmax_blocksize, NESTED)
            w = v * s
        b = round_to(round_to(tl.where(w_in, w, 0.0), W_DTYPE), a_ptr.dtype.element_ty)
        acc = dot_acc(a, b, acc, DOT_PRECISION)
        a_ptrs += BLOCK_C * stride_ac

    out_mask = m_in[:, None] & n_in[None, :]
    tl.store(out_ptr + rm64[:, None] * stride_om + rn[None, :], round_to(acc, out_ptr.dtype.element_ty), mask=out_mask)


def _aligned(args) -> bool:
    """The ALIGNED heuristic (see quant_matmul_kernel), from the launch arguments and the config."""
    if args["FORMAT"] != 0:
        return False
    bs, wk = args["blocksize"], args["WK"]
    tile = args["BLOCK_C"] if args["TRANS_W"] else args["BLOCK_N"]
    return wk % bs == 0 and bs % tile == 0


# Block configs (BLOCK_M, BLOCK_N, BLOCK_C, warps, stages), each compiled for sm_80 and sm_90 with
# every path (nf4 aligned / any layout, double quant, int8; forward and dX) without a register
# spill or a stack frame (tests/test_quant_kernels.py).  Decoding a tile in registers costs what a
# shared-memory operand would not, so the tiles are smaller than fused_matmul's.
if _config.INTERPRET:
    FP32_CONFIGS = HALF_CONFIGS = [triton.Config(dict(BLOCK_M=16, BLOCK_N=16, BLOCK_C=16, GROUP_M=2), num_warps=1,
                                                 num_stages=1)]
else:
    FP32_CONFIGS = [triton.Config(dict(BLOCK_M=128, BLOCK_N=64, BLOCK_C=32, GROUP_M=8), num_warps=8, num_stages=3),
                    triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_C=32, GROUP_M=8), num_warps=8, num_stages=3)]
    HALF_CONFIGS = [triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_C=64, GROUP_M=8), num_warps=8, num_stages=3),
                    triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_C=32, GROUP_M=8), num_warps=4, num_stages=3)]


def _prune_first(configs, named_args, **kwargs):
    return configs if _config.AUTOTUNE else configs[:1]


_KEY = ["M", "N", "C", "FORMAT", "NESTED", "TRANS_W", "blocksize"]
_kernel = triton.heuristics({"ALIGNED": _aligned})(quant_matmul_kernel)
_PRUNE = {"early_config_prune": _prune_first}
_quant_matmul = {4: triton.autotune(configs=FP32_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)(_kernel),
                 2: triton.autotune(configs=HALF_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)(_kernel)}

_CODES: dict = {}


def _nf4_code(device) -> torch.Tensor:
    from fastpeft.quant.nf4 import NF4_CODE

    key = torch.device(device)
    if key not in _CODES:
        _CODES[key] = NF4_CODE.to(key)
    return _CODES[key]


def quant_matmul(a: torch.Tensor, qw, transpose: bool) -> torch.Tensor:
    """a [M, C] @ W^T (``transpose``: C = K, out [M, N]) or a @ W (C = N, out [M, K]), a's dtype.

    qw is a ``fastpeft.quant.QuantizedWeight`` on a's device; a is 2-D with any strides.
    """
    n_w, k_w = qw.shape
    m, c = a.shape
    out_n = n_w if transpose else k_w
    if c != (k_w if transpose else n_w):
        raise ValueError(f"a must be [M, {k_w if transpose else n_w}] for a {list(qw.shape)} weight, "
                         f"got {list(a.shape)}")
    out = torch.empty(m, out_n, dtype=a.dtype, device=a.device)
    if m == 0 or out_n == 0:
        return out
    if c == 0:
        return out.zero_()
    t = qw.tensors()
    if qw.format == "nf4":
        fmt, data, scale = 0, t["packed"], t["absmax"]
        nested = qw.double_quant
        absmax2 = t["absmax2"] if nested else scale
        code2 = t["absmax_code"] if nested else scale
        offset = t["absmax_offset"] if nested else scale  # read on the device: no host sync
        blocksize, absmax_blocksize = qw.blocksize, qw.absmax_blocksize or 256
    else:
        fmt, data, scale, nested = 1, t["CB"], t["SCB"], False
        absmax2 = code2 = offset = scale
        blocksize, absmax_blocksize = 1, 1
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(out_n, meta["BLOCK_N"]),)  # noqa: E731
    _quant_matmul[a.element_size()][grid](
        a, data, scale, absmax2, code2, offset, _nf4_code(a.device), out, m, out_n, c, a.stride(0), a.stride(1),
        out.stride(0), k_w, blocksize, absmax_blocksize, FORMAT=fmt, NESTED=nested, TRANS_W=transpose,
        W_DTYPE=_TL_DTYPE[qw.dtype], DOT_PRECISION=_config.dot_precision(a.dtype), enable_fp_fusion=False)
    return out


def quant_linear(x: torch.Tensor, qw) -> torch.Tensor:
    """y = x @ W^T for x [..., K]."""
    lead = x.shape[:-1]
    return quant_matmul(x.reshape(-1, qw.shape[1]), qw, True).reshape(*lead, qw.shape[0])


def quant_linear_grad_input(grad_y: torch.Tensor, qw) -> torch.Tensor:
    """dX = grad_y @ W for grad_y [..., N]."""
    lead = grad_y.shape[:-1]
    return quant_matmul(grad_y.reshape(-1, qw.shape[0]), qw, False).reshape(*lead, qw.shape[1])


# ---------------------------------------------------------------------------------------------
# Ahead-of-time variants

def aot_variants(x_dtype: str, precision: str = "ieee", full: bool = True):
    """Compiled forms of quant_matmul_kernel for x of ``x_dtype`` ("fp32", "bf16", "fp16").

    Each is a ``_config.Variant``; compile it with ``options={"enable_fp_fusion": False}`` (as the
    launches do).  Paths: nf4 with double quant on the aligned and the any-layout path, plain nf4
    aligned, and int8; each forward and dX, the weight dequantizing to x's dtype.  ``full``: with
    every config of the autotune list, else with the first.
    """
    x = f"*{x_dtype}"
    w_dtype = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}[x_dtype]
    configs = FP32_CONFIGS if x_dtype == "fp32" else HALF_CONFIGS
    paths = ((0, True, True), (0, True, False), (0, False, True), (1, False, False))
    for fmt, nested, aligned in paths:
        data, scale = ("*u8", "*u8" if nested else "*fp32") if fmt == 0 else ("*i8", "*fp32")
        sig = {"a_ptr": x, "data_ptr": data, "scale_ptr": scale, "absmax2_ptr": "*fp32", "absmax_code_ptr": "*fp32",
               "absmax_offset_ptr": "*fp32", "code_ptr": "*fp32", "out_ptr": x, "M": "i32", "N": "i32", "C": "i32",
               "stride_am": "i32", "stride_ac": "i32", "stride_om": "i32", "WK": "i32", "blocksize": "i32",
               "absmax_blocksize": "i32"}
        for trans in (True, False):
            flags = dict(FORMAT=fmt, NESTED=nested, TRANS_W=trans, ALIGNED=aligned, W_DTYPE=w_dtype,
                         DOT_PRECISION=precision)
            for cfg in (configs if full else configs[:1]):
                const = {**flags, **cfg.kwargs}
                s = dict(sig)
                for key in const:
                    s[key] = "constexpr"
                tag = ("nf4" if fmt == 0 else "int8") + ("-dq" if nested else "") + (",aligned" if aligned else "")
                blocks = "x".join(f"{k.split('_')[-1]}{v}" for k, v in cfg.kwargs.items())
                yield _config.Variant(f"quant_matmul[{tag},{'fwd' if trans else 'dx'},{blocks}/w{cfg.num_warps}"
                                      f"/s{cfg.num_stages}]<x={x_dtype}>", quant_matmul_kernel, s, const,
                                      cfg.num_warps, cfg.num_stages)
