"""from_peft of peft QLoRA models: LoRA over bitsandbytes Linear4bit (NF4) / Linear8bitLt (int8) bases.

The converted layer's weight is ``fastpeft.QuantizedWeight.from_bnb(base.weight)`` (bnb's packed
storage, shared); outputs and gradients are checked, like peft's, against float64 on bnb's own
dequantized weight.  Regression: bnb's Linear4bit subclasses nn.Linear, and from_peft used to take
it for a plain base (a [N·K/2, 1] "weight"; an int8 weight for Linear8bitLt).
"""
import warnings

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.tools.equivalence import rel_err

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbF  # noqa: E402

K, H, N, R = 40, 48, 24, 4


class Tiny(nn.Module):
    def __init__(self, hidden=H, k=K):
        super().__init__()
        self.up = nn.Linear(k, hidden)
        self.down = nn.Linear(hidden, N)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _q4(lin: nn.Linear, quant_type="nf4") -> nn.Module:
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=True, quant_type=quant_type,
                          compute_dtype=torch.float32)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=quant_type)
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


def _q8(lin: nn.Linear) -> nn.Module:
    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=True, has_fp16_weights=False)
    q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


def _dequantized(base) -> torch.Tensor:
    """bnb's own dense view of the base weight (the ground truth's W)."""
    w = base.weight
    if getattr(w, "quant_state", None) is not None:
        return bnbF.dequantize_4bit(w.data, w.quant_state)
    scb = w.SCB if w.SCB is not None else base.state.SCB  # after a forward bnb keeps CB/SCB on base.state
    return bnbF.int8_vectorwise_dequant(w.data, scb)


def qlora_model(seed=0, quant_type="nf4", twins=False, hidden=H, k=K):
    """A peft LoRA model over a tiny MLP whose linears are bnb 4-bit (up) and 8-bit (down), with
    random (nonzero) LoRA factors; ``twins``: peft's own bnb layer classes (lora.bnb.Linear4bit /
    Linear8bitLt, what peft builds for a transformers model loaded in 4/8 bit).

    It is left in train mode (dropout 0, so it computes the eval function): bnb's Linear4bit repacks
    its weight for its CPU inference kernel on an eval-mode forward without gradients (see
    test_from_peft_leaves_a_cpu_repacked_base_on_peft)."""
    torch.manual_seed(seed)
    model = Tiny(hidden, k)
    model.up, model.down = _q4(model.up, quant_type), _q8(model.down)
    if twins:
        model.is_loaded_in_4bit = model.is_loaded_in_8bit = True
    pm = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=8,
                                                    target_modules=["up", "down"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    return pm


def float64_reference(pm, x):
    """y, and the gradients of (x, lora_A, lora_B per layer) of sum(y * g), all in float64."""
    layers = {"up": pm.base_model.model.up, "down": pm.base_model.model.down}
    params = {n: (layer.lora_A["default"].weight.detach().double().requires_grad_(),
                  layer.lora_B["default"].weight.detach().double().requires_grad_()) for n, layer in layers.items()}
    xx = x.detach().double().requires_grad_()

    def lin(name, h):
        layer = layers[name]
        a, b = params[name]
        w = _dequantized(layer.base_layer).double()
        return h @ w.t() + layer.base_layer.bias.double() + layer.scaling["default"] * (h @ a.t() @ b.t())

    y = lin("down", torch.tanh(lin("up", xx)))
    return y, xx, params


def test_peft_dispatches_bnb_bases_as_assumed():
    """What the regression is about: peft puts lora.Linear (or its bnb twins) over bnb layers, and
    bnb's Linear4bit is an nn.Linear whose weight is packed [N·K/2, 1]."""
    pm = qlora_model()
    up = pm.base_model.model.up
    assert isinstance(up.base_layer, nn.Linear) and tuple(up.base_layer.weight.shape) == (H * K // 2, 1)
    pm2 = qlora_model(twins=True)
    assert type(pm2.base_model.model.up).__module__.startswith("peft.tuners.lora.bnb")


@pytest.mark.parametrize("twins", [False, True], ids=["lora.Linear", "lora.bnb twins"])
def test_from_peft_qlora_matches_peft_and_float64(twins):
    pm = qlora_model(twins=twins)
    x = torch.randn(2, 7, K)
    g = torch.randn(2, 7, N)
    # peft's outputs and gradients first (the conversion keeps the same LoRA Parameter objects)
    y_peft = pm(x)
    peft_params = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    (y_peft * g).sum().backward()
    peft_grads = {n: p.grad.clone() for n, p in peft_params.items()}
    for p in peft_params.values():
        p.grad = None
    y_ref, xx, ref_params = float64_reference(pm, x)
    (y_ref * g.double()).sum().backward()
    old = {n: pm.base_model.model.get_submodule(n).base_layer for n in ("up", "down")}

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left on peft's path
        model = fastpeft.from_peft(pm)
    for name, fmt in (("up", "nf4"), ("down", "int8")):
        layer = model.get_submodule(name)
        assert isinstance(layer, fastpeft.LoRALinear)
        assert isinstance(layer.weight, fastpeft.QuantizedWeight) and layer.weight.format == fmt
        key = "packed" if fmt == "nf4" else "CB"
        assert layer.weight.tensors()[key].data_ptr() == old[name].weight.data.data_ptr()  # bnb's storage, shared
        assert layer.bias is old[name].bias
    xg = x.clone().requires_grad_()
    y = model(xg)
    (y * g).sum().backward()
    assert rel_err(y, y_ref) < 1e-5 and rel_err(y_peft, y_ref) < 1e-5
    assert rel_err(y, y_peft) < 1e-5
    assert rel_err(xg.grad, xx.grad) < 1e-5
    for name in ("up", "down"):
        layer = model.get_submodule(name)
        a_ref, b_ref = ref_params[name]
        assert rel_err(layer.lora_A.grad, a_ref.grad) < 1e-5
        assert rel_err(layer.lora_B.grad, b_ref.grad) < 1e-5
        pa = peft_grads[f"base_model.model.{name}.lora_A.default.weight"]
        assert rel_err(layer.lora_A.grad, pa) < 1e-5


def test_from_peft_qlora_trains_the_same_parameters():
    pm = qlora_model(seed=1)
    lora = [p for n, p in pm.named_parameters() if "lora_" in n]
    model = fastpeft.from_peft(pm)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora}
    opt = torch.optim.SGD(trainable, lr=0.1)
    before = [p.detach().clone() for p in trainable]
    model(torch.randn(5, K)).square().mean().backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, trainable))


def test_from_peft_leaves_fp4_bases_on_peft_with_a_warning():
    pm = qlora_model(quant_type="fp4")
    x = torch.randn(3, K)
    y0 = pm(x)
    with pytest.warns(UserWarning, match=r"up .*Linear4bit.*quant_type='fp4'"):
        model = fastpeft.from_peft(pm)
    assert not isinstance(model.up, fastpeft.PEFTLinear)  # fp4: no fastpeft kernel, left as it was
    assert isinstance(model.down.weight, fastpeft.QuantizedWeight)
    assert rel_err(model(x), y0) < 1e-5


def test_from_peft_does_not_take_a_packed_nn_linear_subclass_for_a_plain_base():
    """Any nn.Linear subclass whose weight is not a dense [N, K] float matrix (another library's packed
    format) is left on peft's path, not read as W."""

    class PackedLinear(nn.Linear):
        pass

    torch.manual_seed(0)
    model = nn.Sequential(PackedLinear(K, N), nn.Linear(N, 5))
    model[0].weight = nn.Parameter(torch.zeros(N * K // 2, 1, dtype=torch.uint8), requires_grad=False)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=R, target_modules=["0", "1"]))
    with pytest.warns(UserWarning, match=r"not a dense \[out_features, in_features\] matrix \(torch.uint8"):
        root = fastpeft.from_peft(pm)
    assert not isinstance(root[0], fastpeft.PEFTLinear) and isinstance(root[1], fastpeft.LoRALinear)


def test_from_peft_leaves_a_cpu_repacked_base_on_peft():
    """bnb repacks a Linear4bit's weight into its own CPU kernel layout on an eval-mode forward without
    gradients (where the CPU supports it); fastpeft reads bnb's standard layout only, so that layer stays
    on peft's path (with the reason), instead of being read as garbage."""
    pm = qlora_model(hidden=64, k=128).eval()  # bnb's CPU packing needs N % 32 == 0 and K % 64 == 0
    x = torch.randn(3, 128)
    with torch.no_grad():
        y0 = pm.base_model.model.up(x)
    if not getattr(pm.base_model.model.up.base_layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack the weight on this CPU")
    with pytest.warns(UserWarning, match="packing_format_for_cpu"):
        model = fastpeft.from_peft(pm)
    assert not isinstance(model.up, fastpeft.PEFTLinear) and isinstance(model.down, fastpeft.LoRALinear)
    with torch.no_grad():
        assert torch.equal(model.up(x), y0)  # peft's layer, untouched


def test_qlora_save_adapter_loads_in_peft_and_merge_refuses(tmp_path):
    pytest.importorskip("safetensors")
    pm = qlora_model(seed=2)
    x = torch.randn(4, K)
    y = pm(x)
    model = fastpeft.from_peft(pm)
    fastpeft.save_adapter(model, tmp_path)
    torch.manual_seed(2)
    base = Tiny()
    base.up, base.down = _q4(base.up), _q8(base.down)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path).train()  # train mode (p = 0): no CPU repacking
    assert rel_err(loaded(x), y) < 1e-5
    with pytest.raises(RuntimeError, match="quantized"):
        model.up.merge()
