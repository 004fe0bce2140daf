"""DoRA and a sparse delta over a quantized frozen base, and a quantized base moving with its module.

Ground truth: fastpeft.reference.peft_linear in float64 on the dequantized weight (forward and every
gradient), on each backend the quantized op runs: "cpp" (C++ panel products and rank-r kernels),
"reference" (the torch panel loop) and "triton" (kernels/quant.py, under TRITON_INTERPRET=1 here).
DoRA's ‖W‖²_row against float64, computed once per QuantizedWeight and recomputed after a load.
Models: LoRAConfig(use_dora=True) / SparseConfig + fastpeft.quantize in either order; ``.to(dtype)``,
``.to("meta")`` + ``to_empty``, ``.cpu()`` on a model with quantized bases; state_dict round trips.
"""
from __future__ import annotations

import copy
import pickle
import zlib

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.core.backends import unavailable_reason
from fastpeft.quant.dora import quant_dora_norm, row_sq_norms
from fastpeft.tools.equivalence import check, make_case, rel_err

TRAINABLE = ("x", "lora_A", "lora_B", "bias", "ia3_in", "ia3_out", "sparse_value", "dora_magnitude")
BACKENDS = [b for b in ("cpp", "reference", "triton") if unavailable_reason(b) is None]


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def quantized_case(fmt, paths, m=37, k=70, n=23, r=5, **kw_case):
    """(x, kwargs with the dequantized dense weight, the QuantizedWeight)."""
    x, kw = make_case(paths, m, k, n, r, **kw_case)
    qw = fastpeft.quantize_weight(kw["weight"], fmt, blocksize=64, double_quant=fmt == "nf4")
    kw["weight"] = qw.dequantize()  # the reference's weight: exactly what the kernels use
    if "dora" in paths:  # the magnitude around ‖W_q‖_row, so c is away from 1
        kw["dora_magnitude"] = (kw["weight"].double().norm(dim=1) * (1 + 0.2 * torch.randn(n, dtype=torch.float64))
                                ).to(kw["dora_magnitude"].dtype)
    return x, kw, qw


def on(qw, backend):
    return lambda x, **kw: fastpeft.peft_linear(x, **{**kw, "weight": qw}, backend=backend)


CASES = [("lora", "dora"), ("lora", "dora", "bias", "dropout"), ("sparse",), ("sparse", "bias", "lora", "dropout"),
         ("sparse", "ia3_in", "ia3_out", "lora", "bias")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@pytest.mark.parametrize("paths", CASES, ids="+".join)
def test_dora_and_sparse_over_a_quantized_base_match_float64(backend, fmt, paths):
    x, kw, qw = quantized_case(fmt, paths)
    check(x, kw, TRAINABLE, fn=on(qw, backend))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, None), (torch.bfloat16, torch.float32)],
                         ids=["bf16", "bf16-fp32-adapters"])
@pytest.mark.parametrize("paths", [("lora", "dora", "bias"), ("sparse", "lora", "bias")], ids="+".join)
def test_half_precision(backend, dtype, adapter_dtype, paths):
    x, kw, qw = quantized_case("nf4", paths, dtype=dtype, adapter_dtype=adapter_dtype)
    check(x, kw, TRAINABLE, fn=on(qw, backend))


@pytest.mark.parametrize("shape", ["3d", "noncontig", "m0", "rank-above-kernel"])
def test_shapes(shape):
    m, r, lead, noncontig = 30, 4, None, False
    if shape == "3d":
        lead = (2, 3, 5)
    elif shape == "noncontig":
        noncontig = True
    elif shape == "m0":
        m, lead = 0, (0, 2)
    else:
        r = 65  # the C++ rank-r kernels stop at 64
    for paths in (("lora", "dora", "bias"), ("sparse", "lora", "bias")):
        x, kw, qw = quantized_case("nf4", paths, m=m, k=45, r=r, lead=lead, noncontig=noncontig)
        check(x, kw, TRAINABLE, fn=on(qw, None))


def test_row_norms_against_float64_cached_and_recomputed_after_a_load():
    w = torch.randn(300, 515)
    qw = fastpeft.quantize_weight(w, "nf4")
    ref = qw.dequantize().double().square().sum(1)
    sq = row_sq_norms(qw)
    assert rel_err(sq, ref) < 1e-6
    assert row_sq_norms(qw, "torch") is sq  # cached: computed once per QuantizedWeight
    assert rel_err(row_sq_norms(fastpeft.quantize_weight(w, "nf4"), "torch"), ref) < 1e-6
    other = fastpeft.quantize_weight(2 * w, "nf4")
    for name, t in qw.tensors().items():  # as load_state_dict writes into the buffers
        t.copy_(other.tensors()[name])
    assert rel_err(row_sq_norms(qw), other.dequantize().double().square().sum(1)) < 1e-6
    a, b = torch.randn(4, 515) * 0.05, torch.randn(300, 4) * 0.5
    dense = (qw.dequantize().double() + 0.5 * b.double() @ a.double()).norm(dim=1)
    assert rel_err(quant_dora_norm(qw, a, b, 0.5), dense) < 1e-6


def test_nothing_of_the_weights_size_is_saved_with_dora_or_sparse():
    for paths in (("lora", "dora", "bias"), ("sparse", "lora", "bias")):
        x, kw, qw = quantized_case("nf4", paths, m=8, k=256, n=192)
        for name in ("lora_A", "lora_B", "bias", "dora_magnitude", "sparse_value"):
            if kw.get(name) is not None:
                kw[name].requires_grad_()
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            y = fastpeft.peft_linear(x.requires_grad_(), **{**kw, "weight": qw})
        y.sum().backward()
        assert sizes and max(sizes) < 192 * 256


@pytest.mark.parametrize("case,match", [
    ("dora+sparse", "dora_magnitude cannot be combined with sparse_value"),
    ("dora+ia3", "dora_magnitude cannot be combined with ia3_out"),
])
def test_conflicts_are_named_at_call_time(case, match):
    paths = ("lora", "dora", "sparse") if case == "dora+sparse" else ("lora", "dora", "ia3_out")
    x, kw, qw = quantized_case("nf4", paths)
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match=match):
        fastpeft.peft_linear(x, **{**kw, "weight": qw})
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------
# models

def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10))


def dense_twin(model):
    """The same model with every quantized base dequantized (a dense fp32 PEFTLinear base)."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, fastpeft.PEFTLinear) and not isinstance(m.weight, torch.Tensor):
            qw = m.weight
            for key in qw.tensors():
                delattr(m, "weight_" + key)
            object.__delattr__(m, "weight")
            m.weight = nn.Parameter(qw.dequantize(), requires_grad=False)
    return twin


def _grads(model, x):
    model.zero_grad()
    y = model(x)
    y.square().sum().backward()
    return y, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["dora", "sparse"])
@pytest.mark.parametrize("order", ["quantize-then-inject", "inject-then-quantize"])
def test_quantize_and_inject_dora_or_sparse_match_the_dequantized_model_and_train(method, order):
    model = mlp()
    cfg = (fastpeft.LoRAConfig(r=4, alpha=8, use_dora=True, target_modules=["0", "2"]) if method == "dora"
           else fastpeft.SparseConfig(density=0.05, target_modules=["0", "2"]))
    if order == "quantize-then-inject":
        fastpeft.quantize(model, "nf4")
        fastpeft.inject(model, cfg)
    else:
        fastpeft.inject(model, cfg)
        fastpeft.quantize(model, "nf4")
    with torch.no_grad():
        for i in (0, 2):
            if method == "dora":
                model[i].lora_B.normal_(0, 0.1)
                model[i].dora_magnitude.mul_(1 + 0.1 * torch.randn(model[i].out_features))
            else:
                model[i].sparse_value.normal_(0, 0.1)
    x = torch.randn(7, 64)
    y, grads = _grads(model, x)
    y_ref, grads_ref = _grads(dense_twin(model).double(), x.double())
    assert rel_err(y, y_ref) < 1e-5
    assert grads.keys() == grads_ref.keys() and grads
    for name in grads:
        assert rel_err(grads[name], grads_ref[name]) < 1e-5, name
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn(7, 10)
    losses = []
    for _ in range(4):
        loss = (model(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_dora_magnitude_starts_at_the_quantized_row_norm():
    model = fastpeft.inject(fastpeft.quantize(mlp(), "nf4"), fastpeft.LoRAConfig(r=2, use_dora=True,
                                                                                target_modules=["0"]))
    ref = model[0].weight.dequantize().double().norm(dim=1)
    assert rel_err(model[0].dora_magnitude, ref) < 1e-6
    x = torch.randn(5, 64)
    dense = dense_twin(model)
    assert rel_err(model[0](x), dense[0].double()(x.double())) < 1e-5


def _quantized_model(fmt="nf4"):
    model = mlp()
    fastpeft.quantize(model, fmt, target_modules=["0", "2"])
    fastpeft.inject(model, fastpeft.LoRAConfig(r=4, use_dora=True, target_modules=["0"]))
    fastpeft.inject(model, fastpeft.SparseConfig(density=0.05, target_modules=["2"]))
    with torch.no_grad():
        model[0].lora_B.normal_(0, 0.1)
        model[2].sparse_value.normal_(0, 0.1)
    return model


def _storage(layer):
    return {k: (t.dtype, t.device, t.data_ptr()) for k, t in layer.weight.tensors().items()}


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_dtype_moves_keep_the_storage_format_and_set_the_compute_dtype(fmt):
    model = _quantized_model(fmt)
    x = torch.randn(6, 64)
    y = model(x)
    before = {i: {k: t.clone() for k, t in model[i].weight.tensors().items()} for i in (0, 2)}
    model.to(torch.bfloat16)
    for i in (0, 2):
        layer = model[i]
        assert layer.weight.dtype == torch.bfloat16
        held = layer.weight.tensors()
        for k, t in held.items():
            assert t is getattr(layer, "weight_" + k)  # the view is over the registered buffers
            assert torch.equal(t, before[i][k])  # codes and fp32 scales unchanged (no cast)
    yb = model(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and rel_err(yb, y) < 3e-2
    model.half()
    assert model[0].weight.dtype == torch.float16 and model(x.half()).dtype == torch.float16
    model.float()
    assert all(model[i].weight.dtype == torch.float32 for i in (0, 2))
    model.double()  # float64 is not a dequantized dtype: the base keeps float32 and the op names the mismatch
    scale = "absmax2" if fmt == "nf4" else "SCB"  # an fp32 tensor of the format
    assert model[0].weight.dtype == torch.float32 and getattr(model[0], "weight_" + scale).dtype == torch.float32
    with pytest.raises(TypeError, match="weight dtype torch.float32 must match x dtype torch.float64"):
        model(x.double())


def test_meta_move_to_empty_and_state_dict_round_trip():
    model = _quantized_model()
    x = torch.randn(6, 64)
    y = model(x)
    state = copy.deepcopy(model.state_dict())
    model.to("meta")
    assert all(model[i].weight.device.type == "meta" and model[i].weight_packed.device.type == "meta"
               for i in (0, 2))
    model.to_empty(device="cpu")
    assert all(model[i].weight.device.type == "cpu" for i in (0, 2))
    model.load_state_dict(state)
    assert torch.equal(model(x), y)  # the view follows the loaded buffers, DoRA's norm cache too
    model.cpu()
    assert torch.equal(model(x), y)
    fresh = _quantized_model()
    fresh.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert torch.equal(fresh(x), y)
    clone = pickle.loads(pickle.dumps(model))
    assert torch.equal(clone(x), y)
    assert _storage(clone[0]) != _storage(model[0])
    assert all(t is getattr(clone[0], "weight_" + k) for k, t in clone[0].weight.tensors().items())


def test_delta_weight_and_count_parameters_read_the_dequantized_base():
    model = _quantized_model()
    with torch.no_grad():
        model[0].dora_magnitude.mul_(1.1)
    twin = dense_twin(model)
    for i in (0, 2):
        assert torch.equal(model[i].delta_weight(), twin[i].delta_weight())
    ours, dense = fastpeft.count_parameters(model), fastpeft.count_parameters(twin)
    for category in ("adapter", "scaling", "sparse"):
        assert ours[category] == dense[category] and ours[category]["changed"] > 0
    with pytest.raises(RuntimeError, match="quantized"):  # merge keeps its documented refusal
        model[0].merge()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cpp"])
def test_no_dense_weight_is_formed(backend, monkeypatch):
    """Forward, backward and DoRA's norm read W panel by panel: a whole-W dequantization fails here.

    (The torch panel loop and ‖W‖²_row go through dequantize_rows; the C++ panels are csrc's.)"""
    x, kw, qw = quantized_case("nf4", ("lora", "dora", "bias"), m=9, k=256, n=96)
    xs, kws, qws = quantized_case("nf4", ("sparse", "lora", "bias"), m=9, k=256, n=96)
    n, k = qw.shape
    real = fastpeft.QuantizedWeight.dequantize_rows

    calls = []

    def panel_only(self, start, stop, out=None):
        assert (stop - start) < n, "a dense [N, K] dequantization"
        calls.append(stop - start)
        return real(self, start, stop, out)

    monkeypatch.setattr(fastpeft.QuantizedWeight, "dequantize_rows", panel_only)
    monkeypatch.setattr("fastpeft.quant.linear.PANEL_BYTES", 16 * k * 4)  # 16-row panels in these sizes
    monkeypatch.setattr("fastpeft.quant.dora.PANEL_BYTES", 16 * k * 4)
    for case_x, case_kw, case_qw in ((x, kw, qw), (xs, kws, qws)):
        check(case_x, case_kw, TRAINABLE, fn=on(case_qw, backend))
    assert calls and max(calls) <= 16
