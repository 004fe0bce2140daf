"""fastpeft.quantize(model, ...) + inject: QLoRA on whole models (the base quantized in place)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.quant.model import is_quantized
from fastpeft.tools.equivalence import rel_err


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@pytest.mark.parametrize("order", ["quantize-then-inject", "inject-then-quantize"])
def test_quantize_and_inject_lora_match_the_dequantized_model_and_train(fmt, order):
    model = mlp()
    cfg = fastpeft.LoRAConfig(r=4, alpha=8, target_modules=["0", "2"])
    if order == "quantize-then-inject":
        fastpeft.quantize(model, fmt)
        fastpeft.inject(model, cfg)
    else:
        fastpeft.inject(model, cfg)
        fastpeft.quantize(model, fmt)
    assert all(is_quantized(model[i]) for i in (0, 2, 4))
    with torch.no_grad():
        for i in (0, 2):
            model[i].lora_B.normal_(0, 0.1)
    x = torch.randn(7, 64)
    # LoRA on each adapted layer: y = W_q x + b + s (x Aᵀ) Bᵀ, in float64
    ref = x.double()
    for m in model:
        if isinstance(m, fastpeft.PEFTLinear):
            y = ref @ m.weight.dequantize().double().t() + m.bias.double()
            if m.lora_A is not None:
                y = y + m.lora_scale * (ref @ m.lora_A.double().t()) @ m.lora_B.double().t()
            ref = y
        else:
            ref = m(ref)
    assert rel_err(model(x), ref) < 1e-5
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(any(p is getattr(model[i], n) for i in (0, 2) for n in ("lora_A", "lora_B"))
                             for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    target = torch.randn(7, 10)
    losses = []
    for _ in range(4):
        loss = (model(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_state_dict_round_trip_and_resident_bytes():
    model = fastpeft.quantize(mlp(), "nf4")
    state = model.state_dict()
    assert any(k.startswith("0.weight_") for k in state) and "0.weight" not in state
    fresh = fastpeft.quantize(mlp(seed=1), "nf4")
    fresh.load_state_dict(state)
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), model(x))


def test_merge_of_a_quantized_base_raises_and_leaves_it():
    model = fastpeft.inject(fastpeft.quantize(mlp(), "nf4"), fastpeft.LoRAConfig(r=2, target_modules=["0"]))
    before = {k: v.clone() for k, v in model[0].weight.tensors().items()}
    with pytest.raises(RuntimeError, match="quantized"):
        model[0].merge()
    assert all(torch.equal(before[k], v) for k, v in model[0].weight.tensors().items())
    assert not model[0].merged


@pytest.mark.parametrize("case,error,match", [
    ("format", ValueError, "format must be one of"),
    ("no match", ValueError, "matched no linear layer"),
    ("twice", ValueError, "already quantized"),
    ("merged", ValueError, "is merged: unmerge it before quantizing"),
])
def test_quantize_bad_input_leaves_the_model_as_it_was(case, error, match):
    model = mlp()
    kwargs = {}
    if case == "format":
        kwargs["format"] = "nf3"
    elif case == "no match":
        kwargs["target_modules"] = ["nope"]
    elif case == "twice":
        fastpeft.quantize(model, "nf4", target_modules=["0"])
    elif case == "merged":
        fastpeft.inject(model, fastpeft.LoRAConfig(r=2, target_modules=["2"]))
        model[2].merge()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model]
    with pytest.raises(error, match=match):
        fastpeft.quantize(model, **{"format": "nf4", **kwargs})
    assert [type(m) for m in model] == types
    assert {k: v for k, v in model.state_dict().items()}.keys() == snapshot.keys()
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())
