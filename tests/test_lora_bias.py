"""LoRA's bias on lora_B (peft's ``lora_bias=True``): y += s·lora_bias, merged into the base bias.

The op takes it as ``lora_bias`` and folds it into its bias (bias + s·lora_bias, one [N] add), so
every backend computes it; its gradient is s·Σ grad_y.  Checked against float64 and against peft
(outputs, gradients, merge), through from_peft, inject and peft checkpoints both ways.
"""
import json
import warnings

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.tools.equivalence import rel_err

BACKENDS = fastpeft.available_backends()
K, N, R = 19, 13, 3


def _case(dtype=torch.float32, with_bias=True, adapter_dtype=None):
    adapter_dtype = adapter_dtype or dtype
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, K, generator=g).to(dtype).requires_grad_()
    w = torch.randn(N, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype).requires_grad_() if with_bias else None
    a = torch.randn(R, K, generator=g).to(adapter_dtype).requires_grad_()
    b = torch.randn(N, R, generator=g).to(adapter_dtype).requires_grad_()
    beta = torch.randn(N, generator=g).to(adapter_dtype).requires_grad_()
    return x, w, bias, a, b, beta


def _float64(x, w, bias, a, b, beta, s):
    xd, ad, bd, betad = (t.detach().double().requires_grad_() for t in (x, a, b, beta))
    bias_d = bias.detach().double().requires_grad_() if bias is not None else None
    y = xd @ w.double().t() + s * (xd @ ad.t() @ bd.t() + betad)
    if bias_d is not None:
        y = y + bias_d
    return y, (xd, bias_d, ad, bd, betad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["base bias", "no base bias"])
def test_op_lora_bias_matches_float64(backend, with_bias):
    x, w, bias, a, b, beta = _case(with_bias=with_bias)
    s = 0.7
    y = fastpeft.peft_linear(x, w, bias, lora_A=a, lora_B=b, lora_scale=s, lora_bias=beta, backend=backend)
    gy = torch.randn_like(y)
    y.backward(gy)
    yd, leaves = _float64(x, w, bias, a, b, beta, s)
    yd.backward(gy.double())
    assert rel_err(y, yd) < 1e-5
    for t, td in zip((x, bias, a, b, beta), leaves):
        if t is not None:
            assert rel_err(t.grad, td.grad) < 1e-5
    assert rel_err(beta.grad, s * gy.double().sum((0, 1))) < 1e-5  # s·Σ grad_y
    ref = fastpeft.reference.peft_linear(x, w, bias, lora_A=a, lora_B=b, lora_scale=s, lora_bias=beta)
    assert rel_err(ref, yd) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_lora_bias_fp32_adapters_with_bf16_x(backend):
    x, w, bias, a, b, beta = _case(torch.bfloat16, adapter_dtype=torch.float32)
    y = fastpeft.peft_linear(x, w, bias, lora_A=a, lora_B=b, lora_scale=0.5, lora_bias=beta, backend=backend)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert beta.grad.dtype == torch.float32
    yd, _ = _float64(x, w, bias, a, b, beta, 0.5)
    assert rel_err(y, yd) < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_lora_bias_bad_input(backend):
    x, w, bias, a, b, beta = _case()
    kw = dict(lora_A=a, lora_B=b, lora_scale=0.5, backend=backend)
    with pytest.raises(ValueError, match="lora_bias needs lora_A and lora_B"):
        fastpeft.peft_linear(x, w, bias, lora_bias=beta, backend=backend)
    with pytest.raises(ValueError, match=r"lora_bias must have shape \[13\]"):
        fastpeft.peft_linear(x, w, bias, lora_bias=beta[:-1], **kw)
    with pytest.raises(TypeError, match="lora_bias must have x's dtype"):
        fastpeft.peft_linear(x, w, bias, lora_bias=beta.double(), **kw)
    with pytest.raises(TypeError, match="lora_bias must be a torch.Tensor"):
        fastpeft.peft_linear(x, w, bias, lora_bias=[0.0] * N, **kw)
    with pytest.raises(TypeError, match="lora_scale must be a float"):  # the scalars are checked first
        fastpeft.peft_linear(x, w, bias, lora_A=a, lora_B=b, lora_scale="1", lora_bias=beta[:-1], backend=backend)
    with pytest.raises(ValueError, match=r"bias must have shape \[13\]"):
        fastpeft.peft_linear(x, w, bias[:-1], lora_bias=beta, **kw)
    assert x.grad is None and beta.grad is None


# ----------------------------------------------------------------------------- the layer
def test_layer_merge_folds_it_into_the_bias_and_unmerge_takes_it_out():
    torch.manual_seed(0)
    lin = nn.Linear(K, N)
    layer = fastpeft.LoRALinear.from_linear(lin, r=R, alpha=6, lora_bias=True)
    assert isinstance(layer.lora_bias, nn.Parameter) and layer.lora_bias.requires_grad
    assert not layer.lora_bias.any()  # peft's init: zeros, so the new layer computes the linear
    x = torch.randn(4, K)
    assert torch.equal(layer(x), lin(x))
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_bias.normal_()
    y = layer(x)
    b0 = lin.bias.detach().clone()
    layer.merge()
    assert rel_err(lin.bias.detach(), b0 + layer.lora_scale * layer.lora_bias.detach()) < 1e-6
    assert rel_err(layer(x), y) < 1e-5
    layer.unmerge()
    assert rel_err(lin.bias.detach(), b0) < 1e-6 and rel_err(layer(x), y) < 1e-5
    assert "lora_bias=True" in repr(layer)


def test_merge_without_a_base_bias_raises_and_changes_nothing():
    layer = fastpeft.LoRALinear.from_linear(nn.Linear(K, N, bias=False), r=R, lora_bias=True)
    w0 = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="no base bias"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, w0) and layer.bias is None
    model = nn.Sequential(fastpeft.LoRALinear.from_linear(nn.Linear(K, N), r=R, lora_bias=True), layer)
    with pytest.raises(RuntimeError, match=r"cannot merge \['1'\]"):
        fastpeft.merge(model)
    assert not model[0].merged  # checked before any layer merged


def test_inject_lora_bias_trains_it_and_counts_it_as_adapter():
    model = nn.Sequential(nn.Linear(K, N), nn.ReLU(), nn.Linear(N, 7))
    fastpeft.inject(model, fastpeft.LoRAConfig(r=R, lora_bias=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.{t}" for i in (0, 2) for t in ("lora_A", "lora_B", "lora_bias")}
    report = fastpeft.count_parameters(model)
    assert report["adapter"]["trainable"] == (R * K + N * R + N) + (R * N + 7 * R + 7)
    with pytest.raises(ValueError, match="use_dora"):
        fastpeft.LoRAConfig(lora_bias=True, use_dora=True)
    with pytest.raises(TypeError, match="lora_bias must be True or False"):
        fastpeft.LoRAConfig(lora_bias=1)


def test_disable_adapter_drops_lora_bias_like_peft():
    peft = pytest.importorskip("peft")
    pm = _peft_mlp(peft)
    x = torch.randn(3, K)
    with pm.disable_adapter():
        y_off = pm(x)
    fastpeft.from_peft(pm)
    with pm.disable_adapter():
        assert rel_err(pm(x), y_off) < 1e-6


# ----------------------------------------------------------------------------- peft
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(K, N)
        self.lin1 = nn.Linear(N, 7)

    def forward(self, x):
        return self.lin1(torch.tanh(self.lin0(x)))


def _peft_mlp(peft, seed=0, **config):
    torch.manual_seed(seed)
    pm = peft.get_peft_model(MLP(), peft.LoraConfig(r=R, lora_alpha=5, lora_bias=True,
                                                    target_modules=["lin0", "lin1"], **config))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    return pm.eval()


def test_from_peft_lora_bias_matches_peft_and_merges_like_peft():
    peft = pytest.importorskip("peft")
    pm = _peft_mlp(peft)
    x = torch.randn(6, K, dtype=torch.float64)
    ref = _peft_mlp(peft).double()  # float64 ground truth: the same model in float64
    y_ref = ref(x)
    y_ref.sum().backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    y_peft = pm(x.float())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = fastpeft.from_peft(pm)
    assert model.lin0.lora_bias is pm.base_model.model.lin0.lora_bias  # the very Parameter
    y = model(x.float())
    y.sum().backward()
    assert rel_err(y, y_ref) < 1e-5 and rel_err(y_peft, y_ref) < 1e-5
    for name in ("lin0", "lin1"):
        layer = getattr(model, name)
        for attr, key in (("lora_bias", "lora_B.default.bias"), ("lora_A", "lora_A.default.weight"),
                          ("lora_B", "lora_B.default.weight")):
            assert rel_err(getattr(layer, attr).grad, ref_grads[f"base_model.model.{name}.{key}"]) < 1e-5
    # peft's merge of the same adapter gives the same base bias
    twin = _peft_mlp(peft).merge_and_unload()
    fastpeft.merge(model)
    for name in ("lin0", "lin1"):
        assert rel_err(getattr(model, name).bias.detach(), getattr(twin, name).bias.detach()) < 1e-6
        assert rel_err(getattr(model, name).weight.detach(), getattr(twin, name).weight.detach()) < 1e-6


def test_from_peft_gpt2_conv1d_with_lora_bias():
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from test_conv1d import IDS, hidden, peft_gpt2

    pm = peft_gpt2(lora_bias=True)
    y = hidden(pm, IDS)
    model = fastpeft.from_peft(pm)
    assert model.h[0].attn.c_attn.lora_bias is not None and model.h[0].attn.c_attn.fan_in_fan_out
    assert rel_err(hidden(model, IDS), y) < 1e-5
    fastpeft.merge(model)
    assert rel_err(hidden(model, IDS), y) < 1e-5


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_checkpoints_both_ways(tmp_path, bias):
    peft = pytest.importorskip("peft")
    pytest.importorskip("safetensors")
    x = torch.randn(5, K)
    # peft -> fastpeft
    pm = _peft_mlp(peft, bias=bias)
    y = pm(x)
    pm.save_pretrained(tmp_path / "peft")
    torch.manual_seed(0)
    model = fastpeft.load_adapter(MLP(), tmp_path / "peft")
    assert model.lin0.lora_bias is not None and model.lin0.lora_bias.requires_grad
    assert rel_err(model(x), y) < 1e-6
    # fastpeft -> peft
    fastpeft.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(MLP(), tmp_path / "ours").eval()
    assert rel_err(loaded(x), y) < 1e-6


def test_load_refuses_a_lora_B_bias_the_config_does_not_declare(tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("safetensors")
    _peft_mlp(peft).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config["lora_bias"] = False
    path.write_text(json.dumps(config))
    torch.manual_seed(0)
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="bias on lora_B but its config says lora_bias=False"):
        fastpeft.load_adapter(model, tmp_path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert isinstance(model.lin0, nn.Linear) and not isinstance(model.lin0, fastpeft.PEFTLinear)
