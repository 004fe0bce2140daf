"""Regression tests for the peft interop defects of issue 12 (items 1, 6, 9, 15, 16, 17, 18, 19).

Small toy models only (the real MiniLM runs in test_interop.py): every test builds its models
from a fixed seed, so a fresh ``Toy()`` after ``torch.manual_seed(0)`` is the pre-trained base.
"""
import copy
import json
import os
import pickle
import warnings

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.tools.equivalence import rel_err

peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")

from peft import IA3Config, LoraConfig, PeftModel, get_peft_model  # noqa: E402

IDS = torch.tensor([[1, 2, 3], [4, 5, 9]])


class Toy(nn.Module):
    def __init__(self, ff_out=5):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.q = nn.Linear(8, 6)
        self.ff = nn.Linear(6, ff_out)

    def forward(self, ids):
        return self.ff(torch.relu(self.q(self.emb(ids))))


def base(**kwargs):
    torch.manual_seed(0)
    return Toy(**kwargs)


def lora_toy(**kwargs):
    kwargs.setdefault("target_modules", ["q", "ff"])
    return get_peft_model(base(), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **kwargs))


def ia3_toy():
    pm = get_peft_model(base(), IA3Config(target_modules=["q", "ff"], feedforward_modules=["ff"]))
    with torch.no_grad():  # move the vectors away from ones, so their gradients are not trivial
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(n)))
    return pm


def objective(out):
    return (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))).sum()


def snapshot(model):
    """Everything load_adapter / from_peft may touch: module types, Parameter objects, values, flags."""
    return {"modules": [(n, type(m)) for n, m in model.named_modules()],
            "params": {n: (id(p), p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()},
            "rng": torch.get_rng_state()}


def assert_unchanged(model, snap):
    now = snapshot(model)
    assert now["modules"] == snap["modules"]
    assert now["params"].keys() == snap["params"].keys()
    for n, (pid, value, flag) in snap["params"].items():
        assert now["params"][n][0] == pid and now["params"][n][2] == flag, n
        assert torch.equal(now["params"][n][1], value), n
    assert all(torch.equal(now["buffers"][n], b) for n, b in snap["buffers"].items())
    assert torch.equal(now["rng"], snap["rng"])


def trained_lora_model(seed=1, ff_out=5):
    model = fastpeft.inject(base(ff_out=ff_out), fastpeft.LoRAConfig(r=2, alpha=4, target_modules=["q", "ff"]))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for m in (model.q, model.ff):
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g))
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))
    return model.eval()


def no_peft_layers(model):
    return [n for n, m in model.named_modules() if type(m).__module__.startswith("peft.")]


# ----------------------------------------------------------------------------- item 1
def test_load_adapter_refuses_a_merged_layer_and_changes_nothing(tmp_path):
    fastpeft.save_adapter(trained_lora_model(seed=2), tmp_path)
    model = trained_lora_model(seed=1)
    pristine = {n: p.detach().clone() for n, p in base().named_parameters()}
    fastpeft.merge(model)
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match=r"'(q|ff)' is merged.*unmerge"):
        fastpeft.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)
    fastpeft.unmerge(model)  # the pre-trained weight comes back (it did not before: the old adapter stayed in it)
    torch.testing.assert_close(model.q.weight, pristine["q.weight"], rtol=0, atol=1e-5)
    torch.testing.assert_close(model.ff.weight, pristine["ff.weight"], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- item 6
def _files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_save_adapter_that_fails_leaves_the_old_checkpoint_intact(tmp_path):
    fastpeft.save_adapter(trained_lora_model(seed=1), tmp_path)
    old = _files(tmp_path)
    with pytest.raises(TypeError, match="base_model_name_or_path"):
        fastpeft.save_adapter(trained_lora_model(seed=2), tmp_path, base_model_name_or_path=object())
    assert _files(tmp_path) == old
    fastpeft.load_adapter(base(), tmp_path)  # still loadable


def test_save_adapter_swaps_files_in_all_or_nothing(tmp_path, monkeypatch):
    fastpeft.save_adapter(trained_lora_model(seed=1), tmp_path)
    old = _files(tmp_path)
    real_replace = os.replace

    def failing_replace(src, dst):  # the disk fills up when the config is swapped in
        if os.path.basename(dst) == "adapter_config.json" and str(src).endswith(".tmp"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        fastpeft.save_adapter(trained_lora_model(seed=2), tmp_path)
    monkeypatch.undo()
    assert _files(tmp_path) == old  # weights rolled back, no temporary files left behind
    fastpeft.save_adapter(trained_lora_model(seed=2), tmp_path)
    assert _files(tmp_path).keys() == old.keys() and _files(tmp_path) != old


def test_save_adapter_config_values_that_json_cannot_write_natively(tmp_path):
    """A scale held as a numpy / 0-d tensor value used to crash json after the weights were written."""
    np = pytest.importorskip("numpy")
    model = trained_lora_model(seed=1)
    with torch.no_grad():
        ref = model(IDS)
    model.q.lora_scale = np.float32(model.q.lora_scale)
    model.ff.lora_dropout = np.float32(0.0)
    fastpeft.save_adapter(model, tmp_path)
    with torch.no_grad():
        assert rel_err(fastpeft.load_adapter(base(), tmp_path).eval()(IDS), ref) < 1e-6


# ----------------------------------------------------------------------------- item 9
def test_load_adapter_validates_everything_before_changing_the_model(tmp_path):
    fastpeft.save_adapter(trained_lora_model(seed=1, ff_out=7), tmp_path / "other")  # another model's checkpoint
    model = base()  # q matches, ff has 5 outputs, not 7
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"ff\.lora_B.*\[7, 2\]"):
        fastpeft.load_adapter(model, tmp_path / "other")
    assert_unchanged(model, snap)

    fastpeft.save_adapter(trained_lora_model(seed=1), tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "adapter_config.json").read_text())
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps({**config, "lora_dropout": 1.5}))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="lora_dropout"):
        fastpeft.load_adapter(model, tmp_path / "bad")
    assert_unchanged(model, snap)

    class Smaller(nn.Module):  # has q (sorted first in the checkpoint) but no ff
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(8, 6)

    fastpeft.save_adapter(fastpeft.inject(base(), fastpeft.LoRAConfig(r=2, target_modules=["q", "ff"])),
                          tmp_path / "toy")
    small = Smaller()
    snap = snapshot(small)
    with pytest.raises(KeyError, match="ff"):
        fastpeft.load_adapter(small, tmp_path / "toy")
    assert_unchanged(small, snap)


# ----------------------------------------------------------------------------- item 15
@pytest.mark.parametrize("when", ["between_forward_and_backward", "accumulating"])
def test_from_peft_ia3_with_a_pending_backward(when):
    pm = ia3_toy()
    twin = copy.deepcopy(pm)
    if when == "accumulating":  # a first micro-batch already accumulated its gradients
        objective(pm(IDS)).backward()
        objective(twin(IDS)).backward()
    loss, twin_loss = objective(pm(IDS)), objective(twin(IDS))
    model = fastpeft.from_peft(pm)
    loss.backward()  # the graph was built by peft's layers, before the vectors were reshaped
    twin_loss.backward()
    twin_vectors = {n: p for n, p in twin.get_base_model().named_parameters() if "ia3_l" in n}
    for layer, attr in ((model.q, "ia3_out"), (model.ff, "ia3_in")):
        vec = getattr(layer, attr)
        twin_vec = [p for n, p in twin_vectors.items() if n.startswith("q." if layer is model.q else "ff.")][0]
        assert vec.grad.shape == vec.shape == (twin_vec.numel(),)
        torch.testing.assert_close(vec.grad, twin_vec.grad.reshape(-1))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    twin_opt = torch.optim.Adam([p for p in twin.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.step()
        twin_opt.step()
        opt.zero_grad()
        twin_opt.zero_grad()
        objective(model(IDS)).backward()
        objective(twin(IDS)).backward()
    with torch.no_grad():
        assert rel_err(model(IDS), twin(IDS)) < 1e-6
    pickle.loads(pickle.dumps(model))  # the fix-up hooks do not make the model unpicklable


def test_from_peft_ia3_feedforward_after_forward_and_backward_trains():
    """The loss of the last peft step still holds its graph (a training loop's `loss` variable)."""
    pm = ia3_toy()
    twin = copy.deepcopy(pm)
    loss = objective(pm(IDS))
    loss.backward()
    objective(twin(IDS)).backward()
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    twin_opt = torch.optim.Adam([p for p in twin.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    twin_opt.step()
    model = fastpeft.from_peft(pm, optimizer=opt)
    for _ in range(3):
        opt.zero_grad()
        twin_opt.zero_grad()
        objective(model(IDS)).backward()
        objective(twin(IDS)).backward()
        opt.step()
        twin_opt.step()
    assert model.ff.ia3_in.shape == (6,) and model.q.ia3_out.shape == (6,)
    with torch.no_grad():
        assert rel_err(model(IDS), twin(IDS)) < 1e-6
    del loss


# ----------------------------------------------------------------------------- item 16
class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(self.mha(x, x, x)[0])


def test_from_peft_leaves_layers_inside_a_peft_layer_alone():
    torch.manual_seed(0)
    pm = get_peft_model(WithAttention(), LoraConfig(r=2, target_modules=["mha", "lin"], init_lora_weights=False))
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        ref = pm(x)
    with pytest.warns(UserWarning, match=r"mha \(peft\.tuners\.lora\.layer\.MultiheadAttention"):
        model = fastpeft.from_peft(pm)
    assert isinstance(model.lin, fastpeft.LoRALinear)
    assert type(model.mha.base_layer.out_proj).__module__.startswith("peft.")  # peft's own inner layer
    names = [n for n, _ in model.named_modules()]
    assert "mha.base_layer.out_proj.lora_A.default" in names
    assert any(k.startswith("mha.base_layer.out_proj") for k in model.state_dict())
    out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    objective(out).backward()
    assert model.lin.lora_B.grad is not None


# ----------------------------------------------------------------------------- item 17
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_rewriting_inits_round_trip_like_peft(tmp_path, init):
    pm = get_peft_model(base(), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "ff"], init_lora_weights=init))
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    objective(pm(IDS)).backward()
    opt.step()
    with torch.no_grad():
        ref = pm(IDS)
        assert rel_err(base()(IDS), ref) > 1e-3  # the adapters moved away from the init
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():  # peft's checkpoint, read by fastpeft onto the original base model
        assert rel_err(fastpeft.load_adapter(base(), tmp_path / "peft").eval()(IDS), ref) < 1e-5

    model = fastpeft.from_peft(pm)
    fastpeft.save_adapter(model, tmp_path / "fast")
    config = json.loads((tmp_path / "fast" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == init
    with torch.no_grad():
        assert rel_err(PeftModel.from_pretrained(base(), tmp_path / "fast")(IDS), ref) < 1e-5
        loaded = fastpeft.load_adapter(base(), tmp_path / "fast").eval()
        assert rel_err(loaded(IDS), ref) < 1e-5
    fastpeft.save_adapter(loaded, tmp_path / "again")  # the init survives a second round
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["init_lora_weights"] == init


@pytest.mark.parametrize("init", ["corda", "loftq", "lora_ga", "pissa_niter_4"])
def test_load_adapter_refuses_inits_it_cannot_rerun(tmp_path, init):
    fastpeft.save_adapter(trained_lora_model(), tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": init}))
    model = base()
    snap = snapshot(model)
    with pytest.raises(NotImplementedError, match=f"init_lora_weights={init!r}"):
        fastpeft.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


def test_base_rewriting_init_is_not_silently_dropped(tmp_path):
    pm = get_peft_model(base(), LoraConfig(r=2, target_modules=["q"], init_lora_weights="pissa"))
    model = fastpeft.from_peft(pm)
    fastpeft.inject(model, fastpeft.LoRAConfig(r=2, target_modules=["ff"]))  # a plain LoRA layer beside it
    with pytest.raises(ValueError, match="pissa"):
        fastpeft.save_adapter(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    model = base()
    fastpeft.inject(model, fastpeft.LoRAConfig(r=2, target_modules=["q"]))
    snap_dir = tmp_path / "pissa"
    get_peft_model(base(), LoraConfig(r=2, target_modules=["q"], init_lora_weights="pissa")).save_pretrained(snap_dir)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"pissa.*'q'"):  # its base weight may already be a residual
        fastpeft.load_adapter(model, snap_dir)
    assert_unchanged(model, snap)


# ----------------------------------------------------------------------------- item 18
def test_peft_wrapper_methods_after_from_peft(tmp_path):
    pm = lora_toy(target_modules=["emb", "q", "ff"])  # the embedding's LoRA becomes a fastpeft.LoRAEmbedding
    with torch.no_grad():
        adapted = pm(IDS)
        plain = base()(IDS)
    model = fastpeft.from_peft(pm)
    keys = list(model.state_dict())

    with pytest.raises(RuntimeError, match=r"fastpeft\.save_adapter"):
        pm.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(RuntimeError, match=r"fastpeft\.merge"):
        pm.merge_and_unload()
    with pytest.raises(RuntimeError, match=r"fastpeft\.merge"):
        pm.base_model.merge_and_unload()

    with torch.no_grad():
        with pm.disable_adapter():
            torch.testing.assert_close(pm(IDS), plain, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pm(IDS), adapted, rtol=1e-5, atol=1e-6)
    assert list(model.state_dict()) == keys
    with pytest.raises(RuntimeError, match=r"fastpeft\.save_adapter"):
        copy.deepcopy(pm).save_pretrained(tmp_path / "out")
    pickle.loads(pickle.dumps(pm))

    pm = lora_toy()  # every layer converted: no peft layer is left for peft's own disable_adapter
    with torch.no_grad():
        adapted = pm(IDS)
    model = fastpeft.from_peft(pm)
    with torch.no_grad():
        with pm.disable_adapter():
            torch.testing.assert_close(pm(IDS), plain, rtol=1e-5, atol=1e-6)
        fastpeft.merge(model)
        with pytest.raises(RuntimeError, match="merged"):
            with pm.disable_adapter():
                pass
        torch.testing.assert_close(pm(IDS), adapted, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- item 19
def test_from_peft_layer_without_active_adapter_is_plain():
    pm = lora_toy(target_modules=["ff"])
    pm.add_adapter("other", LoraConfig(r=2, target_modules=["q"], init_lora_weights=False))
    with torch.no_grad():
        ref = pm(IDS)
    with pytest.warns(UserWarning, match=r"q \(no active adapter.*'other'"):
        model = fastpeft.from_peft(pm)
    assert isinstance(model.ff, fastpeft.LoRALinear)
    assert "other" in model.q.lora_A  # the inactive adapter is kept, on peft's path
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), ref, rtol=1e-5, atol=1e-6)

    pm = lora_toy(target_modules=["ff"])
    pm.add_adapter("other", LoraConfig(r=2, target_modules=["q"], init_lora_weights=False))
    pm.delete_adapter("other")  # q now holds no adapter at all
    with torch.no_grad():
        ref = pm(IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = fastpeft.from_peft(pm)
    assert type(model.q) is nn.Linear and no_peft_layers(model) == []
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- item 8, through load_adapter
def test_load_adapter_keeps_a_bottleneck_adapter_and_refuses_foreign_hooks(tmp_path):
    """load_adapter replaces nn.Linear layers as inject does: an attached bottleneck adapter moves onto
    the new layer and keeps training; a linear carrying other hooks is refused with the model untouched."""
    from fastpeft.methods.adapters import AdapterConfig

    trained = trained_lora_model(seed=1)
    fastpeft.save_adapter(trained, tmp_path)
    model = base()
    AdapterConfig(bottleneck=3, target_modules=["q"]).inject(model)
    adapter = model.q.adapter
    with torch.no_grad():  # a trained adapter: not the identity any more
        adapter.up_weight.normal_(generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = trained.ff(torch.relu(adapter(trained.q(trained.emb(IDS)))))  # the adapter after q's LoRA
    fastpeft.load_adapter(model, tmp_path)
    assert isinstance(model.q, fastpeft.LoRALinear) and model.q.adapter is adapter
    assert all(p.requires_grad for p in adapter.parameters())  # still training, as after inject
    with torch.no_grad():
        assert rel_err(model(IDS), reference) < 1e-6
    objective(model(IDS)).backward()
    assert adapter.up_weight.grad is not None and adapter.up_weight.grad.abs().sum() > 0

    hooked = base()
    hooked.q.register_forward_hook(lambda module, args, out: out * 2)
    snap = snapshot(hooked)
    with pytest.raises(ValueError, match=r"'q'.*hook"):
        fastpeft.load_adapter(hooked, tmp_path)
    assert_unchanged(hooked, snap)
    assert len(hooked.q._forward_hooks) == 1
