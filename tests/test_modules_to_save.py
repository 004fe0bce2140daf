"""peft's modules_to_save through fastpeft: from_peft keeps peft's trained copies working, save_adapter /
load_adapter write and read them in peft's format (<path>.<key> tensors + the config's modules_to_save),
and fastpeft's own declarations (LoRAConfig(modules_to_save=...), ModelWithHead's head) use that format."""
import json
import warnings

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.tools.equivalence import rel_err

peft = pytest.importorskip("peft")
safetensors = pytest.importorskip("safetensors.torch")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(10, 16)
        self.norm = nn.BatchNorm1d(16)  # a buffer-carrying module saved in full (running stats)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.lin(x))))


def _base(seed=0):
    torch.manual_seed(seed)
    return Net()


def _peft(seed=1):
    pm = peft.get_peft_model(_base(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"],
                                                      modules_to_save=["head", "norm"]))
    torch.manual_seed(seed)
    with torch.no_grad():  # trained-looking adapters and copies
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
        pm.base_model.model.norm.modules_to_save["default"].running_mean.normal_()
    return pm.eval()


def test_from_peft_keeps_the_trained_copies():
    pm, twin = _peft(), _peft()
    pm.train(), twin.train()
    x = torch.randn(8, 10, dtype=torch.float32)
    want = twin(x)
    want.square().sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the wrappers stay on peft's path without a warning: they are correct
        fastpeft.from_peft(pm)
    root = pm.get_base_model()
    assert isinstance(root.lin, fastpeft.LoRALinear)
    assert type(root.head).__name__ == "ModulesToSaveWrapper"
    out = root(x)
    assert rel_err(out, want) < 1e-6
    out.square().sum().backward()
    for mod in ("head", "norm"):
        ours = dict(getattr(root, mod).modules_to_save["default"].named_parameters())
        theirs = dict(getattr(twin.base_model.model, mod).modules_to_save["default"].named_parameters())
        for n, p in ours.items():
            assert p.requires_grad and rel_err(p.grad, theirs[n].grad) < 1e-5, (mod, n)
        assert getattr(root, mod).original_module.weight.grad is None
    with pm.disable_adapter():  # peft's own disable: the original head, no LoRA
        plain = _base()
        plain.train()
        assert rel_err(root(x), plain(x)) < 1e-6


def test_save_after_from_peft_restores_in_peft(tmp_path):
    pm = _peft()
    x = torch.randn(6, 10)
    want = pm(x).detach()
    pm.save_pretrained(tmp_path / "peft")
    fastpeft.from_peft(pm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing trainable is skipped any more
        fastpeft.save_adapter(pm, tmp_path / "ours")
    theirs = safetensors.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = safetensors.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)  # base_model.model.head.weight, ...norm.running_mean, ... as peft writes
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["head", "norm"] and config["bias"] == "none"
    back = peft.PeftModel.from_pretrained(_base(), tmp_path / "ours").eval()
    assert rel_err(back(x), want) < 1e-6


def test_load_peft_checkpoint(tmp_path):
    pm = _peft()
    x = torch.randn(6, 10)
    want = pm(x).detach()
    pm.save_pretrained(tmp_path / "peft")
    model = _base()
    original = model.head.weight
    fastpeft.load_adapter(model, tmp_path / "peft")
    model.eval()
    assert model.head.weight is original  # loaded in place
    assert rel_err(model(x), want) < 1e-6
    assert model.head.weight.requires_grad and model.norm.weight.requires_grad
    assert not model.lin.weight.requires_grad
    report = fastpeft.count_parameters(model)  # in-place changes measured against the pre-trained head
    assert report["weight"]["changed"] >= model.head.weight.numel()
    fastpeft.save_adapter(model, tmp_path / "again")  # a loaded head stays declared
    again = peft.PeftModel.from_pretrained(_base(), tmp_path / "again").eval()
    assert rel_err(again(x), want) < 1e-6


def test_load_refuses_bad_modules_to_save(tmp_path):
    pm = _peft()
    pm.save_pretrained(tmp_path / "peft")
    model = _base()
    model.head = nn.Linear(16, 5)  # another class count
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"head\.(weight|bias): checkpoint shape \[3"):
        fastpeft.load_adapter(model, tmp_path / "peft")
    assert type(model.lin) is nn.Linear
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_native_modules_to_save_written_as_peft(tmp_path):
    model = _base()
    # norm: its running statistics move while training (buffers are saved with the module, as peft saves them)
    fastpeft.inject(model, fastpeft.LoRAConfig(r=4, alpha=8, target_modules=["lin"], modules_to_save=["head", "norm"]))
    assert model.head.weight.requires_grad
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(16, 10)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    model.eval()
    want = model(x).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastpeft.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["head", "norm"]
    keys = safetensors.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {"base_model.model.head.weight", "base_model.model.head.bias", "base_model.model.norm.running_mean"} <= set(keys)
    back = peft.PeftModel.from_pretrained(_base(), tmp_path / "ours").eval()
    assert rel_err(back(x), want) < 1e-6
    loaded = fastpeft.load_adapter(_base(), tmp_path / "ours").eval()
    assert rel_err(loaded(x), want) < 1e-6


def test_model_with_head_saves_its_head(tmp_path):
    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(12, 12)

        def forward(self, x):
            return torch.relu(self.proj(x))

    def build():
        torch.manual_seed(0)
        return fastpeft.ModelWithHead(Backbone(), fastpeft.ClassificationHead(12, 4, pooling="none", dropout=0.0))

    model = build()
    fastpeft.inject(model, fastpeft.LoRAConfig(r=2, target_modules=["proj"]))
    with torch.no_grad():
        model.head.weight.add_(1.0)
        model.backbone.proj.lora_B.normal_()
    x = torch.randn(5, 12)
    want = model(x).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastpeft.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head"]
    back = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    assert rel_err(back(x), want) < 1e-6
