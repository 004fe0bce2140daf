"""GPT-2 style transformers ``Conv1D`` bases (weight stored [K, N], y = x W + b: peft's fan_in_fan_out).

The fastpeft layer keeps the Conv1D's own weight Parameter ([K, N]) and hands the op its [N, K] view
``weight.t()``: no backend copies it (checked with the profiler).  Checked against peft on a tiny
GPT-2 (random weights; eval, p = 0) with a float64 copy of peft's model as the ground truth:
from_peft, inject, merge / unmerge, count_parameters, and peft checkpoints both ways.
"""
import copy
import json

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.tools.equivalence import rel_err

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from transformers.pytorch_utils import Conv1D  # noqa: E402

TARGETS = ["c_attn", "c_proj", "c_fc"]
BACKENDS = fastpeft.available_backends()


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=61, n_positions=16, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(config).eval()
    with torch.no_grad():  # GPT-2's init has zero biases: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def peft_gpt2(seed=0, **config):
    pm = peft.get_peft_model(gpt2(seed), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                         fan_in_fan_out=True, **config))
    randomize_lora(pm)
    return pm.eval()


def hidden(model, ids):
    return model(input_ids=ids).last_hidden_state


IDS = torch.tensor([[3, 14, 15, 9, 26, 5, 35], [8, 9, 7, 9, 3, 2, 38]])


def float64_outputs_and_grads(pm, g):
    """The ground truth: peft's model in float64, its output and the gradients of sum(out * g)."""
    ref = copy.deepcopy(pm).double()
    out = hidden(ref, IDS)
    (out * g.double()).sum().backward()
    return out, {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- the op: no copy of W
def _weight_copies(fn, shapes) -> list:
    """Profiler events that copy a tensor of one of ``shapes`` (a weight-sized copy)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    copies = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::empty_strided")
    return [e.name for e in prof.events() if e.name in copies and any(list(s) in shapes for s in e.input_shapes)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_takes_the_transposed_view_without_copying_it(backend):
    k, n, r = 40, 56, 4
    w_kn = torch.randn(k, n)
    x = torch.randn(9, k, requires_grad=True)
    a = torch.randn(r, k, requires_grad=True)
    b = torch.randn(n, r, requires_grad=True)
    bias = torch.randn(n)
    w_nk = w_kn.t()
    assert not w_nk.is_contiguous()

    def step():
        y = fastpeft.peft_linear(x, w_nk, bias, lora_A=a, lora_B=b, lora_scale=0.5, backend=backend)
        y.sum().backward()

    shapes = [[k, n], [n, k]]
    assert _weight_copies(step, shapes) == []
    # the detector sees a copy when there is one
    assert _weight_copies(lambda: w_nk.contiguous(), shapes)
    # and the result is the definition, in float64
    x.grad = a.grad = b.grad = None
    y = fastpeft.peft_linear(x, w_nk, bias, lora_A=a, lora_B=b, lora_scale=0.5, backend=backend)
    gy = torch.randn_like(y)
    y.backward(gy)
    xd, ad, bd = (t.detach().double().requires_grad_() for t in (x, a, b))
    yd = xd @ w_kn.double() + bias.double() + 0.5 * (xd @ ad.t() @ bd.t())
    yd.backward(gy.double())
    assert rel_err(y, yd) < 1e-5
    for t, td in ((x, xd), (a, ad), (b, bd)):
        assert rel_err(t.grad, td.grad) < 1e-5


# ----------------------------------------------------------------------------- from_peft
@pytest.mark.parametrize("backend", BACKENDS)
def test_from_peft_gpt2_matches_peft_outputs_and_gradients(backend):
    pm = peft_gpt2()
    g = torch.randn(2, 7, 32)
    y_peft = hidden(pm, IDS)
    y_ref, ref_grads = float64_outputs_and_grads(pm, g)
    before = {n: (p, tuple(p.shape)) for n, p in pm.base_model.model.named_parameters()}
    keys = {k: tuple(v.shape) for k, v in pm.base_model.model.state_dict().items()}
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every Conv1D layer converts: no "left on peft's path"
        model = fastpeft.from_peft(pm, backend=backend)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, fastpeft.PEFTLinear)]
    assert len(convs) == 2 * 4 and all(m.fan_in_fan_out for _, m in convs)
    for name, layer in convs:
        assert layer.weight is before[f"{name}.base_layer.weight"][0]  # the Conv1D's own Parameter, [K, N]
        assert tuple(layer.weight.shape) == (layer.in_features, layer.out_features)
    y = hidden(model, IDS)
    (y * g).sum().backward()
    assert rel_err(y, y_ref) < 1e-5 and rel_err(y_peft, y_ref) < 1e-5
    for name, layer in convs:
        for attr, key in (("lora_A", "lora_A.default.weight"), ("lora_B", "lora_B.default.weight")):
            assert rel_err(getattr(layer, attr).grad, ref_grads[f"base_model.model.{name}.{key}"]) < 1e-5
    # state_dict keys keep peft's base names except the adapter keys, shapes as the Conv1D stored them
    after = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in keys.items():
        if key.endswith("base_layer.weight"):
            assert after[key.replace("base_layer.", "")] == shape


# ----------------------------------------------------------------------------- inject
def test_inject_detects_conv1d_and_matches_peft():
    pm = peft_gpt2()
    model = gpt2()  # the same base weights (same seed)
    fastpeft.inject(model, fastpeft.LoRAConfig(r=4, alpha=8, target_modules=TARGETS))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, fastpeft.LoRALinear)}
    assert len(layers) == 8 and all(m.fan_in_fan_out for m in layers.values())
    with torch.no_grad():
        for name, layer in layers.items():
            peft_layer = pm.base_model.model.get_submodule(name)
            layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
            layer.lora_B.copy_(peft_layer.lora_B["default"].weight)
    assert rel_err(hidden(model, IDS), hidden(pm, IDS)) < 1e-5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{t}" for n in layers for t in ("lora_A", "lora_B")}


def test_inject_warns_when_fan_in_fan_out_contradicts_the_layer():
    model = gpt2()
    with pytest.warns(UserWarning, match="fan_in_fan_out=False but .*Conv1D"):
        fastpeft.inject(model, fastpeft.LoRAConfig(r=2, target_modules=["c_fc"], fan_in_fan_out=False))
    assert model.h[0].mlp.c_fc.fan_in_fan_out
    mlp = nn.Sequential(nn.Linear(5, 6))
    with pytest.warns(UserWarning, match="fan_in_fan_out=True but .*nn.Linear"):
        fastpeft.inject(mlp, fastpeft.LoRAConfig(r=2, fan_in_fan_out=True))
    assert not mlp[0].fan_in_fan_out
    with pytest.raises(TypeError, match="fan_in_fan_out"):
        fastpeft.LoRAConfig(fan_in_fan_out="yes")


def test_from_linear_on_conv1d_keeps_the_parameter_and_refuses_bad_input():
    conv = Conv1D(6, 5)  # nf = 6 outputs, nx = 5 inputs: weight [5, 6]
    layer = fastpeft.LoRALinear.from_linear(conv, r=2)
    assert layer.weight is conv.weight and (layer.in_features, layer.out_features) == (5, 6)
    assert "fan_in_fan_out=True" in repr(layer)
    with pytest.raises(TypeError, match="fan_in_fan_out must be True or False"):
        fastpeft.PEFTLinear(conv.weight, conv.bias, fan_in_fan_out=1)
    with pytest.raises(TypeError, match="transformers Conv1D"):
        fastpeft.LoRALinear.from_linear(nn.Conv1d(3, 4, 1), r=2)
    with pytest.raises(NotImplementedError, match="Conv1D"):
        fastpeft.quantize(nn.Sequential(Conv1D(64, 64)), "nf4")


# ----------------------------------------------------------------------------- merge / unmerge, accounting
def test_merge_writes_the_kn_storage_in_place_and_unmerge_restores_it():
    pm = peft_gpt2()
    model = fastpeft.from_peft(pm)
    y0 = hidden(model, IDS)
    layer = model.h[1].attn.c_attn
    w = layer.weight
    w0, ptr = w.detach().clone(), w.data_ptr()
    delta = layer.lora_scale * (layer.lora_B @ layer.lora_A).detach()  # [N, K]
    report = fastpeft.count_parameters(model)
    fastpeft.merge(model)
    assert layer.weight is w and w.data_ptr() == ptr and tuple(w.shape) == tuple(w0.shape)
    assert rel_err(w.detach().double(), (w0.double() + delta.double().t())) < 1e-6
    assert rel_err(hidden(model, IDS), y0) < 1e-5
    merged = fastpeft.count_parameters(model)
    assert {c: v["changed"] for c, v in merged.items()} == {c: v["changed"] for c, v in report.items()}
    assert merged.ranks == report.ranks and set(report.ranks.values()) == {4}
    fastpeft.unmerge(model)
    assert rel_err(w.detach(), w0) < 1e-6
    assert rel_err(hidden(model, IDS), y0) < 1e-5


def test_delta_penalty_of_a_conv1d_layer_is_the_definition():
    model = fastpeft.from_peft(peft_gpt2())
    layer = model.h[0].mlp.c_proj
    want = (layer.lora_scale * layer.lora_B.double() @ layer.lora_A.double()).square().sum()
    got = fastpeft.delta_penalty(nn.ModuleDict({"l": layer}), "l2")
    assert abs(float(got.detach()) - float(want)) <= 1e-5 * float(want)


# ----------------------------------------------------------------------------- peft checkpoints
def test_save_adapter_loads_in_peft(tmp_path):
    pm = peft_gpt2()
    y = hidden(pm, IDS)
    model = fastpeft.from_peft(pm)
    fastpeft.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["lora_bias"] is False
    loaded = peft.PeftModel.from_pretrained(gpt2(), tmp_path).eval()
    assert rel_err(hidden(loaded, IDS), y) < 1e-6


def test_load_adapter_reads_a_peft_gpt2_checkpoint(tmp_path):
    pm = peft_gpt2()
    y = hidden(pm, IDS)
    pm.save_pretrained(tmp_path)
    model = fastpeft.load_adapter(gpt2(), tmp_path)
    layers = [m for m in model.modules() if isinstance(m, fastpeft.LoRALinear)]
    assert len(layers) == 8 and all(m.fan_in_fan_out and isinstance(m.weight, nn.Parameter) for m in layers)
    assert rel_err(hidden(model, IDS), y) < 1e-6
    # loading again into the converted model overwrites in place
    a = layers[0].lora_A
    fastpeft.load_adapter(model, tmp_path)
    assert layers[0].lora_A is a


# ----------------------------------------------------------------------------- the other paths on a Conv1D base
def test_ia3_on_conv1d_matches_peft_merges_and_penalises_the_nk_weight():
    torch.manual_seed(0)
    pm = peft.get_peft_model(gpt2(), peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                                                   feedforward_modules=["mlp.c_proj"], init_ia3_weights=False)).eval()
    g = torch.randn(2, 7, 32)
    y_ref, ref_grads = float64_outputs_and_grads(pm, g)
    model = fastpeft.from_peft(pm)
    attn, proj = model.h[0].attn.c_attn, model.h[0].mlp.c_proj
    assert attn.fan_in_fan_out and attn.ia3_out is not None and proj.ia3_in is not None
    y = hidden(model, IDS)
    (y * g).sum().backward()
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(proj.ia3_in.grad, ref_grads["base_model.model.h.0.mlp.c_proj.ia3_l.default"].reshape(-1)) < 1e-5
    # ΔW = W diag(ia3_in) - W on the [N, K] view: the penalty is its definition
    w = proj.weight.detach().double().t()
    want = (w * (proj.ia3_in.detach().double() - 1)).square().sum()
    got = fastpeft.delta_penalty(nn.ModuleDict({"l": proj}), "l2")
    assert abs(float(got.detach()) - float(want)) <= 1e-6 * float(want)
    fastpeft.merge(model)
    assert rel_err(hidden(model, IDS), y_ref) < 1e-5
    fastpeft.unmerge(model)
    assert rel_err(hidden(model, IDS), y_ref) < 1e-5


def test_dora_on_conv1d_matches_peft_and_merges():
    pm = peft_gpt2(use_dora=True)
    y_ref, _ = float64_outputs_and_grads(pm, torch.randn(2, 7, 32))
    model = fastpeft.from_peft(pm)
    layer = model.h[1].mlp.c_fc
    assert layer.fan_in_fan_out and layer.dora_magnitude is not None
    assert rel_err(hidden(model, IDS), y_ref) < 1e-5
    fastpeft.merge(model)
    assert rel_err(hidden(model, IDS), y_ref) < 1e-5
    fastpeft.unmerge(model)
    assert rel_err(hidden(model, IDS), y_ref) < 1e-5
    # a new DoRA layer's magnitude is ‖W‖ per output row of the [N, K] view
    fresh = fastpeft.LoRALinear.from_linear(Conv1D(6, 5), r=2, use_dora=True)
    assert torch.allclose(fresh.dora_magnitude, fresh.weight.detach().norm(dim=0))


def test_sparse_gradient_selection_on_conv1d_indexes_the_nk_weight():
    model = gpt2()
    config = fastpeft.SparseConfig(density=0.05, target_modules=["h.0.mlp.c_fc"])

    def loss_fn(out, batch):
        return out.last_hidden_state.square().sum()

    scores = fastpeft.methods.sparse_select.accumulate_squared_gradients(model, [{"input_ids": IDS}],
                                                                        config.target_modules, loss_fn)
    conv = model.h[0].mlp.c_fc
    assert tuple(scores["h.0.mlp.c_fc"].shape) == (conv.nf, conv.weight.shape[0])  # [N, K]
    ref = copy.deepcopy(model)
    w = ref.h[0].mlp.c_fc.weight
    w.requires_grad_(True)
    loss_fn(ref(input_ids=IDS), None).backward()
    assert rel_err(scores["h.0.mlp.c_fc"], w.grad.t().square()) < 1e-6
    indices = fastpeft.select_sparse_by_gradient(model, [{"input_ids": IDS}], config, loss_fn=loss_fn)
    fastpeft.inject(model, fastpeft.SparseConfig(density=0.05, target_modules=["h.0.mlp.c_fc"], selection="gradient",
                                                 indices=indices))
    layer = model.h[0].mlp.c_fc
    top = w.grad.t().square().reshape(-1).topk(layer.sparse_index.numel()).indices.sort().values
    assert torch.equal(layer.sparse_index, top)
    with torch.no_grad():
        layer.sparse_value.normal_()
    x = torch.randn(3, conv.weight.shape[0])
    dense = conv.weight.detach().t().clone().reshape(-1)
    dense[layer.sparse_index] += layer.sparse_value.detach()
    assert rel_err(layer(x), x @ dense.view(conv.nf, -1).t() + conv.bias.detach()) < 1e-5


def test_dora_on_conv1d_computes_the_weight_norm_once(monkeypatch):
    """The op gets a fresh weight.t() view per forward; ‖W‖²_row is cached on the [K, N] Parameter it
    views (a training step changes A and B, not W), and a view of another layout is not served it."""
    from fastpeft.core import dora

    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    layer = fastpeft.LoRALinear.from_linear(Conv1D(6, 5), r=2, use_dora=True)
    calls = []
    real = dora._row_sq_norms
    monkeypatch.setattr(dora, "_row_sq_norms", lambda w, dt: calls.append(tuple(w.shape)) or real(w, dt))
    x = torch.randn(3, 5)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        layer(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert calls == [(6, 5)]
    w = layer.weight  # [5, 6]
    assert torch.allclose(dora.weight_sq_norms(w), w.detach().square().sum(1))  # not the cached view's
    assert torch.allclose(dora.weight_sq_norms(w.t()), w.detach().square().sum(0))
