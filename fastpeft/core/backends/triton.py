"""Triton backend: the fused op as a handful of kernel launches (kernels in ``fastpeft.kernels``).

Forward (x is [M, K], W is [N, K], r the LoRA rank):
    xa = dropout(x) A^T                    one r-wide pass over x, mask generated in-kernel
    y  = epilogue(prologue(x) W^T)         one GEMM: ia3_in on x tiles, then + h S^T, + bias,
                                           (z stored if ia3_out trains), * ia3_out, + s * xa B^T
Backward:
    d_bias, d_ia3_out                      one column reduction over dY (and z)
    gyb = dY B                             one r-wide pass over dY
    dX = ((dY * ia3_out) W + gz S) * ia3_in + s * (gyb A) * mask / (1-p)
                                           one GEMM; d_ia3_in as partial sums in its epilogue
    dA = s * gyb^T x~,  dB = s * dY^T xa   contractions over M with rank-sized outputs
    dW = gz^T h (only if W trains),  d sparse_value = SDDMM over the mask (O(nnz))
Nothing is saved here: ``fastpeft.core.ops`` decides what autograd keeps, and the dropout mask is
regenerated from the seed.  On CPU tensors this runs under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from fastpeft.kernels import _config
from fastpeft.kernels.fused_linear import bias_scale_grad, fused_matmul, matmul_tn
from fastpeft.kernels.sparse import csc, csr, sddmm
from fastpeft.kernels.dropout import mask_args
from fastpeft.core.backends import Backend

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _unavailable() -> Optional[str]:
    if _config.INTERPRET or torch.cuda.is_available():
        return None
    return ("Triton kernels need a CUDA device, and none is visible; set TRITON_INTERPRET=1 before "
            "importing fastpeft to run them on CPU tensors with Triton's interpreter")


def _device_error(device) -> Optional[str]:
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is visible to torch"
    if device.type == "cpu":
        if _config.INTERPRET:
            return None
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            return ("TRITON_INTERPRET=1 was set after fastpeft's Triton kernels were imported; set it "
                    "before importing fastpeft")
        return "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing fastpeft"
    return f"Triton kernels run on CUDA devices (or CPU under TRITON_INTERPRET=1), not {device.type}"


def _dropout(p: float, seed: int):
    """(k0, k1, threshold, 1/(1-p)) for the kernels (fastpeft.kernels.dropout.mask_args), or None
    without dropout."""
    if p == 0.0:
        return None
    return (*mask_args(int(seed), p), 1.0 / (1.0 - p))


def _vec(t):
    return t.contiguous() if t is not None else None


def forward(x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value,
            lora_scale, p, seed, save_z):
    m, k = x.shape
    n = weight.shape[0]
    y = x.new_empty(m, n)
    z = x.new_empty(m, n) if save_z else x.new_empty(0)
    xa = x.new_empty(m, lora_A.shape[0]) if lora_A is not None else x.new_empty(0)
    if m == 0:
        return y, xa, z
    if n == 0:  # no outputs: nothing reads xa but dB, which is empty too
        return y, xa.zero_(), z
    lora = None
    if lora_A is not None:
        # xa[m, j] = sum_k x~[m, k] A[j, k]: b[c, n] = A[n, c]
        fused_matmul(x, lora_A, lora_A.stride(1), lora_A.stride(0), lora_A.shape[0], xa,
                     dropout=_dropout(p, seed), dropout_on="a", skinny=True)
        lora = (xa, lora_B, lora_B.stride(1), lora_B.stride(0), lora_scale)  # up[j, n] = B[n, j]
    sparse = csr(sparse_index, _vec(sparse_value), n, k) if sparse_index is not None else None
    fused_matmul(x, weight, weight.stride(1), weight.stride(0), n, y, pro=_vec(ia3_in), bias=_vec(bias),
                 col=_vec(ia3_out), z=z if save_z else None, sparse=sparse, lora=lora)
    return y, xa, z


def backward(grad_y, x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value,
             xa, z, lora_scale, p, seed, needs):
    need_x, need_w, need_b, need_a, need_bb, need_in, need_out, need_val = needs
    m, n = grad_y.shape
    k = weight.shape[1]
    gx = gw = gb = ga = gbb = gin = gout = gval = None
    if m == 0:  # empty batch: every parameter gradient is zero, dX is empty
        zeros = [torch.zeros_like(t) if need and t is not None else None
                 for t, need in zip((weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_value), needs[1:])]
        return (grad_y.new_empty(0, k) if need_x else None, *zeros)
    ia3_in, ia3_out, bias = _vec(ia3_in), _vec(ia3_out), _vec(bias)
    drop = _dropout(p, seed)
    if need_b or need_out:
        db, ds = bias_scale_grad(grad_y, z, ia3_out, need_b, need_out)
        gb = db.to(bias.dtype) if need_b else None
        gout = ds.to(ia3_out.dtype) if need_out else None
    if need_w:
        gw = matmul_tn(grad_y, x, weight.dtype, l_scale=ia3_out, r_scale=ia3_in)
    if need_val:
        gval = sddmm(grad_y, x, sparse_index, n, k, ia3_out, ia3_in).to(sparse_value.dtype)
    gyb = None
    if lora_A is not None and (need_x or need_a):
        r = lora_A.shape[0]
        gyb = grad_y.new_empty(m, r)  # the rank-sized intermediate dA and dX share
        fused_matmul(grad_y, lora_B, lora_B.stride(0), lora_B.stride(1), r, gyb, skinny=True)
    if need_bb:
        gbb = matmul_tn(grad_y, xa, lora_B.dtype, scale=lora_scale)
    if need_a:
        ga = matmul_tn(gyb, x, lora_A.dtype, scale=lora_scale, dropout=drop)
    if need_x or need_in:
        dx = grad_y.new_empty(m, k)
        with_lora = lora_A is not None and need_x
        lora = (gyb, lora_A, lora_A.stride(0), lora_A.stride(1), lora_scale) if with_lora else None
        sparse = csc(sparse_index, _vec(sparse_value), n, k) if sparse_index is not None else None
        red = fused_matmul(grad_y, weight, weight.stride(0), weight.stride(1), k, dx, pro=ia3_out, col=ia3_in,
                           sparse=sparse, lora=lora, reduce_src=x if need_in else None,
                           dropout=drop if with_lora else None, dropout_on="lora")
        if need_in:
            gin = red.sum(0).to(ia3_in.dtype)
        gx = dx if need_x else None
    return gx, gw, gb, ga, gbb, gin, gout, gval


BACKEND = Backend(
    name="triton",
    forward=forward,
    backward=backward,
    unavailable=_unavailable,
    device_error=_device_error,
    dtypes=DTYPES,
)
