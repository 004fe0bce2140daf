"""inject / merge on whole models: tied weights, stacking on adapters, atomic failure, meta device."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.methods.adapters import AdapterConfig, adapters_of


class TiedLM(nn.Module):
    """Embedding -> Linear -> tanh -> lm_head, lm_head.weight tied to the embedding (tie_word_embeddings)."""

    def __init__(self, vocab=23, d=10):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.body = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.body(self.emb(ids))))


def _perturb(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def _snapshot(model):
    return {"modules": dict(model.named_modules()),
            "params": [(n, p, p.requires_grad) for n, p in model.named_parameters()],
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "attrs": {n: {k: dict(v) if isinstance(v, dict) else v for k, v in vars(m).items()}
                      for n, m in model.named_modules()}}


def _assert_unchanged(model, snap):
    assert dict(model.named_modules()) == snap["modules"]  # the very same module objects under the same names
    assert [(n, p, p.requires_grad) for n, p in model.named_parameters()] == snap["params"]
    state = model.state_dict()
    assert state.keys() == snap["state"].keys()
    assert all(torch.equal(state[k], v) for k, v in snap["state"].items())
    for name, module in model.named_modules():  # no path, hook or child half-added
        now = vars(module)
        assert now.keys() == snap["attrs"][name].keys(), name
        for key, before in snap["attrs"][name].items():
            if isinstance(before, dict):
                assert dict(now[key]) == before, (name, key)
            else:
                assert now[key] is before or now[key] == before, (name, key)


# ----------------------------------------------------------------------------- item 2: tied weights
@pytest.mark.parametrize("config", [fastpeft.LoRAConfig(r=2), fastpeft.IA3Config(),
                                    fastpeft.SparseConfig(density=0.3, selection="random")],
                         ids=["lora", "ia3", "sparse"])
def test_default_targets_leave_the_tied_output_layer_out(config):
    torch.manual_seed(0)
    model = TiedLM()
    ids = torch.randint(0, 23, (3, 4))
    fastpeft.inject(model, copy.deepcopy(config))
    assert isinstance(model.body, fastpeft.PEFTLinear)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.emb.weight
    _perturb(model)
    emb = model.emb.weight.detach().clone()
    with torch.no_grad():
        before = model(ids)
        fastpeft.merge(model)
        merged = model(ids)
    assert torch.equal(model.emb.weight, emb)  # the input embeddings were not rewritten
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)


def test_default_targets_skip_tied_head_of_a_transformers_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg).eval()
    decoder = model.cls.predictions.decoder
    assert decoder.weight is model.bert.embeddings.word_embeddings.weight
    fastpeft.inject(model, fastpeft.LoRAConfig(r=2))
    assert model.cls.predictions.decoder is decoder  # left as it was, like peft's "all-linear"
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, fastpeft.LoRALinear)
    _perturb(model)
    ids = torch.randint(0, 40, (2, 5))
    emb = model.bert.embeddings.word_embeddings.weight.detach().clone()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        fastpeft.merge(model)
        after = model(input_ids=ids).logits
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, emb)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_explicit_tied_target_warns_and_merge_refuses():
    torch.manual_seed(1)
    model = TiedLM()
    with pytest.warns(UserWarning, match=r"lm_head.*tied.*emb"):
        fastpeft.inject(model, fastpeft.LoRAConfig(r=2, target_modules=["body", "lm_head"]))
    assert isinstance(model.lm_head, fastpeft.LoRALinear) and model.lm_head.weight is model.emb.weight
    _perturb(model)
    ids = torch.randint(0, 23, (2, 3))
    with torch.no_grad():
        expected = model(ids)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"lm_head.*emb"):
        fastpeft.merge(model)
    _assert_unchanged(model, snap)  # nothing merged, not even the untied body
    assert not model.body.merged and not model.lm_head.merged
    with torch.no_grad():
        assert torch.equal(model(ids), expected)
    # untied as the error says (a copy of the weight), merging works and keeps the outputs
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastpeft.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)


def test_untied_linears_are_not_reported_as_tied():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastpeft.inject(model, fastpeft.LoRAConfig(r=1, target_modules=["1"]))
        fastpeft.merge(model)
    assert model[1].merged


# ----------------------------------------------------------------------------- item 8: LoRA after adapters
@pytest.mark.parametrize("config", [fastpeft.LoRAConfig(r=2, target_modules=["0", "2"]),
                                    fastpeft.IA3Config(target_modules=["0"])], ids=["lora", "ia3"])
def test_inject_after_bottleneck_adapter_keeps_the_adapter(config):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4))
    AdapterConfig(bottleneck=3, target_modules=["0"]).inject(net)
    adapter = net[0].adapter
    with torch.no_grad():  # a trained adapter: not the identity any more
        adapter.up_weight.normal_()
    x = torch.randn(5, 6)
    with torch.no_grad():
        expected = net(x)
    fastpeft.inject(net, config)
    assert isinstance(net[0], fastpeft.PEFTLinear) and net[0].adapter is adapter
    assert adapters_of(net) == {"0.adapter": adapter}
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected)  # the adapter still runs (new paths start at identity)
    assert all(p.requires_grad for p in adapter.parameters())
    net(x).square().sum().backward()
    assert adapter.up_weight.grad is not None and adapter.up_weight.grad.abs().sum() > 0
    assert "0.adapter.up_weight" in net.state_dict()


def test_inject_refuses_to_drop_foreign_hooks():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    net[1].register_forward_hook(lambda module, args, out: out * 2)
    snap = _snapshot(net)
    with pytest.raises(ValueError, match=r"'1'.*hook"):
        fastpeft.inject(net, fastpeft.LoRAConfig(r=1))
    _assert_unchanged(net, snap)


# ----------------------------------------------------------------------------- item 9: inject is atomic
class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 7)
        self.c = nn.Linear(7, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, x):
        return self.norm(self.c(torch.relu(self.b(torch.relu(self.a(x))))))


def _already_lora(model):
    fastpeft.inject(model, fastpeft.LoRAConfig(r=2, target_modules=["c"]))
    return fastpeft.LoRAConfig(r=2)  # "c" already has LoRA: fails after a and b could have been converted


def _merged_layer(model):
    fastpeft.inject(model, fastpeft.IA3Config(target_modules=["c"]))
    model.c.merge()
    return fastpeft.LoRAConfig(r=2, bias="all")


def _missing_index(model):
    idx = {"a": torch.arange(4), "b": torch.arange(3)}
    return fastpeft.SparseConfig(density=0.1, indices=idx, target_modules=["a", "b", "c"])


def _bad_index(model):
    idx = {"a": torch.arange(4), "b": torch.tensor([3, 1]), "c": torch.arange(2)}  # b: not sorted
    return fastpeft.SparseConfig(density=0.1, indices=idx, target_modules=["a", "b", "c"])


def _already_sparse(model):
    fastpeft.inject(model, fastpeft.SparseConfig(density=0.2, target_modules=["c"]))
    return fastpeft.SparseConfig(density=0.2, selection="random", target_modules=["a", "b", "c"])


@pytest.mark.parametrize("make", [_already_lora, _merged_layer, _missing_index, _bad_index,
                                  _already_sparse])
def test_failed_inject_leaves_the_model_exactly_as_it_was(make):
    torch.manual_seed(4)
    model = Stack()
    config = make(model)
    model.norm.weight.requires_grad_(True)  # a flag the user set: must survive the failure
    x = torch.randn(2, 6)
    with torch.no_grad():
        expected = model(x)
    snap = _snapshot(model)
    rng = torch.get_rng_state()
    with pytest.raises((ValueError, RuntimeError)):  # RuntimeError: the merged layer
        fastpeft.inject(model, config)
    _assert_unchanged(model, snap)
    assert torch.equal(torch.get_rng_state(), rng)  # validation draws nothing
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_failed_adapter_inject_leaves_the_model_exactly_as_it_was():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    model[2].weight.requires_grad_(True)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="output size"):
        AdapterConfig(bottleneck=2, target_modules=["0", "1", "2"]).inject(model)
    _assert_unchanged(model, snap)
    assert not adapters_of(model)


# ----------------------------------------------------------------------------- item 15: meta device
def test_inject_sparse_on_meta_then_load_real_weights():
    torch.manual_seed(6)
    real = Stack()
    config = fastpeft.SparseConfig(density=0.25, target_modules=["a", "b", "c"])
    fastpeft.inject(real, copy.deepcopy(config))
    _perturb(real)
    with torch.device("meta"):
        meta = Stack()
    fastpeft.inject(meta, copy.deepcopy(config))
    for name in ("a", "b", "c"):
        layer = meta.get_submodule(name)
        assert isinstance(layer, fastpeft.SparseLinear) and layer.sparse_index.device.type == "meta"
        assert layer.sparse_index.shape == real.get_submodule(name).sparse_index.shape
        assert layer.sparse_value.shape == layer.sparse_index.shape and layer.sparse_value.requires_grad
    meta.to_empty(device="cpu")
    meta.load_state_dict(real.state_dict())
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(meta(x), real(x))
