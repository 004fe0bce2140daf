"""The Triton GEMMs with an in-loop dequantized weight (kernels/quant.py).

Without a GPU they run under TRITON_INTERPRET=1 (tests/conftest.py) on small odd shapes; the
dequantized tiles are checked bit for bit (an identity operand returns W or W^T exactly) and the
products against float64.  They are also compiled ahead of time for sm_80 and sm_90 (no GPU
needed): every path must compile with no register spill (no stack frame), within shared memory,
and with no fused multiply-add (the double-quantized absmax rounds its product and its sum).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastpeft.kernels import config as _config
from fastpeft.quant import quantize_weight
from fastpeft.tools.equivalence import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not _config.INTERPRET,
                                reason="no GPU and TRITON_INTERPRET unset: the Triton kernels cannot run")
TOL = {torch.float32: 1e-5 if DEVICE == "cpu" else 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _kq():
    from fastpeft.kernels import quant as kq

    return kq


def bits(t):
    t = t.cpu().contiguous()
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


# (N, K, blocksize): K a multiple of the block (the aligned byte path) and not (any layout), odd K.
SHAPES = [(29, 45, 32), (33, 64, 32), (17, 128, 64), (20, 96, 64)]
PATHS = [("nf4", True), ("nf4", False), ("int8", False)]


@pytest.mark.parametrize("fmt,double_quant", PATHS)
@pytest.mark.parametrize("n,k,blocksize", SHAPES)
def test_tiles_dequantize_bit_for_bit(n, k, blocksize, fmt, double_quant):
    kq = _kq()
    for wdt, xdt in [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16),
                     (torch.bfloat16, torch.float32)]:
        gen = torch.Generator().manual_seed(n + k)
        w = (torch.randn(n, k, generator=gen) * 0.1).to(wdt)
        qw = quantize_weight(w, fmt, blocksize=blocksize, double_quant=double_quant).to(DEVICE)
        ref = qw.dequantize().to(xdt)
        assert torch.equal(bits(kq.quant_linear(torch.eye(k, dtype=xdt, device=DEVICE), qw)), bits(ref.t()))
        assert torch.equal(bits(kq.quant_linear_grad_input(torch.eye(n, dtype=xdt, device=DEVICE), qw)), bits(ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt,double_quant", PATHS)
@pytest.mark.parametrize("m,n,k,blocksize", [(37, 29, 45, 32), (5, 33, 128, 64), (19, 48, 64, 32)])
def test_products_against_float64(m, n, k, blocksize, fmt, double_quant, dtype):
    kq = _kq()
    gen = torch.Generator().manual_seed(m * n + k)
    qw = quantize_weight((torch.randn(n, k, generator=gen) * 0.1).to(dtype), fmt, blocksize=blocksize,
                         double_quant=double_quant).to(DEVICE)
    w64 = qw.dequantize().double().cpu()
    x = torch.randn(2, m, k, generator=gen).to(dtype)
    gy = torch.randn(2, m, n, generator=gen).to(dtype)
    y = kq.quant_linear(x.to(DEVICE), qw)
    dx = kq.quant_linear_grad_input(gy.to(DEVICE), qw)
    assert y.shape == (2, m, n) and y.dtype == dtype and dx.shape == (2, m, k) and dx.dtype == dtype
    assert rel_err(y, x.double() @ w64.t()) < TOL[dtype]
    assert rel_err(dx, gy.double() @ w64) < TOL[dtype]


def test_noncontiguous_and_empty_inputs():
    kq = _kq()
    qw = quantize_weight(torch.randn(21, 40) * 0.1, "nf4", blocksize=32).to(DEVICE)
    w64 = qw.dequantize().double().cpu()
    xt = torch.randn(40, 13).t()
    y = kq.quant_matmul(xt.to(DEVICE), qw, True)
    assert rel_err(y, xt.double() @ w64.t()) < TOL[torch.float32]
    assert kq.quant_linear(torch.randn(0, 40, device=DEVICE), qw).shape == (0, 21)
    with pytest.raises(ValueError, match=r"a must be \[M, 40\]"):
        kq.quant_matmul(torch.randn(3, 41, device=DEVICE), qw, True)


def test_the_products_route_to_the_triton_kernels():
    """fastpeft.quant.quant_linear & co. with backend="triton" (the CUDA default) run these kernels."""
    from fastpeft.quant.linear import quant_linear, quant_linear_add_, quant_linear_grad_input

    kq = _kq()
    qw = quantize_weight(torch.randn(21, 40) * 0.1, "nf4", blocksize=32).to(DEVICE)
    x, gy = torch.randn(2, 5, 40, device=DEVICE), torch.randn(5, 21, device=DEVICE)
    assert torch.equal(quant_linear(x, qw, backend="triton"), kq.quant_linear(x, qw))
    assert torch.equal(quant_linear_grad_input(gy, qw, backend="triton"), kq.quant_linear_grad_input(gy, qw))
    out = torch.ones(5, 40, device=DEVICE)
    assert torch.equal(quant_linear_add_(out, gy, qw, forward=False, backend="triton"),
                       1 + kq.quant_linear_grad_input(gy, qw))


# ---------------------------------------------------------------------------------------------
# ahead-of-time compilation for sm_80 and sm_90

AOT = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastpeft.kernels import config as _config, quant
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
for x, precision in (("fp32", "tf32x3"), ("bf16", "ieee"), ("fp16", "ieee")):
    for v in quant.aot_variants(x, precision, full=(x != "fp16")):
        for cc in (80, 90):
            k = triton.compile(ASTSource(v.fn, v.signature, v.constexprs), target=GPUTarget("cuda", cc, 32),
                               options={"num_warps": v.num_warps, "num_stages": v.num_stages,
                                        "enable_fp_fusion": False})
            with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
                f.write(k.asm["cubin"])
            usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
            os.remove(f.name)
            stack = [int(s) for s in re.findall(r"STACK:(\d+)", usage)]
            print(json.dumps({"name": v.name, "cc": cc, "shared": int(k.metadata.shared),
                              "limit": _config.SHARED_LIMIT[cc], "stack": stack,
                              "fma": len(re.findall(r"\bfma\.rn\.f32", k.asm["ptx"]))}), flush=True)
"""


def test_aot_compiles_for_sm80_sm90_without_spills():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", AOT], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    import json

    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    names = {r["name"] for r in rows}
    assert len(rows) == 2 * len(names) and len(names) >= 24
    for family in ("nf4-dq,aligned,fwd", "nf4-dq,aligned,dx", "nf4-dq,fwd", "nf4-dq,dx", "nf4,aligned,fwd",
                   "int8,fwd", "int8,dx"):
        assert any(f"[{family}," in n for n in names), family
    bad = [r for r in rows if r["stack"] != [0] or r["shared"] > r["limit"] or r["fma"]]
    assert not bad, bad
