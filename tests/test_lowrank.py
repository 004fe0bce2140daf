"""The C++ rank-r kernels (csrc/lowrank.cpp) and the eager fast path into the C++ op.

The kernels are checked alone (torch.ops.fastpeft_cpp.lowrank_forward / lowrank_backward) against
float64 over the ranks that select each code path (r <= 8: one 8-float vector per row; <= 16: one
16-float vector; <= 32: two; <= 64: four; above 64 the fused op falls back to MKL), with sizes that exercise the vector main loops and their
scalar tails, row blocks cut short, several reduction chunks, dropout and bf16; then through the
whole op (forward and every gradient) at those ranks.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import fastpeft
from fastpeft.core.backends import unavailable_reason
from fastpeft.mask import keep_mask

_REASON = unavailable_reason("cpp")
if _REASON is not None:
    pytest.skip(f"the C++ extension is not available: {_REASON}", allow_module_level=True)

from test_cpp import GRAD_NAMES, TOL, check_against_reference, make_inputs, rel_err  # noqa: E402

ops = torch.ops.fastpeft_cpp
RANKS = [1, 7, 16, 17, 32, 33, 64]  # every register layout, full and partial vectors


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """drop(x) in float64 with fastpeft's counter-based mask (offsets of x viewed as [M, K])."""
    if p == 0.0:
        return x.double()
    keep = keep_mask(seed, p, *x.shape)
    return x.double() * keep / (1.0 - p)


def operands(m, k, n, r, dtype, adapter_dtype=torch.float32):
    x = torch.randn(m, k).to(dtype)
    a = (torch.randn(r, k) * k ** -0.5).to(adapter_dtype)
    b = (torch.randn(n, r) * r ** -0.5).to(adapter_dtype)
    return x, a, b


def rounded(t: torch.Tensor, dtype) -> torch.Tensor:
    """t as the kernels read it: rounded to x's dtype, then float64."""
    return t.to(dtype).double()


def kernel_cases(shapes):
    """Every rank path x dropout x dtype x the given (m, k, n) shapes."""
    marks = [pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"]),
             pytest.mark.parametrize("p", [0.0, 0.3]), pytest.mark.parametrize("r", RANKS),
             pytest.mark.parametrize("m,k,n", shapes)]

    def apply(test):
        for mark in marks:
            test = mark(test)
        return test

    return apply


# (m, k, n): row blocks cut short, n and k tails past the vector loops; 70 and 101 rows give two
# reduction chunks on two threads.
@kernel_cases([(13, 37, 45), (70, 64, 96), (1, 5, 1)])
def test_lowrank_forward(m, k, n, r, p, dtype):
    x, a, b = operands(m, k, n, r, dtype)
    bias = torch.randn(n)
    seed, scale = 12345 + m, 0.7
    y, xa = ops.lowrank_forward(x, a, b, bias, scale, p, seed)
    assert y.shape == (m, n) and xa.shape == (m, r) and y.dtype == xa.dtype == dtype
    xa_ref = dropped(x, p, seed) @ rounded(a, dtype).t()
    y_ref = rounded(bias, dtype) + scale * xa_ref @ rounded(b, dtype).t()
    assert rel_err(xa, xa_ref) < TOL[dtype]
    assert rel_err(y, y_ref) < TOL[dtype]
    y0, _ = ops.lowrank_forward(x, a, b, None, scale, p, seed)
    assert rel_err(y0, y_ref - rounded(bias, dtype)) < TOL[dtype]


@kernel_cases([(13, 37, 45), (101, 64, 96), (1, 5, 1)])
def test_lowrank_backward(m, k, n, r, p, dtype):
    x, a, b = operands(m, k, n, r, dtype)
    gy = torch.randn(m, n).to(dtype)
    seed, scale = 777 + n, 1.3
    xa = (dropped(x, p, seed) @ rounded(a, dtype).t()).to(dtype)
    gyb, db, da = ops.lowrank_backward(gy, b, xa, x, scale, p, seed)
    assert gyb.dtype == db.dtype == da.dtype == torch.float32
    assert gyb.shape == (m, r) and db.shape == (n, r) and da.shape == (r, k)
    gyb_ref = gy.double() @ rounded(b, dtype)
    assert rel_err(gyb, gyb_ref) < TOL[dtype]
    assert rel_err(db, scale * gy.double().t() @ xa.double()) < TOL[dtype]
    assert rel_err(da, scale * gyb_ref.t() @ dropped(x, p, seed)) < TOL[dtype]
    # Without xa / x the matching gradient is skipped (an empty [0]) and the rest is unchanged.
    gyb2, db2, da2 = ops.lowrank_backward(gy, b, None, None, scale, p, seed)
    assert db2.numel() == 0 and da2.numel() == 0 and torch.equal(gyb2, gyb)


def test_lowrank_backward_is_deterministic_across_chunks():
    x, a, b = operands(301, 40, 50, 9, torch.float32)  # several reduction chunks
    gy = torch.randn(301, 50)
    xa = x @ a.t()
    first = ops.lowrank_backward(gy, b, xa, x, 1.0, 0.1, 5)
    for _ in range(3):
        again = ops.lowrank_backward(gy, b, xa, x, 1.0, 0.1, 5)
        assert all(torch.equal(u, v) for u, v in zip(first, again))


def test_lowrank_empty_rows():
    x, a, b = operands(0, 8, 6, 4, torch.float32)
    y, xa = ops.lowrank_forward(x, a, b, torch.randn(6), 1.0, 0.0, 0)
    assert y.shape == (0, 6) and xa.shape == (0, 4)
    gyb, db, da = ops.lowrank_backward(torch.randn(0, 6), b, xa, x, 1.0, 0.0, 0)
    assert gyb.shape == (0, 4) and torch.equal(db, torch.zeros(6, 4)) and torch.equal(da, torch.zeros(4, 8))


BAD = {
    "rank above the kernels": (lambda: ops.lowrank_forward(torch.randn(4, 8), torch.randn(65, 8),
                                                           torch.randn(5, 65), None, 1.0, 0.0, 0), "ranks 1..64"),
    "lora_A columns": (lambda: ops.lowrank_forward(torch.randn(4, 8), torch.randn(3, 7), torch.randn(5, 3), None,
                                                   1.0, 0.0, 0), "lora_A must have shape"),
    "bias shape": (lambda: ops.lowrank_forward(torch.randn(4, 8), torch.randn(3, 8), torch.randn(5, 3),
                                               torch.randn(4), 1.0, 0.0, 0), "bias must have shape"),
    "x dtype": (lambda: ops.lowrank_forward(torch.randn(4, 8, dtype=torch.float64), torch.randn(3, 8),
                                            torch.randn(5, 3), None, 1.0, 0.0, 0), "float32, bfloat16 or float16"),
    "p": (lambda: ops.lowrank_forward(torch.randn(4, 8), torch.randn(3, 8), torch.randn(5, 3), None, 1.0, 1.0, 0),
          "p must be in"),
    "x rows": (lambda: ops.lowrank_backward(torch.randn(4, 5), torch.randn(5, 3), None, torch.randn(3, 8), 1.0,
                                            0.0, 0), "x must be \\[4, K\\]"),
    "xa shape": (lambda: ops.lowrank_backward(torch.randn(4, 5), torch.randn(5, 3), torch.randn(4, 2), None, 1.0,
                                              0.0, 0), "xa must have shape"),
    "lora_B rows": (lambda: ops.lowrank_backward(torch.randn(4, 5), torch.randn(6, 3), None, None, 1.0, 0.0, 0),
                    "lora_B must have shape"),
    "device": (lambda: ops.lowrank_forward(torch.randn(4, 8), torch.randn(3, 8, device="meta"), torch.randn(5, 3),
                                           None, 1.0, 0.0, 0), "Meta"),  # the dispatcher refuses
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_lowrank_bad_input(case):
    call, message = BAD[case]
    with pytest.raises(RuntimeError, match=message):
        call()


# ---- the whole op at ranks around the kernels' limit ----------------------------------------------

@pytest.mark.parametrize("r", [16, 17, 33, 64, 65])
@pytest.mark.parametrize("paths", [("lora", "bias"), ("lora", "drop"), ("lora", "drop", "ia3_in"),
                                   ("lora", "drop", "ia3_out", "bias"), ("lora", "sparse", "bias")],
                         ids=lambda c: "+".join(c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_op_at_every_rank_path(r, paths, dtype):
    x, kw = make_inputs(45, 39, 70, r, paths, dtype)
    check_against_reference(x, kw, ("x",) + GRAD_NAMES[2:], TOL[dtype])


@pytest.mark.parametrize("trainable", [("lora_A",), ("lora_B",), ("x",), ("x", "lora_B")],
                         ids=lambda t: "+".join(t))
def test_op_partial_lora_gradients(trainable):
    x, kw = make_inputs(33, 35, 48, 12, ("lora", "drop", "bias"), torch.float32)
    check_against_reference(x, kw, trainable, TOL[torch.float32])


# ---- the eager fast path (fastpeft.peft_linear -> fastpeft_cpp::peft_linear) ----------------------

def test_fast_path_draws_the_seed_like_the_full_path():
    """With dropout and no dropout_seed, the C++ op draws the seed from torch's generator exactly as
    fastpeft.core.ops does, so a seeded run gives the same mask on every backend."""
    x, kw = make_inputs(9, 16, 12, 4, ("lora",), torch.float32)
    kw["lora_dropout"] = 0.5
    torch.manual_seed(3)
    y_cpp = fastpeft.peft_linear(x, backend="cpp", **kw)
    torch.manual_seed(3)
    y_ref = fastpeft.peft_linear(x, backend="reference", **kw)
    torch.testing.assert_close(y_cpp, y_ref)
    torch.manual_seed(3)
    assert torch.equal(fastpeft.peft_linear(x, **kw), y_cpp)  # auto -> cpp: the same draw


@pytest.mark.parametrize("kwargs,error,message", [
    ({"lora_scale": True}, TypeError, "lora_scale must be a float"),
    ({"lora_scale": torch.tensor(2.0)}, TypeError, "lora_scale must be a float"),
    ({"lora_dropout": 1.0}, ValueError, "lora_dropout must be in"),
    ({"dropout_seed": -1, "lora_dropout": 0.1}, ValueError, "seed"),
    ({"lora_B": torch.randn(12, 3)}, ValueError, "rank mismatch"),
    ({"bias": torch.randn(11)}, ValueError, "bias"),
], ids=["scale-bool", "scale-tensor", "p", "seed", "rank", "bias"])
def test_fast_path_raises_the_python_errors(kwargs, error, message):
    x, kw = make_inputs(5, 16, 12, 4, ("lora", "bias"), torch.float32)
    kw.update(kwargs)
    with pytest.raises(error, match=message):
        fastpeft.peft_linear(x, **kw)


def test_fast_path_leaves_the_generator_alone_on_bad_input():
    x, kw = make_inputs(5, 16, 12, 4, ("lora",), torch.float32)
    kw.update(lora_dropout=0.2, bias=torch.randn(11))
    state = torch.get_rng_state()
    with pytest.raises(ValueError):
        fastpeft.peft_linear(x, **kw)
    assert torch.equal(torch.get_rng_state(), state)
