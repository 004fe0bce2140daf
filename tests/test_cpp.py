"""The C++ CPU backend (csrc/, fastpeft.core.backends.cpp) against the float64 reference.

Every path of the fused op (LoRA, dropout, IA3 in/out, bias, sparse delta) and their combinations,
forward and every gradient, on fresh random data with odd sizes; 3-D, non-contiguous and empty
inputs; fp32, bf16 and fp32 adapters on bf16 inputs; the dropout mask bit for bit; the sparse
kernels directly; and bad input reaching the C++ ops directly.
"""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch

import fastpeft
from fastpeft import reference
from fastpeft.core import spec
from fastpeft.core.backends import unavailable_reason
from fastpeft.mask import hash_offsets, keep_mask, keep_threshold
from fastpeft.tools.equivalence import TOLERANCE, rel_err

_REASON = unavailable_reason("cpp")
if _REASON is not None:
    pytest.skip(f"the C++ extension is not available: {_REASON}", allow_module_level=True)

ops = torch.ops.fastpeft_cpp
TOL = {dt: TOLERANCE[dt] for dt in (torch.float32, torch.bfloat16, torch.float16)}
PATHS = ("lora", "drop", "ia3_in", "ia3_out", "bias", "sparse")
GRAD_NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "ia3_in", "ia3_out", "sparse_value")


def make_inputs(m, k, n, r, paths, dtype, adapter_dtype=None, x_shape=None, noncontig=False, density=0.15,
                gen=None):
    """Random (x, kwargs) for fastpeft.peft_linear; adapters in adapter_dtype (default: x's)."""
    adapter_dtype = adapter_dtype or dtype

    def rnd(*shape, dt=dtype, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(dt)

    if noncontig:  # a transposed view: same values, strides that are not row-major
        x = rnd(k, m).t()
    else:
        x = rnd(m, k)
    if x_shape is not None:
        x = x.reshape(*x_shape, k)
    kw = {"weight": rnd(n, k, scale=k ** -0.5)}
    kw["bias"] = rnd(n, dt=adapter_dtype) if "bias" in paths else None
    if "lora" in paths:
        kw["lora_A"] = rnd(r, k, dt=adapter_dtype, scale=k ** -0.5)
        kw["lora_B"] = rnd(n, r, dt=adapter_dtype, scale=r ** -0.5)
        kw["lora_scale"] = 0.75
        if "drop" in paths:
            kw["lora_dropout"] = 0.3
            kw["dropout_seed"] = int(torch.randint(0, 2**62, (1,), generator=gen))
    if "ia3_in" in paths:
        kw["ia3_in"] = rnd(k, dt=adapter_dtype, scale=0.3, shift=1.0)
    if "ia3_out" in paths:
        kw["ia3_out"] = rnd(n, dt=adapter_dtype, scale=0.3, shift=1.0)
    if "sparse" in paths:
        nnz = max(1, int(density * n * k))
        kw["sparse_index"] = torch.randperm(n * k, generator=gen)[:nnz].sort().values
        kw["sparse_value"] = rnd(nnz, dt=adapter_dtype)
    return x, kw


def check_against_reference(x, kw, trainable, tol, backend="cpp"):
    """Forward and the gradients of every name in ``trainable`` vs float64 reference.peft_linear."""
    kw = dict(kw)
    leaves = {}
    for name in trainable:
        if name == "x":
            x = x.detach().requires_grad_(True)
            leaves["x"] = x
        elif kw.get(name) is not None:
            kw[name] = kw[name].detach().requires_grad_(True)
            leaves[name] = kw[name]
    y = fastpeft.peft_linear(x, backend=backend, **kw)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], kw["weight"].shape[0])

    ref_leaves = {}
    ref_x = x.detach().double().requires_grad_("x" in leaves)
    ref_kw = {}
    for name, value in kw.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().double().requires_grad_(name in leaves)
            ref_leaves[name] = value
        ref_kw[name] = value
    if "x" in leaves:
        ref_leaves["x"] = ref_x
    y_ref = reference.peft_linear(ref_x, **ref_kw)
    assert rel_err(y, y_ref) < tol, f"forward: {rel_err(y, y_ref):.3g}"
    if not leaves or y.numel() == 0:
        return
    grad_y = torch.randn(y.shape, dtype=torch.float64)
    names = list(leaves)
    grads = torch.autograd.grad(y, [leaves[n] for n in names], grad_y.to(y.dtype))
    grads_ref = torch.autograd.grad(y_ref, [ref_leaves[n] for n in names], grad_y)
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert g.dtype == leaves[name].dtype, f"grad {name} has dtype {g.dtype}, expected {leaves[name].dtype}"
        assert g.shape == leaves[name].shape
        err = rel_err(g, g_ref)
        assert err < tol, f"grad {name}: {err:.3g}"


# Every combination of the paths (dropout only with LoRA), all adapters trainable.
COMBOS = [c for n in range(1, len(PATHS) + 1) for c in itertools.combinations(PATHS, n)
          if not ("drop" in c and "lora" not in c)]


def _route(name, monkeypatch):
    if name == "custom_op":
        monkeypatch.setattr(fastpeft.core.ops, "_tracing", lambda: True)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Fresh random data per test, independent of which tests ran before (a 1-element gradient is a
    single fp32 sum, whose rounding relative to float64 depends on the draw)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=["eager", "custom_op"])
def dispatch(request, monkeypatch):
    """Which route into the kernels: eager calls take the C++-autograd op fastpeft_cpp::peft_linear;
    under torch.compile, fastpeft.core.ops' Python custom op calls BACKEND.forward / BACKEND.backward
    (forced here by making fastpeft.peft_linear believe it is being traced)."""
    if request.param == "custom_op":
        monkeypatch.setattr(fastpeft.core.ops, "_tracing", lambda: True)
    return request.param


@pytest.mark.parametrize("paths", COMBOS, ids=lambda c: "+".join(c))
@pytest.mark.parametrize("dtype,route", [(torch.float32, "eager"), (torch.bfloat16, "eager"),
                                         (torch.float32, "custom_op")], ids=["fp32", "bf16", "fp32-custom_op"])
def test_every_combination(paths, dtype, route, monkeypatch):
    _route(route, monkeypatch)
    gen = torch.Generator().manual_seed(sum(map(ord, "".join(paths))) + (dtype == torch.float32))
    x, kw = make_inputs(37, 29, 23, 5, paths, dtype, gen=gen)
    check_against_reference(x, kw, ("x",) + GRAD_NAMES[2:], TOL[dtype])


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16], ids=["fp32-adapters", "bf16-adapters"])
@pytest.mark.parametrize("paths", [PATHS, ("lora", "bias"), ("ia3_in", "sparse"), ("ia3_out", "lora", "drop")],
                         ids=lambda c: "+".join(c))
def test_bf16_input_with_adapter_dtypes(paths, adapter_dtype):
    x, kw = make_inputs(41, 33, 27, 6, paths, torch.bfloat16, adapter_dtype=adapter_dtype)
    check_against_reference(x, kw, ("x",) + GRAD_NAMES[2:], TOL[torch.bfloat16])


def test_float16():
    x, kw = make_inputs(19, 21, 17, 3, PATHS, torch.float16)
    check_against_reference(x, kw, ("x",) + GRAD_NAMES[2:], TOL[torch.float16])


@pytest.mark.parametrize("trainable", [
    ("x",), ("lora_A",), ("lora_B",), ("lora_A", "lora_B"), ("ia3_in",), ("ia3_out",), ("bias",),
    ("sparse_value",), ("weight",), ("x", "weight", "sparse_value"), ("weight", "ia3_in", "lora_B"),
], ids=lambda t: "+".join(t))
def test_subsets_of_gradients(trainable, dispatch):
    """Each gradient alone (the backward only computes and the forward only saves what is asked)."""
    x, kw = make_inputs(31, 26, 19, 4, PATHS, torch.float32)
    check_against_reference(x, kw, trainable, TOL[torch.float32])


@pytest.mark.parametrize("case", ["3d", "noncontig", "m0", "m1", "k1-n1", "wide"])
def test_shapes(case, dispatch):
    m, k, n, x_shape, noncontig = 37, 29, 23, None, False
    if case == "3d":
        x_shape = (3, 5, 7)
        m = 105
    elif case == "noncontig":
        noncontig = True
    elif case == "m0":
        m, x_shape = 0, (0, 4)
    elif case == "m1":
        m = 1
    elif case == "k1-n1":
        k = n = 1
    elif case == "wide":  # several row blocks and SDDMM chunks, threads split work
        m, k, n = 150, 70, 90
    x, kw = make_inputs(m, k, n, 3, PATHS, torch.float32, x_shape=x_shape, noncontig=noncontig, density=0.3)
    check_against_reference(x, kw, ("x",) + GRAD_NAMES[1:], TOL[torch.float32])


def test_bf16_noncontig_3d():
    x, kw = make_inputs(24, 35, 18, 4, PATHS, torch.bfloat16, noncontig=True)
    x = x.reshape(2, 12, 35)
    check_against_reference(x, kw, ("x",) + GRAD_NAMES[2:], TOL[torch.bfloat16])


def test_m0_gradients_are_zero():
    x, kw = make_inputs(0, 13, 11, 2, PATHS, torch.float32)
    params = {n: kw[n].requires_grad_() for n in ("bias", "lora_A", "lora_B", "ia3_in", "ia3_out", "sparse_value")}
    x.requires_grad_()
    y = fastpeft.peft_linear(x, backend="cpp", **kw)
    assert y.shape == (0, 11)
    y.sum().backward()
    assert x.grad.shape == (0, 13)
    for name, p in params.items():
        assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any(), name


def _saved_storages(fn, params):
    ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):  # the custom-op route saves the 0-d int64 seed tensor: not an activation
        if t.untyped_storage().data_ptr() not in ptrs and t.dim() > 0:
            seen[t.untyped_storage().data_ptr()] = tuple(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sorted(seen.values())


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_saves_only_x_and_xa(p, dispatch):
    """LoRA saves x and the [M, r] xa, nothing else (no mask, no dropped x); dropout adds nothing."""
    x, kw = make_inputs(33, 20, 12, 3, ("lora", "drop") if p else ("lora",), torch.float32)
    x.requires_grad_()
    params = [kw["weight"], kw["lora_A"].requires_grad_(), kw["lora_B"].requires_grad_()]
    saved = _saved_storages(lambda: fastpeft.peft_linear(x, backend="cpp", **kw), params)
    assert saved == [(33, 3), (33, 20)]
    # Only lora_B trains: x is not needed (the saved xa suffices).
    params[1].requires_grad_(False)
    x.requires_grad_(False)
    saved = _saved_storages(lambda: fastpeft.peft_linear(x, backend="cpp", **kw), params)
    assert saved == [(33, 3)]


# ---- the dropout mask, bit for bit -----------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 - 1, 2**32 + 7, 2**62 + 3, 2**63 - 1])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_keep_mask_bit_identical(seed, p):
    rows, cols = 37, 53
    assert torch.equal(ops.keep_mask(seed, p, rows, cols), keep_mask(seed, p, rows, cols))


def test_keep_mask_offsets_above_2_32():
    """Rows far down a huge x: offsets >= 2**32 use the high word of the counter."""
    cols, first_row, rows, seed, p = 4099, (2**32) // 4099 - 2, 5, 987654321, 0.25
    offsets = torch.arange(first_row * cols, (first_row + rows) * cols, dtype=torch.int64).view(rows, cols)
    expected = hash_offsets(seed, offsets) >= keep_threshold(p)
    assert offsets.max() >= 2**32 > offsets.min()
    assert torch.equal(ops.keep_mask(seed, p, rows, cols, first_row), expected)


def test_dropout_op_matches_reference_bitwise():
    x = torch.randn(45, 67)
    seed, p = 2**40 + 11, 0.2
    assert torch.equal(ops.dropout(x, p, seed), reference.dropout_with_mask(x, p, seed))
    keep_rate = ops.keep_mask(seed, p, 300, 300).float().mean().item()
    assert abs(keep_rate - 0.8) < 0.01


def test_dropout_grad_uses_the_same_mask():
    """dX and dA of LoRA with dropout equal the reference's (its mask from fastpeft.mask)."""
    x, kw = make_inputs(40, 50, 30, 4, ("lora", "drop"), torch.float32)
    check_against_reference(x, kw, ("x", "lora_A", "lora_B"), TOL[torch.float32])
    # Different seeds give different results (the seed is really used).
    kw2 = dict(kw, dropout_seed=kw["dropout_seed"] + 1)
    y1 = fastpeft.peft_linear(x, backend="cpp", **kw)
    y2 = fastpeft.peft_linear(x, backend="cpp", **kw2)
    assert not torch.allclose(y1, y2)


# ---- sparse kernels directly ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sparse_kernels_directly(dtype):
    m, k, n = 70, 45, 38
    index = torch.randperm(n * k)[:300].sort().values
    value = torch.randn(300)
    dense = reference.sparse_delta(index, value.double(), n, k)
    h = torch.randn(m, k).to(dtype)
    g = torch.randn(m, n).to(dtype)
    assert rel_err(ops.sparse_matmul(h, index, value, n), h.double() @ dense.t()) < TOL[dtype]
    assert rel_err(ops.sparse_matmul_t(g, index, value, k), g.double() @ dense) < TOL[dtype]
    sd = ops.sddmm(g, h, index)
    assert sd.dtype == torch.float32
    assert rel_err(sd, (g.double().t() @ h.double()).view(-1)[index]) < TOL[dtype]


def test_sparse_empty_rows_and_empty_index():
    m, k, n = 20, 16, 12
    index = torch.tensor([3, 4, 5 * k + 1, 11 * k + 15])  # rows 0, 5 and 11 only
    value = torch.randn(4)
    h = torch.randn(m, k)
    dense = reference.sparse_delta(index, value, n, k)
    torch.testing.assert_close(ops.sparse_matmul(h, index, value, n), h @ dense.t())
    empty = torch.empty(0, dtype=torch.int64)
    assert not ops.sparse_matmul(h, empty, torch.empty(0), n).any()
    assert ops.sddmm(torch.randn(m, n), h, empty).shape == (0,)


# ---- backend wiring -----------------------------------------------------------------------------------

def test_backend_listed_and_auto():
    from fastpeft.core.backends import resolve

    assert "cpp" in fastpeft.available_backends()
    assert resolve(None, torch.device("cpu"), torch.float32).name == "cpp"
    assert resolve(None, torch.device("cpu"), torch.bfloat16).name == "cpp"
    assert resolve(None, torch.device("cpu"), torch.float64).name == "reference"  # float64 falls back
    with pytest.raises(TypeError, match="float64"):
        resolve("cpp", torch.device("cpu"), torch.float64)


def test_meta_implementation():
    x = torch.empty(7, 5, device="meta")
    w = torch.empty(3, 5, device="meta")
    a, b = torch.empty(2, 5, device="meta"), torch.empty(3, 2, device="meta")
    y, xa, z = ops.forward(x, w, None, a, b, None, None, None, None, None, 1.0, 0.0, 0, True)
    assert y.shape == (7, 3) and xa.shape == (7, 2) and z.shape == (7, 3) and y.device.type == "meta"
    grads = ops.backward(y, x, w, None, a, b, None, None, None, None, None, xa, z, 1.0, 0.0, 0,
                         _needs("x", "lora_A", "lora_B"))
    assert [tuple(g.shape) for g in grads] == [(7, 5), (0,), (0,), (2, 5), (3, 2), (0,), (0,), (0,), (0,)]


# ---- bad input straight into the C++ ops: Python exceptions with a message, never a crash --------------

def _fwd(x, w, bias=None, a=None, b=None, li=None, lo=None, si=None, sv=None, scale=1.0, p=0.0, seed=0,
         save_z=False):
    return ops.forward(x, w, bias, a, b, li, lo, si, sv, None, scale, p, seed, save_z)


X, W = torch.randn(6, 5), torch.randn(4, 5)
# The checks fastpeft.core.validation makes raise its ValueError / TypeError with its message (the
# full table, every route: tests/test_validation.py); what only the kernels need is checked too.
BAD_FORWARD = {
    "x 1-D": (lambda: _fwd(torch.randn(5), W), ValueError, "x must be 2-D"),
    "x wrong K": (lambda: _fwd(torch.randn(6, 4), W), ValueError, "x must have shape [..., 5] to match weight [4, 5]"),
    "x float64": (lambda: _fwd(X.double(), W.double()), TypeError, "float64 runs on the 'reference' backend"),
    "x int": (lambda: _fwd(X.long(), W.long()), TypeError, "x must be a floating tensor"),
    "weight dtype": (lambda: _fwd(X, W.bfloat16()), TypeError, "weight dtype torch.bfloat16 must match x dtype"),
    "weight 1-D": (lambda: _fwd(X, torch.randn(5)), ValueError, "weight must be 2-D"),
    "x non-contiguous": (lambda: _fwd(torch.randn(5, 6).t(), W), ValueError, "contiguous"),
    "bias shape": (lambda: _fwd(X, W, torch.randn(3)), ValueError, "bias must have shape [4], got [3]"),
    "bias dtype": (lambda: _fwd(X, W, torch.randn(4).double()), TypeError, "bias must have x's dtype"),
    "lora_A alone": (lambda: _fwd(X, W, a=torch.randn(2, 5)), ValueError, "together"),
    "lora_A shape": (lambda: _fwd(X, W, a=torch.randn(2, 4), b=torch.randn(4, 2)), ValueError,
                     "lora_A must have shape"),
    "lora rank mismatch": (lambda: _fwd(X, W, a=torch.randn(2, 5), b=torch.randn(4, 3)), ValueError, "rank mismatch"),
    "lora rank 0": (lambda: _fwd(X, W, a=torch.randn(0, 5), b=torch.randn(4, 0)), ValueError, "at least 1"),
    "dropout p": (lambda: _fwd(X, W, a=torch.randn(2, 5), b=torch.randn(4, 2), p=1.0), ValueError,
                  "lora_dropout must be in [0, 1), got 1.0"),
    "dropout seed": (lambda: _fwd(X, W, a=torch.randn(2, 5), b=torch.randn(4, 2), p=0.1, seed=-1), ValueError,
                     "dropout_seed must be in [0, 2**63), got -1"),
    "ia3_in shape": (lambda: _fwd(X, W, li=torch.randn(4)), ValueError, "ia3_in must have shape"),
    "ia3_out dtype": (lambda: _fwd(X, W, lo=torch.randn(4).half()), TypeError, "ia3_out must have x's dtype"),
    "meta weight": (lambda: _fwd(X, torch.empty(4, 5, device="meta")), ValueError, "weight is on meta"),
    "index alone": (lambda: _fwd(X, W, si=torch.tensor([1])), ValueError, "together"),
    "index dtype": (lambda: _fwd(X, W, si=torch.tensor([1], dtype=torch.int32), sv=torch.randn(1)), TypeError,
                    "int64"),
    "index out of range": (lambda: _fwd(X, W, si=torch.tensor([3, 20]), sv=torch.randn(2)), ValueError,
                           "got range [3, 20]"),
    "index negative": (lambda: _fwd(X, W, si=torch.tensor([-1, 2]), sv=torch.randn(2)), ValueError, "flat indices"),
    "index unsorted": (lambda: _fwd(X, W, si=torch.tensor([5, 2]), sv=torch.randn(2)), ValueError, "sorted"),
    "index duplicate": (lambda: _fwd(X, W, si=torch.tensor([2, 2]), sv=torch.randn(2)), ValueError, "unique"),
    "values length": (lambda: _fwd(X, W, si=torch.tensor([1, 2]), sv=torch.randn(3)), ValueError,
                      "sparse_value must have"),
}


@pytest.mark.parametrize("case", list(BAD_FORWARD), ids=list(BAD_FORWARD))
def test_bad_input_forward(case):
    fn, exc, message = BAD_FORWARD[case]
    with pytest.raises(exc) as info:
        fn()
    assert message in str(info.value) and "fastpeft_cpp" not in str(info.value)


@pytest.mark.parametrize("value,text", [(1.0, "1.0"), (-0.1, "-0.1"), (1e16, "1e+16"), (-1.5e-05, "-1.5e-05"),
                                        (-0.0001, "-0.0001"), (123456.789, "123456.789"), (-1e-300, "-1e-300"),
                                        (float("inf"), "inf"), (float("nan"), "nan"),
                                        (2.0**70, "1.1805916207174113e+21"), (1e15, "1000000000000000.0")])
def test_cpp_messages_print_floats_as_python_does(value, text):
    """The C++ checks spell a float as repr() does, so their messages equal the Python validator's."""
    assert repr(value) == text  # the spelling is Python's
    a, b = torch.randn(2, 5), torch.randn(4, 2)
    with pytest.raises(ValueError) as info:
        ops.peft_linear(X, W, None, a, b, None, None, None, None, None, 1.0, value, None)
    assert str(info.value) == f"lora_dropout must be in [0, 1), got {text}"


def test_cpp_route_is_the_only_route(monkeypatch):
    """A call the C++ op rejects is not retried on another route (no second validation, no other kernels)."""
    from fastpeft.core import ops as core_ops

    entered = []
    monkeypatch.setattr(core_ops, "_custom_op_route", lambda *a, **k: entered.append(1))
    with pytest.raises(ValueError, match="bias must have shape"):
        fastpeft.peft_linear(X, W, torch.randn(3))
    with pytest.raises(ValueError, match="got range"):
        fastpeft.peft_linear(X, W, sparse_index=torch.tensor([0, 99]), sparse_value=torch.randn(2), backend="cpp")
    assert not entered


def _needs(*names):
    return [n in names for n in spec.GRAD_NAMES]


BAD_BACKWARD = {
    "grad_y shape": (lambda: ops.backward(torch.randn(6, 3), X, W, None, None, None, None, None, None, None,
                                          None, None, None, 1.0, 0.0, 0, _needs("x")), "grad_y must have shape"),
    "x missing": (lambda: ops.backward(torch.randn(6, 4), None, W, None, None, None, torch.randn(5), None, None,
                                       None, None, None, None, 1.0, 0.0, 0, _needs("ia3_in")), "x is required"),
    "bias grad without bias": (lambda: ops.backward(torch.randn(6, 4), X, W, None, None, None, None, None, None,
                                                    None, None, None, None, 1.0, 0.0, 0, _needs("bias")), "bias is None"),
    "xa missing": (lambda: ops.backward(torch.randn(6, 4), X, W, None, torch.randn(2, 5), torch.randn(4, 2), None,
                                        None, None, None, None, None, None, 1.0, 0.0, 0, _needs("lora_B")), "xa"),
    "z wrong shape": (lambda: ops.backward(torch.randn(6, 4), X, W, None, None, None, None, torch.randn(4), None,
                                           None, None, None, torch.randn(6, 3), 1.0, 0.0, 0, _needs("ia3_out")), "z "),
    "needs length": (lambda: ops.backward(torch.randn(6, 4), X, W, None, None, None, None, None, None, None,
                                          None, None, None, 1.0, 0.0, 0, [True]), "size 9"),
}


@pytest.mark.parametrize("case", list(BAD_BACKWARD), ids=list(BAD_BACKWARD))
def test_bad_input_backward(case):
    fn, message = BAD_BACKWARD[case]
    with pytest.raises(RuntimeError, match=message):
        fn()


def test_bad_input_small_ops():
    with pytest.raises(RuntimeError, match="p must be in"):
        ops.keep_mask(0, 1.5, 2, 2)
    with pytest.raises(RuntimeError, match="must be >= 0"):
        ops.keep_mask(0, 0.1, -1, 2)
    with pytest.raises(RuntimeError, match="seed"):
        ops.dropout(X, 0.1, -5)
    with pytest.raises(RuntimeError, match="2-D"):
        ops.dropout(torch.randn(3), 0.1, 0)
    with pytest.raises(RuntimeError, match="same number of rows"):
        ops.sddmm(torch.randn(3, 4), torch.randn(2, 5), torch.tensor([0]))
    with pytest.raises(ValueError, match="flat indices"):
        ops.sparse_matmul(torch.randn(3, 5), torch.tensor([100]), torch.randn(1), 4)
    with pytest.raises(ValueError, match="sorted"):
        ops.sparse_matmul_t(torch.randn(3, 4), torch.tensor([3, 1]), torch.randn(2), 5)


def test_unavailable_reason_names_fallback(monkeypatch):
    """With no compiler the backend reports why and names the fallback (simulated in a fresh state)."""
    from fastpeft.core.backends import cpp

    monkeypatch.setattr(cpp, "_state", {})
    monkeypatch.setattr(cpp, "_compiler", lambda: None)
    reason = cpp.unavailable()
    assert "no C++ compiler" in reason and "'reference' backend" in reason
    assert cpp.unavailable() == reason  # cached: no second attempt
