"""Bad input: one table, every route, the same exception and message, raised before any work.

Routes: "reference" (Python custom op on the reference backend), "auto" (the default: on CPU the
eager C++ op, which checks its arguments itself), "cpp" (the same op, named), "cpp-custom-op" (the
C++ kernels behind the Python custom op, the route torch.compile takes), "triton" (under
TRITON_INTERPRET=1 without a GPU), and real torch.compile for the checks that read data.
For each case every route must raise the same type with the same message, leave torch's RNG state
as it was (no dropout seed drawn), and run no GEMM and no backend kernel.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastpeft
from fastpeft.core import backends as _backends
from fastpeft.core import validation

BACKENDS = fastpeft.available_backends()
ROUTES = [r for r in ("reference", "auto", "cpp", "cpp-custom-op", "triton")
          if (r if r != "auto" else "reference").split("-")[0] in BACKENDS]
WORK = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::matmul", "aten::linear", "aten::bmm",
        "aten::randint", "aten::random_", "aten::_sparse_mm", "aten::_sparse_addmm"}
META = torch.device("meta")


def base():
    """A valid call with every path on and dropout drawing its own seed (so a draw would show)."""
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(4, 8, generator=g), weight=torch.randn(6, 8, generator=g),
                bias=torch.randn(6, generator=g), lora_A=torch.randn(2, 8, generator=g),
                lora_B=torch.randn(6, 2, generator=g), lora_scale=0.5, lora_dropout=0.1, dropout_seed=None,
                ia3_in=torch.rand(8, generator=g) + 0.5, ia3_out=torch.rand(6, generator=g) + 0.5,
                sparse_index=torch.tensor([1, 9, 30]), sparse_value=torch.randn(3, generator=g))


def _f64(t):
    return t.double()


CASES = {
    # name: (overrides, exception type, exact message)
    "x not a tensor": (dict(x=[[1.0] * 8]), TypeError, "x must be a torch.Tensor, got list"),
    "weight not a tensor": (dict(weight="w"), TypeError, "weight must be a torch.Tensor, got str"),
    "x int": (dict(x=torch.randint(0, 3, (4, 8))), TypeError,
              "x must be a floating tensor (float32, bfloat16, float16 or float64), got torch.int64"),
    "weight 3-D": (dict(weight=torch.randn(6, 8, 1)), ValueError,
                   "weight must be 2-D [out_features, in_features], got shape [6, 8, 1]"),
    "weight dtype": (dict(weight=torch.randn(6, 8).double()), TypeError,
                     "weight dtype torch.float64 must match x dtype torch.float32"),
    "weight device": (dict(weight=torch.empty(6, 8, device=META)), ValueError,
                      "weight is on meta but x is on cpu; move it to cpu"),
    "x K": (dict(x=torch.randn(4, 7)), ValueError, "x must have shape [..., 8] to match weight [6, 8], got [4, 7]"),
    "x 0-D": (dict(x=torch.tensor(1.0)), ValueError, "x must have shape [..., 8] to match weight [6, 8], got []"),
    "bias type": (dict(bias="b"), TypeError, "bias must be a torch.Tensor, got str"),
    "bias shape": (dict(bias=torch.randn(5)), ValueError, "bias must have shape [6], got [5]"),
    "bias device": (dict(bias=torch.empty(6, device=META)), ValueError, "bias is on meta but x is on cpu; move it to cpu"),
    "bias dtype": (dict(bias=torch.randn(6).double()), TypeError,
                   "bias must have x's dtype (torch.float32) or torch.float32, got torch.float64"),
    "lora_B missing": (dict(lora_B=None), ValueError, "lora_A and lora_B must be given together"),
    "lora_A type": (dict(lora_A=np.zeros((2, 8))), TypeError, "lora_A must be a torch.Tensor, got ndarray"),
    "lora_A shape": (dict(lora_A=torch.randn(2, 7)), ValueError, "lora_A must have shape [r, 8], got [2, 7]"),
    "lora_A 1-D": (dict(lora_A=torch.randn(8)), ValueError, "lora_A must have shape [r, 8], got [8]"),
    "lora_B shape": (dict(lora_B=torch.randn(5, 2)), ValueError, "lora_B must have shape [6, r], got [5, 2]"),
    "rank mismatch": (dict(lora_B=torch.randn(6, 3)), ValueError,
                      "rank mismatch: lora_A has rank 2 ([2, 8]) but lora_B has rank 3 ([6, 3])"),
    "rank 0": (dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), ValueError,
               "lora rank r must be at least 1, got lora_A of shape [0, K]"),
    "lora_B device": (dict(lora_B=torch.empty(6, 2, device=META)), ValueError,
                      "lora_B is on meta but x is on cpu; move it to cpu"),
    "lora_A dtype": (dict(lora_A=torch.randn(2, 8).half()), TypeError,
                     "lora_A must have x's dtype (torch.float32) or torch.float32, got torch.float16"),
    "scale type": (dict(lora_scale="1"), TypeError, "lora_scale must be a float, got str"),
    "scale bool": (dict(lora_scale=True), TypeError, "lora_scale must be a float, got bool"),
    "scale tensor": (dict(lora_scale=torch.tensor(1.0)), TypeError, "lora_scale must be a float, got Tensor"),
    "p type": (dict(lora_dropout="0.1"), TypeError, "lora_dropout must be a float in [0, 1), got str"),
    "p one": (dict(lora_dropout=1.0), ValueError, "lora_dropout must be in [0, 1), got 1.0"),
    "p int one": (dict(lora_dropout=1), ValueError, "lora_dropout must be in [0, 1), got 1.0"),
    "p negative": (dict(lora_dropout=-0.1), ValueError, "lora_dropout must be in [0, 1), got -0.1"),
    "p nan": (dict(lora_dropout=float("nan")), ValueError, "lora_dropout must be in [0, 1), got nan"),
    "p tiny negative": (dict(lora_dropout=-1e-300), ValueError, "lora_dropout must be in [0, 1), got -1e-300"),
    "p numpy": (dict(lora_dropout=np.float32(1.5)), ValueError, "lora_dropout must be in [0, 1), got 1.5"),
    "p without lora": (dict(lora_A=None, lora_B=None, lora_dropout=2.5), ValueError,
                       "lora_dropout must be in [0, 1), got 2.5"),
    "seed negative": (dict(dropout_seed=-1), ValueError, "dropout_seed must be in [0, 2**63), got -1"),
    "seed too big": (dict(dropout_seed=2**63), ValueError, f"dropout_seed must be in [0, 2**63), got {2**63}"),
    "seed float": (dict(dropout_seed=1.5), TypeError, "dropout_seed must be an int in [0, 2**63) or None, got float"),
    "seed bool": (dict(dropout_seed=True), TypeError, "dropout_seed must be an int in [0, 2**63) or None, got bool"),
    "seed numpy negative": (dict(dropout_seed=np.int64(-3)), ValueError, "dropout_seed must be in [0, 2**63), got -3"),
    "seed tensor negative": (dict(dropout_seed=torch.tensor(-1)), ValueError,
                             "dropout_seed must be in [0, 2**63), got -1"),
    "seed tensor float": (dict(dropout_seed=torch.tensor(2.7)), TypeError,
                          "dropout_seed must be an int in [0, 2**63) or None, got a tensor of dtype torch.float32"),
    "seed tensor bool": (dict(dropout_seed=torch.tensor(True)), TypeError,
                         "dropout_seed must be an int in [0, 2**63) or None, got a tensor of dtype torch.bool"),
    "seed tensor 2 values": (dict(dropout_seed=torch.tensor([1, 2])), ValueError,
                             "dropout_seed must hold a single integer, got a tensor of shape [2]"),
    "seed negative at p=0": (dict(lora_dropout=0.0, dropout_seed=-5), ValueError,
                             "dropout_seed must be in [0, 2**63), got -5"),
    "ia3_in shape": (dict(ia3_in=torch.randn(6)), ValueError, "ia3_in must have shape [8], got [6]"),
    "ia3_in device": (dict(ia3_in=torch.empty(8, device=META)), ValueError,
                      "ia3_in is on meta but x is on cpu; move it to cpu"),
    "ia3_out shape": (dict(ia3_out=torch.randn(8)), ValueError, "ia3_out must have shape [6], got [8]"),
    "ia3_out dtype": (dict(ia3_out=torch.randn(6).half()), TypeError,
                      "ia3_out must have x's dtype (torch.float32) or torch.float32, got torch.float16"),
    "ia3_out type": (dict(ia3_out=1.0), TypeError, "ia3_out must be a torch.Tensor, got float"),
    "index alone": (dict(sparse_value=None), ValueError, "sparse_index and sparse_value must be given together"),
    "index type": (dict(sparse_index=[1, 2, 3]), TypeError, "sparse_index must be a torch.Tensor, got list"),
    "index dtype": (dict(sparse_index=torch.tensor([1, 9, 30], dtype=torch.int32)), TypeError,
                    "sparse_index must be int64, got torch.int32"),
    "index 2-D": (dict(sparse_index=torch.tensor([[1, 9, 30]])), ValueError,
                  "sparse_index must be 1-D [nnz], got shape [1, 3]"),
    "values length": (dict(sparse_value=torch.randn(4)), ValueError,
                      "sparse_value must have shape [3] like sparse_index, got [4]"),
    "values int": (dict(sparse_value=torch.tensor([1, 2, 3])), TypeError,
                   "sparse_value must be a floating tensor, got torch.int64"),
    "values dtype": (dict(sparse_value=torch.randn(3).double()), TypeError,
                     "sparse_value must have x's dtype (torch.float32) or torch.float32, got torch.float64"),
    "index device": (dict(sparse_index=torch.empty(3, dtype=torch.int64, device=META)), ValueError,
                     "sparse_index is on meta but x is on cpu; move it to cpu"),
    "index out of range": (dict(sparse_index=torch.tensor([1, 9, 48])), ValueError,
                           "sparse_index values must be flat indices in [0, 48) for a [6, 8] weight, got range [1, 48]"),
    "index negative": (dict(sparse_index=torch.tensor([-1, 9, 30])), ValueError,
                       "sparse_index values must be flat indices in [0, 48) for a [6, 8] weight, got range [-1, 30]"),
    "index unsorted": (dict(sparse_index=torch.tensor([9, 1, 30])), ValueError, "sparse_index must be sorted ascending"),
    "index duplicate": (dict(sparse_index=torch.tensor([1, 9, 9])), ValueError,
                        "sparse_index must hold unique indices; found duplicates"),
    "index duplicate and unsorted": (dict(sparse_index=torch.tensor([9, 9, 1])), ValueError,
                                     "sparse_index must hold unique indices; found duplicates"),
}


def _backend(route):
    return {"auto": None, "cpp-custom-op": "cpp"}.get(route, route)


def _call(route, kwargs):
    kwargs = dict(kwargs)
    x, w = kwargs.pop("x"), kwargs.pop("weight")
    return fastpeft.peft_linear(x, w, kwargs.pop("bias"), backend=_backend(route), **kwargs)


def outcome(route, kwargs, monkeypatch, call=_call):
    """(exception type, message) of one bad call; asserts that nothing ran and no seed was drawn."""
    ran = []
    with monkeypatch.context() as m:
        if route == "cpp-custom-op":
            m.setattr(fastpeft.core.ops, "_tracing", lambda: True)
        for name in BACKENDS:  # any backend kernel call is work done before the check
            backend = _backends._load(name)
            m.setattr(backend, "forward", lambda *a, _n=name, **k: ran.append(_n))
        rng = torch.get_rng_state()
        with torch.autograd.profiler.profile() as prof:
            with pytest.raises(Exception) as info:
                call(route, kwargs)
    work = WORK & {e.name for e in prof.function_events}
    assert not work and not ran, f"{route}: work done before the check: {sorted(work) + ran}"
    assert torch.equal(torch.get_rng_state(), rng), f"{route}: a dropout seed was drawn before the check"
    return type(info.value), str(info.value)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_same_error_on_every_route(case, monkeypatch):
    over, exc, message = CASES[case]
    kwargs = {**base(), **over}
    for route in ROUTES:
        got = outcome(route, kwargs, monkeypatch)
        assert got == (exc, message), f"{route}: {got[0].__name__}: {got[1]}"


COMPILED = ["index out of range", "index unsorted", "index duplicate", "seed tensor negative", "x K", "lora_A dtype"]


def _compiled(route, kwargs):
    kwargs = dict(kwargs)
    torch._dynamo.reset()
    fn = torch.compile(lambda kw: fastpeft.peft_linear(kw["x"], kw["weight"], kw["bias"], backend="cpp",
                                                       **{k: v for k, v in kw.items()
                                                          if k not in ("x", "weight", "bias")}))
    return fn(kwargs)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ backend is not available")
@pytest.mark.parametrize("case", COMPILED)
def test_bad_input_under_torch_compile(case, monkeypatch):
    """torch.compile: the data-dependent checks run inside the op, still before the seed is drawn."""
    over, exc, message = CASES[case]
    got = outcome("compile", {**base(), **over}, monkeypatch, call=_compiled)
    assert got == (exc, message), got[1]


# ---- scalar forms that are accepted: the same result everywhere ------------------------------------

ACCEPTED = {
    "numpy seed": (dict(dropout_seed=np.int64(77)), dict(dropout_seed=77)),
    "numpy uint seed": (dict(dropout_seed=np.uint64(2**63 - 1)), dict(dropout_seed=2**63 - 1)),
    "tensor seed": (dict(dropout_seed=torch.tensor(77)), dict(dropout_seed=77)),
    "1-element tensor seed": (dict(dropout_seed=torch.tensor([77], dtype=torch.int32)), dict(dropout_seed=77)),
    "numpy p": (dict(lora_dropout=np.float32(0.25)), dict(lora_dropout=0.25)),
    "numpy scale": (dict(lora_scale=np.float32(0.75), lora_dropout=np.float64(0.5)),
                    dict(lora_scale=0.75, lora_dropout=0.5)),
    "int p": (dict(lora_dropout=0), dict(lora_dropout=0.0)),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_numpy_and_tensor_scalars_accepted_on_every_route(case, monkeypatch):
    given, plain = ACCEPTED[case]
    kwargs = {**base(), "dropout_seed": 5, **given}
    expect = _call("reference", {**base(), "dropout_seed": 5, **plain})
    for route in ROUTES:
        with monkeypatch.context() as m:
            if route == "cpp-custom-op":
                m.setattr(fastpeft.core.ops, "_tracing", lambda: True)
            y = _call(route, kwargs)
        torch.testing.assert_close(y, expect, msg=route)


# ---- a layer's fixed sparse index: validated once -------------------------------------------------

def test_mark_validated_skips_per_call_value_checks(monkeypatch):
    kw = base()
    index = kw["sparse_index"]
    checks = []
    real = validation.check_sparse_values
    monkeypatch.setattr(validation, "check_sparse_values", lambda *a: checks.append(1) or real(*a))
    _call("reference", kw)
    assert len(checks) == 1  # a raw index: checked on the call
    validation.mark_validated(index, 6, 8)  # checks it once more, now
    assert len(checks) == 2
    assert validation.is_validated(index, 6, 8) and not validation.is_validated(index, 8, 6)
    _call("reference", kw)
    _call("reference", kw)
    assert len(checks) == 2  # a marked index: not again
    index[2] = 48  # modified in place: the mark no longer holds, and the bad value is caught
    assert not validation.is_validated(index, 6, 8)
    with pytest.raises(ValueError, match="got range"):
        _call("reference", kw)


def test_mark_validated_rejects_a_bad_index():
    with pytest.raises(ValueError, match="sorted ascending"):
        validation.mark_validated(torch.tensor([5, 2]), 3, 4)
    with pytest.raises(TypeError, match="int64"):
        validation.mark_validated(torch.tensor([1, 2], dtype=torch.int32), 3, 4)
    index = torch.tensor([5, 2])
    with pytest.raises(ValueError):
        validation.mark_validated(index, 3, 4)
    assert not validation.is_validated(index, 3, 4)


# ---- other checks --------------------------------------------------------------------------------------

def test_unknown_and_unavailable_backends_say_why():
    with pytest.raises(RuntimeError, match="unknown backend"):
        fastpeft.peft_linear(torch.randn(2, 8), torch.randn(3, 8), backend="cuda-magic")
    with pytest.raises(RuntimeError, match="unknown backend"):
        fastpeft.set_backend("nope")


def test_set_backend_and_env(monkeypatch):
    fastpeft.set_backend("reference")
    try:
        assert fastpeft.get_backend() == "reference"
    finally:
        fastpeft.set_backend(None)
    monkeypatch.setenv("FASTPEFT_BACKEND", "reference")
    assert fastpeft.get_backend() == "reference"
    assert "reference" in fastpeft.available_backends()


@pytest.mark.parametrize("route", ROUTES)
def test_user_tensors_not_modified(route, monkeypatch):
    kw = {**base(), "lora_dropout": 0.5}
    copies = {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    with monkeypatch.context() as m:
        if route == "cpp-custom-op":
            m.setattr(fastpeft.core.ops, "_tracing", lambda: True)
        _call(route, kw)
    for k, c in copies.items():
        assert torch.equal(kw[k], c), k
