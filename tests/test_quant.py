"""fastpeft.quant: NF4 (bitsandbytes' layout) and row-wise int8 weights, their panel dequantization
and the panel GEMMs (C++ kernels and the pure-torch fallback).

* bit-exact against bitsandbytes: NF4 codes, absmax (plain and double-quantized) and dequantized
  values for fp32 / bf16 / fp16 weights, several blocksizes, sizes that are not a whole number of
  blocks (rows straddling blocks, odd element counts); int8 CB / SCB and dequantization;
* from_bnb shares the parameter's storage and dequantizes equal;
* resident bytes; panels (rows and C++ sub-blocks) equal the full dequantization bit for bit;
* quant_linear / quant_linear_grad_input against float64 products with the dequantized weight;
* bad input.
"""
from __future__ import annotations

import pytest
import torch

from fastpeft import quant
from fastpeft.quant import QuantizedWeight, quantize_weight
from fastpeft.quant import linear as qlinear
from fastpeft.tools.equivalence import TOLERANCE, rel_err

TOL = {dt: TOLERANCE[dt] for dt in (torch.float32, torch.bfloat16, torch.float16)}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns (so -0.0 != 0.0 and NaNs compare)."""
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def weight(n, k, dtype=torch.float32, seed=0, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=gen) * scale).to(dtype)


# ---------------------------------------------------------------------------------------------
# bit for bit against bitsandbytes

bnb = None
try:  # optional: only the reference of these tests
    import bitsandbytes as bnb  # noqa: F401
    import bitsandbytes.functional as bnbF
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code
except Exception:  # pragma: no cover - bitsandbytes missing
    bnb = None

needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed (the reference of this test)")


def bnb_dequant_reference(q, state, shape, dtype):
    """bitsandbytes' own pure-torch dequantize_4bit (its default backend, what its CUDA kernel and its CPU
    backend for odd K compute), uncompiled, with the absmax decoded by bnb."""
    absmax = state.absmax
    if state.nested:
        absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    return fn(q.reshape(-1), absmax, _get_4bit_code("nf4", q.device), state.blocksize, shape, dtype)


# (N, K, blocksize): K % blocksize != 0 (rows straddle blocks), odd K and odd N*K (a pad nibble),
# partial last blocks, several blocksizes, aligned rows.
NF4_CASES = [(37, 70, 64), (7, 33, 64), (300, 257, 64), (5, 64, 64), (4, 96, 32), (6, 200, 128), (9, 1000, 256),
             (3, 700, 512), (2, 2500, 2048), (3, 4096, 4096), (129, 513, 1024), (1000, 1000, 64)]


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,blocksize", NF4_CASES)
def test_nf4_matches_bitsandbytes_bit_for_bit(n, k, blocksize, dtype, double_quant):
    w = weight(n, k, dtype, seed=n * 7 + k)
    q, state = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    qw = quantize_weight(w, "nf4", blocksize=blocksize, double_quant=double_quant)
    t = qw.tensors()
    assert torch.equal(t["packed"], q.reshape(-1))
    if double_quant:
        assert torch.equal(t["absmax"], state.absmax)
        assert torch.equal(t["absmax2"], state.state2.absmax)
        assert torch.equal(t["absmax_code"], state.state2.code)
        assert torch.equal(bits(t["absmax_offset"].reshape(1)), bits(state.offset.reshape(1)))
    else:
        assert torch.equal(bits(t["absmax"]), bits(state.absmax))
    ours = qw.dequantize()
    assert ours.dtype == dtype and ours.shape == (n, k)
    assert torch.equal(bits(ours), bits(bnb_dequant_reference(q, state, (n, k), dtype)))
    # bnb 0.50.2's CPU kernel indexes absmax per row when K % 16 == 0 (its AVX-512 path), which is
    # wrong when rows do not align with blocks; everywhere else dequantize_4bit runs the kernel.
    if k % 2 == 0 and (k % blocksize == 0 or k % 16 != 0):
        assert torch.equal(bits(ours), bits(bnbF.dequantize_4bit(q, state)))


@needs_bnb
def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(bits(quant.dynamic_map()), bits(bnbF.create_dynamic_map()))
    assert torch.equal(bits(quant.NF4_CODE), bits(bnbF.get_4bit_type("nf4", device="cpu")))


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_matches_bitsandbytes(dtype):
    w = weight(37, 45, dtype, scale=1.0)
    w[3] = 0  # a zero row: bnb divides by zero there; we store CB = 0
    cb, scb, _ = bnbF.int8_vectorwise_quant(w)
    qw = quantize_weight(w, "int8")
    t = qw.tensors()
    assert torch.equal(t["SCB"], scb)
    rows = torch.arange(37) != 3
    assert torch.equal(t["CB"][rows], cb[rows]) and (t["CB"][3] == 0).all()
    ref = bnbF.int8_vectorwise_dequant(t["CB"], t["SCB"]).to(dtype)
    assert torch.equal(bits(qw.dequantize()), bits(ref))
    assert (qw.dequantize()[3] == 0).all()


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("storage", [torch.uint8, torch.float32])
def test_from_bnb_params4bit_shares_storage(double_quant, storage):
    w = weight(64, 128)
    p = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                          compress_statistics=double_quant, quant_storage=storage).to("cpu")
    qw = QuantizedWeight.from_bnb(p)
    t = qw.tensors()
    assert t["packed"].data_ptr() == p.data.data_ptr()
    assert t["absmax"].data_ptr() == p.quant_state.absmax.data_ptr()
    if double_quant:
        assert t["absmax2"].data_ptr() == p.quant_state.state2.absmax.data_ptr()
        assert t["absmax_code"].data_ptr() == p.quant_state.state2.code.data_ptr()
    assert qw.format == "nf4" and qw.shape == (64, 128) and qw.dtype == torch.float32
    assert qw.blocksize == 64 and qw.double_quant == double_quant
    assert torch.equal(bits(qw.dequantize()), bits(bnbF.dequantize_4bit(p.data, p.quant_state)))
    # the same data as our own quantization of the weight
    assert torch.equal(t["packed"], quantize_weight(w, "nf4", 64, double_quant).tensors()["packed"])


@needs_bnb
def test_from_bnb_linear4bit_and_int8params():
    w = weight(48, 80, torch.bfloat16)
    lin = bnb.nn.Linear4bit(80, 48, bias=False, quant_type="nf4", compute_dtype=torch.bfloat16)
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4")
    lin = lin.to("cpu")
    qw = QuantizedWeight.from_bnb(lin.weight)
    assert qw.dtype == torch.bfloat16 and qw.double_quant
    assert qw.tensors()["packed"].data_ptr() == lin.weight.data.data_ptr()
    assert torch.equal(bits(qw.dequantize()), bits(quantize_weight(w, "nf4").dequantize()))

    w8 = weight(20, 30, scale=1.0)
    p8 = bnb.nn.Int8Params(w8.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    q8 = QuantizedWeight.from_bnb(p8)
    assert q8.format == "int8" and q8.dtype == torch.float32
    assert q8.tensors()["CB"].data_ptr() == p8.CB.data_ptr() == p8.data.data_ptr()
    assert q8.tensors()["SCB"].data_ptr() == p8.SCB.data_ptr()
    assert torch.equal(bits(q8.dequantize()), bits(bnbF.int8_vectorwise_dequant(p8.CB, p8.SCB)))
    # Int8Params quantizes the float16 cast of the weight
    assert torch.equal(q8.tensors()["CB"], quantize_weight(w8.half(), "int8").tensors()["CB"])


@needs_bnb
def test_from_bnb_rejects_what_it_cannot_share():
    p = bnb.nn.Params4bit(weight(16, 64), requires_grad=False, quant_type="fp4").to("cpu")
    with pytest.raises(ValueError, match="NF4"):
        QuantizedWeight.from_bnb(p)
    unquantized = bnb.nn.Params4bit(weight(16, 64), requires_grad=False, quant_type="nf4")
    with pytest.raises(TypeError, match="quant_state"):
        QuantizedWeight.from_bnb(unquantized)
    with pytest.raises(TypeError, match="param"):
        QuantizedWeight.from_bnb(torch.nn.Parameter(weight(4, 4)))


# ---------------------------------------------------------------------------------------------
# the QuantizedWeight object

def test_resident_bytes_per_weight_4096():
    w = weight(4096, 4096, scale=0.02)
    nf4 = quantize_weight(w, "nf4", blocksize=64, double_quant=True)
    assert quant.bytes_per_weight(nf4) <= 0.52
    assert nf4.nbytes == sum(t.numel() * t.element_size() for t in nf4.tensors().values())
    int8 = quantize_weight(w, "int8")
    assert quant.bytes_per_weight(int8) <= 1.01
    plain = quantize_weight(w[:256], "nf4", blocksize=64, double_quant=False)
    assert plain.nbytes == 256 * 4096 // 2 + 256 * 4096 // 64 * 4


@pytest.mark.parametrize("fmt,blocksize,double_quant", [("nf4", 64, True), ("nf4", 32, False), ("nf4", 256, True),
                                                         ("int8", 64, False)])
@pytest.mark.parametrize("n,k", [(37, 45), (11, 64), (9, 129), (64, 1000)])
def test_dequantize_rows_equals_rows_of_the_full_dequantization(fmt, blocksize, double_quant, n, k):
    qw = quantize_weight(weight(n, k, torch.bfloat16), fmt, blocksize=blocksize, double_quant=double_quant)
    full = qw.dequantize()
    for start, stop in [(0, n), (1, n - 1), (3, 4), (n // 3, n // 2 + 1), (n, n), (0, 0)]:
        panel = qw.dequantize_rows(start, stop)
        assert panel.shape == (stop - start, k) and panel.dtype == torch.bfloat16
        assert torch.equal(bits(panel), bits(full[start:stop]))
    out = torch.empty(n - 2, k, dtype=torch.float32)
    assert qw.dequantize_rows(1, n - 1, out=out) is out
    assert torch.equal(bits(out), bits(full[1:n - 1].float()))


def test_quantize_leaves_the_weight_alone_and_detaches():
    w = weight(33, 70).requires_grad_()
    before = w.detach().clone()
    for fmt in ("nf4", "int8"):
        qw = quantize_weight(w, fmt)
        assert torch.equal(w.detach(), before) and w.requires_grad
        assert not any(t.requires_grad for t in qw.tensors().values())
        assert not qw.dequantize().requires_grad


def test_tensors_round_trip_through_a_state_dict():
    qw = quantize_weight(weight(40, 72, torch.float16), "nf4", blocksize=64, double_quant=True)
    module = torch.nn.Module()
    for name, t in qw.tensors().items():
        module.register_buffer(name, t)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    again = QuantizedWeight.from_tensors("nf4", qw.shape, qw.dtype, state, blocksize=qw.blocksize)
    assert torch.equal(bits(again.dequantize()), bits(qw.dequantize()))
    same = QuantizedWeight.from_tensors("nf4", qw.shape, qw.dtype, qw.tensors(), blocksize=64)
    assert all(same.tensors()[k] is v for k, v in qw.tensors().items())  # no copy
    q8 = quantize_weight(weight(5, 7), "int8")
    assert torch.equal(QuantizedWeight.from_tensors("int8", (5, 7), torch.float32, q8.tensors()).dequantize(),
                       q8.dequantize())


def test_attributes_repr_and_to():
    qw = quantize_weight(weight(12, 64), "nf4", blocksize=32)
    assert qw.format == "nf4" and qw.shape == torch.Size([12, 64]) and qw.dtype == torch.float32
    assert qw.device == torch.device("cpu") and qw.to("cpu") is qw
    text = repr(qw)
    assert "nf4" in text and "[12, 64]" in text and "blocksize=32" in text and "double_quant=True" in text
    assert "int8" in repr(quantize_weight(weight(3, 4), "int8"))


def test_empty_weights():
    for fmt in ("nf4", "int8"):
        for shape in [(0, 5), (4, 0)]:
            qw = quantize_weight(torch.zeros(shape), fmt)
            assert qw.dequantize().shape == shape
            y = quant.quant_linear(torch.randn(3, shape[1]), qw)
            assert y.shape == (3, shape[0]) and (y == 0).all()


# ---------------------------------------------------------------------------------------------
# bad input

def test_quantize_weight_bad_input():
    with pytest.raises(TypeError, match="w must be a float32"):
        quantize_weight(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        quantize_weight([[1.0]])
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.ones(8))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_weight(torch.ones(4, 64), "nf4", blocksize=48)
    with pytest.raises(ValueError, match="blocksize"):
        quantize_weight(torch.ones(4, 64), "nf4", blocksize=8192)
    with pytest.raises(ValueError, match="format"):
        quantize_weight(torch.ones(4, 64), "fp4")
    with pytest.raises(TypeError, match="double_quant"):
        quantize_weight(torch.ones(4, 64), "nf4", double_quant=1)
    bad = torch.ones(4, 64)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_weight(bad)


def test_from_tensors_and_dequantize_rows_bad_input():
    qw = quantize_weight(weight(8, 64), "nf4", blocksize=64, double_quant=False)
    t = qw.tensors()
    with pytest.raises(ValueError, match="packed"):
        QuantizedWeight.from_tensors("nf4", (8, 64), torch.float32, {**t, "packed": t["packed"][:-1]}, blocksize=64)
    with pytest.raises(TypeError, match="absmax"):
        QuantizedWeight.from_tensors("nf4", (8, 64), torch.float32, {**t, "absmax": t["absmax"].half()}, blocksize=64)
    with pytest.raises(ValueError, match="missing"):
        QuantizedWeight.from_tensors("nf4", (8, 64), torch.float32, {"packed": t["packed"]}, blocksize=64)
    with pytest.raises(ValueError, match="blocksize"):
        QuantizedWeight.from_tensors("nf4", (8, 64), torch.float32, t, blocksize=None)
    with pytest.raises(TypeError, match="dtype"):
        QuantizedWeight.from_tensors("nf4", (8, 64), torch.int8, t, blocksize=64)
    with pytest.raises(ValueError, match="shape"):
        QuantizedWeight.from_tensors("nf4", (8, 64, 1), torch.float32, t, blocksize=64)
    with pytest.raises(ValueError, match=r"rows \[start, stop\)"):
        qw.dequantize_rows(3, 9)
    with pytest.raises(TypeError, match="start"):
        qw.dequantize_rows(1.0, 3)
    with pytest.raises(ValueError, match="out must be"):
        qw.dequantize_rows(0, 2, out=torch.empty(3, 64))


def test_quant_linear_bad_input():
    qw = quantize_weight(weight(8, 64), "nf4")
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 64\]"):
        quant.quant_linear(torch.randn(3, 63), qw)
    with pytest.raises(TypeError, match="x must be float32"):
        quant.quant_linear(torch.ones(3, 64, dtype=torch.int64), qw)
    with pytest.raises(TypeError, match="qw must be a QuantizedWeight"):
        quant.quant_linear(torch.randn(3, 64), torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"grad_y must have shape \[\.\.\., 8\]"):
        quant.quant_linear_grad_input(torch.randn(3, 64), qw)
    with pytest.raises(ValueError, match="backend"):
        quant.quant_linear(torch.randn(3, 64), qw, backend="cuda")
    with pytest.raises(ValueError, match="panel_bytes"):
        quant.quant_linear(torch.randn(3, 64), qw, panel_bytes=0)


# ---------------------------------------------------------------------------------------------
# the C++ kernels and the pure-torch fallback

BACKENDS = ["torch"] + (["cpp"] if qlinear.cpp_available() else [])
needs_cpp = pytest.mark.skipif(not qlinear.cpp_available(), reason="the C++ extension is not available")


@needs_cpp
@pytest.mark.parametrize("fmt,blocksize,double_quant", [("nf4", 64, True), ("nf4", 32, False), ("nf4", 128, True),
                                                         ("nf4", 2048, False), ("int8", 64, False)])
@pytest.mark.parametrize("n,k", [(37, 45), (33, 97), (16, 64), (5, 300)])
def test_cpp_panels_equal_the_python_dequantization(fmt, blocksize, double_quant, n, k):
    # Rows and column ranges that start on odd elements and straddle blocks, every dtype pairing;
    # with double quant this also checks the absmax product and sum round separately (no FMA).
    for wdt in DTYPES:
        qw = quantize_weight(weight(n, k, wdt, seed=k), fmt, blocksize=blocksize, double_quant=double_quant)
        full = qw.dequantize()
        for out_dtype in DTYPES:
            ref = full.to(out_dtype)
            ranges = [(0, n, 0, k), (1, n - 1, 0, k), (3, min(n, 11), 1, k), (0, n, 2, k - 3), (2, 3, 5, 6)]
            for r0, r1, c0, c1 in ranges:
                out = torch.empty(r1 - r0, c1 - c0, dtype=out_dtype)
                quant.dequantize_rows_cpp(qw, r0, r1, out, c0, c1)
                assert torch.equal(bits(out), bits(ref[r0:r1, c0:c1])), (wdt, out_dtype, (r0, r1, c0, c1))


def check_products(qw, x, gy, backend, panel_bytes=None):
    w64 = qw.dequantize().to(x.dtype).double()
    y = quant.quant_linear(x, qw, backend=backend, panel_bytes=panel_bytes)
    dx = quant.quant_linear_grad_input(gy, qw, backend=backend, panel_bytes=panel_bytes)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], qw.shape[0])
    assert dx.dtype == gy.dtype and dx.shape == (*gy.shape[:-1], qw.shape[1])
    tol = TOL[x.dtype]
    assert rel_err(y, x.double() @ w64.t()) < tol
    assert rel_err(dx, gy.double() @ w64) < tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@pytest.mark.parametrize("m,n,k", [(37, 29, 45), (5, 300, 130), (64, 257, 512)])
def test_quant_linear_and_grad_input_against_float64(m, n, k, fmt, dtype, backend):
    gen = torch.Generator().manual_seed(m + n + k)
    qw = quantize_weight(weight(n, k, dtype, seed=k), fmt, blocksize=64)
    x = torch.randn(m, k, generator=gen).to(dtype)
    gy = torch.randn(m, n, generator=gen).to(dtype)
    check_products(qw, x, gy, backend)
    # small panels: many panels per product, split across threads, slices accumulated
    check_products(qw, x, gy, backend, panel_bytes=4096)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quant_linear_mixed_dtypes_3d_noncontiguous_and_empty(backend):
    gen = torch.Generator().manual_seed(3)
    for wdt, xdt in [(torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.bfloat16, torch.float16),
                     (torch.float16, torch.bfloat16)]:
        qw = quantize_weight(weight(31, 70, wdt), "nf4", blocksize=32)
        x = torch.randn(2, 5, 70, generator=gen).to(xdt)
        gy = torch.randn(2, 5, 31, generator=gen).to(xdt)
        check_products(qw, x, gy, backend)
    qw = quantize_weight(weight(31, 70), "int8")
    xt = torch.randn(70, 9, generator=gen).t()  # non-contiguous
    gt = torch.randn(31, 9, generator=gen).t()
    check_products(qw, xt, gt, backend)
    y = quant.quant_linear(torch.randn(0, 70), qw, backend=backend)
    assert y.shape == (0, 31)
    assert quant.quant_linear_grad_input(torch.randn(2, 0, 31), qw, backend=backend).shape == (2, 0, 70)


@needs_cpp
def test_cpp_and_fallback_agree_and_fallback_is_used_without_the_extension(monkeypatch):
    qw = quantize_weight(weight(40, 96), "nf4")
    x = torch.randn(7, 96)
    y_cpp = quant.quant_linear(x, qw, backend="cpp")
    monkeypatch.setattr(qlinear, "_ops", lambda: None)
    assert not quant.cpp_available()
    y_auto = quant.quant_linear(x, qw)  # falls back to the torch panel loop
    assert rel_err(y_auto, y_cpp.double()) < 1e-6
    with pytest.raises(RuntimeError, match="C\\+\\+ extension is not available"):
        quant.quant_linear(x, qw, backend="cpp")


@needs_cpp
def test_cpp_ops_check_their_arguments_and_have_meta_kernels():
    ops = torch.ops.fastpeft_cpp
    qw = quantize_weight(weight(8, 64), "nf4", double_quant=False)
    args = list(qlinear.kernel_args(qw))
    bad = list(args)
    bad[0] = args[0][:-1]
    with pytest.raises(RuntimeError, match="packed must have"):
        ops.quant_linear(torch.randn(2, 64), *bad, 0)
    bad = list(args)
    bad[5] = "nf8"
    with pytest.raises(RuntimeError, match="format"):
        ops.quant_linear(torch.randn(2, 64), *bad, 0)
    with pytest.raises(RuntimeError, match=r"x must be \[M, 64\]"):
        ops.quant_linear(torch.randn(2, 63), *args, 0)
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    assert ops.quant_linear(torch.empty(5, 64, device="meta"), *meta, 0).shape == (5, 8)
    assert ops.quant_linear_grad_input(torch.empty(5, 8, device="meta"), *meta, 0).shape == (5, 64)


def test_quantize_and_dequantize_do_not_import_bitsandbytes():
    code = ("import sys, torch\n"
            "import fastpeft.quant as q\n"
            "w = torch.randn(33, 70)\n"
            "for fmt in ('nf4', 'int8'):\n"
            "    qw = q.quantize_weight(w, fmt)\n"
            "    qw.dequantize(); qw.dequantize_rows(3, 9)\n"
            "    q.quant_linear(torch.randn(4, 70), qw, backend='torch')\n"
            "assert 'bitsandbytes' not in sys.modules, 'bitsandbytes was imported'\n")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
