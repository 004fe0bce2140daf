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

from fastpeft.core.backends.base import Backend
from fastpeft.core.spec import Grads
from fastpeft.kernels import config as _config
from fastpeft.kernels.dropout import mask_args
from fastpeft.kernels.fused_linear import bias_scale_grad, fused_matmul, matmul_tn
from fastpeft.kernels.sparse import csc, csr, sddmm

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


def forward(a, save_z):
    m, k = a.x.shape
    n = a.weight.shape[0]
    y = a.x.new_empty(m, n)
    z = a.x.new_empty(m, n) if save_z else a.x.new_empty(0)
    xa = a.x.new_empty(m, a.lora_A.shape[0]) if a.lora_A is not None else a.x.new_empty(0)
    if m == 0:
        return y, xa, z
    if n == 0:  # no outputs: nothing reads xa but dB, which is empty too
        return y, xa.zero_(), z
    lora = None
    if a.lora_A is not None:
        # xa[m, j] = sum_k x~[m, k] A[j, k]: b[c, n] = A[n, c]
        fused_matmul(a.x, a.lora_A, a.lora_A.stride(1), a.lora_A.stride(0), a.lora_A.shape[0], xa,
                     dropout=_dropout(a.p, a.seed), dropout_on="a", skinny=True)
        lora = (xa, a.lora_B, a.lora_B.stride(1), a.lora_B.stride(0), a.lora_scale)  # up[j, n] = B[n, j]
    sparse = csr(a.sparse_index, _vec(a.sparse_value), n, k) if a.sparse_index is not None else None
    # With dora_scale c: y = c * u + bias in the epilogue after the LoRA add (z gets u).
    fused_matmul(a.x, a.weight, a.weight.stride(1), a.weight.stride(0), n, y, pro=_vec(a.ia3_in),
                 bias=_vec(a.bias), col=_vec(a.ia3_out), z=z if save_z else None, sparse=sparse, lora=lora,
                 post=_vec(a.dora_scale))
    return y, xa, z


def backward(grad_y, a, xa, z, needs):
    m, n = grad_y.shape
    k = a.weight.shape[1]
    gx = gw = gb = ga = gbb = gin = gout = gval = None
    if m == 0:  # empty batch: every parameter gradient is zero, dX is empty
        return Grads._make(grad_y.new_empty(0, k) if name == "x" else torch.zeros_like(getattr(a, name))
                           if need else None for name, need in zip(Grads._fields, needs))
    a = a._replace(ia3_in=_vec(a.ia3_in), ia3_out=_vec(a.ia3_out), bias=_vec(a.bias))
    drop = _dropout(a.p, a.seed)
    gc = None
    if a.dora_scale is not None:
        # y = c * u + bias: dc = sum gy * u and d bias = sum gy in one reduction; the rest reads c * gy.
        if needs.bias or needs.dora_scale:
            db, dc = bias_scale_grad(grad_y, z, None, needs.bias, needs.dora_scale)
            gb = db.to(a.bias.dtype) if needs.bias else None
            gc = dc.to(a.dora_scale.dtype) if needs.dora_scale else None
        grad_y = grad_y * a.dora_scale.to(grad_y.dtype)
        needs = needs._replace(bias=False)
    if needs.bias or needs.ia3_out:
        db, ds = bias_scale_grad(grad_y, z, a.ia3_out, needs.bias, needs.ia3_out)
        gb = db.to(a.bias.dtype) if needs.bias else None
        gout = ds.to(a.ia3_out.dtype) if needs.ia3_out else None
    if needs.weight:
        gw = matmul_tn(grad_y, a.x, a.weight.dtype, l_scale=a.ia3_out, r_scale=a.ia3_in)
    if needs.sparse_value:
        gval = sddmm(grad_y, a.x, a.sparse_index, n, k, a.ia3_out, a.ia3_in).to(a.sparse_value.dtype)
    gyb = None
    if a.lora_A is not None and (needs.x or needs.lora_A):
        r = a.lora_A.shape[0]
        gyb = grad_y.new_empty(m, r)  # the rank-sized intermediate dA and dX share
        fused_matmul(grad_y, a.lora_B, a.lora_B.stride(0), a.lora_B.stride(1), r, gyb, skinny=True)
    if needs.lora_B:
        gbb = matmul_tn(grad_y, xa, a.lora_B.dtype, scale=a.lora_scale)
    if needs.lora_A:
        ga = matmul_tn(gyb, a.x, a.lora_A.dtype, scale=a.lora_scale, dropout=drop)
    if needs.x or needs.ia3_in:
        dx = grad_y.new_empty(m, k)
        with_lora = a.lora_A is not None and needs.x
        lora = (gyb, a.lora_A, a.lora_A.stride(0), a.lora_A.stride(1), a.lora_scale) if with_lora else None
        sparse = csc(a.sparse_index, _vec(a.sparse_value), n, k) if a.sparse_index is not None else None
        red = fused_matmul(grad_y, a.weight, a.weight.stride(0), a.weight.stride(1), k, dx, pro=a.ia3_out,
                           col=a.ia3_in,
                           sparse=sparse, lora=lora, reduce_src=a.x if needs.ia3_in else None,
                           dropout=drop if with_lora else None, dropout_on="lora")
        if needs.ia3_in:
            gin = red.sum(0).to(a.ia3_in.dtype)
        gx = dx if needs.x else None
    return Grads(x=gx, weight=gw, bias=gb, lora_A=ga, lora_B=gbb, ia3_in=gin, ia3_out=gout, sparse_value=gval,
                 dora_scale=gc)


BACKEND = Backend(
    name="triton",
    forward=forward,
    backward=backward,
    unavailable=_unavailable,
    device_error=_device_error,
    dtypes=DTYPES,
)
