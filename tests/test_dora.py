"""DoRA on the fused op (fastpeft.peft_linear(..., dora_magnitude=m)) against the float64 definition.

    n = ‖W + s·B·A‖_row (detached),  c = m / n,  y = c ⊙ (x Wᵀ + s·(x̃ Aᵀ) Bᵀ) + bias

Forward and the gradients of x, lora_A, lora_B, dora_magnitude and bias on every backend, fp32 and
bf16 (and fp32 adapters on bf16 x), odd sizes, 3-D and non-contiguous x, M = 0, with dropout; the
norm without B·A against the dense formula; zero-norm rows; bad input; peft's DoRA layer.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import fastpeft
from fastpeft.core.dora import dense_dora_norm, dora_norm
from fastpeft.tools.equivalence import check, make_case, rel_err

BACKENDS = fastpeft.available_backends()
TRAINABLE = ("x", "lora_A", "lora_B", "bias", "dora_magnitude")


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paths", [("lora", "dora"), ("lora", "dora", "bias"), ("lora", "dropout", "dora", "bias")],
                         ids="+".join)
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                 (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16", "bf16-fp32-adapters"])
def test_dora_matches_float64(backend, paths, dtype, adapter_dtype):
    x, kw = make_case(paths, 37, 29, 23, 5, dtype=dtype, adapter_dtype=adapter_dtype)
    check(x, kw, TRAINABLE, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ["3d", "noncontig", "m0", "m1", "k1-n1"])
def test_dora_shapes(backend, shape):
    m, k, n, lead, noncontig = 31, 26, 19, None, False
    if shape == "3d":
        m, lead = 30, (2, 3, 5)
    elif shape == "noncontig":
        noncontig = True
    elif shape == "m0":
        m, lead = 0, (0, 3)
    elif shape == "m1":
        m = 1
    elif shape == "k1-n1":
        k = n = 1
    x, kw = make_case(("lora", "dropout", "dora", "bias"), m, k, n, 3, lead=lead, noncontig=noncontig)
    check(x, kw, TRAINABLE, backend=backend)


def test_norm_without_ba_equals_dense_formula():
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12), (torch.bfloat16, 1e-2)):
        w = torch.randn(53, 41, dtype=dtype)
        a, b = torch.randn(7, 41, dtype=dtype), torch.randn(53, 7, dtype=dtype)
        assert rel_err(dora_norm(w, a, b, 0.6), dense_dora_norm(w, a, b, 0.6)) < tol


def test_norm_cache_follows_in_place_updates():
    w, a, b = torch.randn(9, 8), torch.randn(2, 8), torch.randn(9, 2)
    first = dora_norm(w, a, b, 1.0)
    assert dora_norm(w, a, b, 1.0) is first  # unchanged inputs: cached
    for t in (w, a, b):
        with torch.no_grad():
            t.mul_(1.5)
        assert rel_err(dora_norm(w, a, b, 1.0), dense_dora_norm(w, a, b, 1.0)) < 1e-6
    assert rel_err(dora_norm(w, a, b, 0.5), dense_dora_norm(w, a, b, 0.5)) < 1e-6  # another scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_norm_row_gives_bias_and_finite_gradients(backend):
    """A row of W + s·B·A that is all zero has n = 0: peft gives NaN; here c = 0, so y = bias there."""
    x, kw = make_case(("lora", "dora", "bias"), 11, 7, 5, 2)
    kw["weight"][2] = 0.0
    kw["lora_B"][2] = 0.0
    kw["dora_magnitude"][2] = 1.0
    leaves = {name: kw[name].requires_grad_() for name in ("lora_A", "lora_B", "bias", "dora_magnitude")}
    y = fastpeft.peft_linear(x.requires_grad_(), backend=backend, **kw)
    assert torch.equal(y[:, 2], kw["bias"][2].expand(11).to(y.dtype))
    y.square().sum().backward()
    for name, t in [("x", x), *leaves.items()]:
        assert torch.isfinite(t.grad).all(), name
    assert leaves["dora_magnitude"].grad[2] == 0


def test_dora_at_p0_equals_peft_dora_layer():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(29, 23))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True, init_lora_weights=False)
    model = peft.get_peft_model(base, cfg)
    layer = model.base_model.model[0]
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(13, 29, requires_grad=True)
    y_peft = model(x)
    gy = torch.randn_like(y_peft)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight, layer.base_layer.bias]
    g_peft = torch.autograd.grad(y_peft, [x, *params], gy)
    x2 = x.detach().clone().requires_grad_()
    y = fastpeft.peft_linear(x2, layer.base_layer.weight, params[3], lora_A=params[0], lora_B=params[1],
                             lora_scale=layer.scaling["default"], dora_magnitude=params[2])
    g = torch.autograd.grad(y, [x2, *params], gy)
    assert rel_err(y, y_peft) < 1e-5
    for name, a, b in zip(("x", "lora_A", "lora_B", "magnitude", "bias"), g, g_peft):
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,error,match", [
    ("no lora", ValueError, "dora_magnitude needs lora_A and lora_B"),
    ("shape", ValueError, r"dora_magnitude must have shape \[23\]"),
    ("dtype", TypeError, "dora_magnitude must have x's dtype"),
    ("not a tensor", TypeError, "dora_magnitude must be a torch.Tensor"),
    ("ia3_out", ValueError, "dora_magnitude cannot be combined with ia3_out"),
    ("sparse", ValueError, "dora_magnitude cannot be combined with sparse_value"),
])
def test_dora_bad_input_raises_before_any_work(backend, case, error, match):
    x, kw = make_case(("lora", "dropout", "dora", "ia3_out" if case == "ia3_out" else "bias",
                       *(("sparse",) if case == "sparse" else ())), 5, 7, 23, 2)
    kw["dropout_seed"] = None  # a draw would change the generator's state
    if case == "no lora":
        del kw["lora_A"], kw["lora_B"]
    elif case == "shape":
        kw["dora_magnitude"] = kw["dora_magnitude"][:-1]
    elif case == "dtype":
        kw["dora_magnitude"] = kw["dora_magnitude"].double()
    elif case == "not a tensor":
        kw["dora_magnitude"] = kw["dora_magnitude"].tolist()
    state = torch.get_rng_state()
    with pytest.raises(error, match=match):
        fastpeft.peft_linear(x, backend=backend, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(error, match=match):
        fastpeft.reference.peft_linear(x, **kw)
