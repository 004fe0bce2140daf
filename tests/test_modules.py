"""Drop-in modules, configs, inject, merge and count_parameters."""
import copy
import io

import pytest
import torch
import torch.nn as nn

import fastpeft


def linear(k=24, n=18, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


BUILDERS = {
    "lora": lambda lin: fastpeft.LoRALinear.from_linear(lin, r=4, alpha=8),
    "lora_rs": lambda lin: fastpeft.LoRALinear.from_linear(lin, r=4, alpha=8, use_rslora=True, dropout=0.2),
    "ia3_out": lambda lin: fastpeft.IA3Linear.from_linear(lin, position="out"),
    "ia3_in": lambda lin: fastpeft.IA3Linear.from_linear(lin, position="in"),
    "bitfit": lambda lin: fastpeft.BitFitLinear.from_linear(lin),
    "sparse": lambda lin: fastpeft.SparseLinear.from_linear(lin, density=0.05, selection="random", seed=1),
    "combined": lambda lin: fastpeft.PEFTLinear.from_linear(lin, r=3, alpha=6, ia3="both", train_bias=True,
                                                           density=0.05),
}


def perturb(layer, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g).to(p.dtype))


@pytest.mark.parametrize("method", BUILDERS)
def test_behaves_like_linear_at_init(method):
    lin = linear()
    x = torch.randn(3, 5, 24)
    expected = lin(x)
    layer = BUILDERS[method](lin)
    layer.eval()
    torch.testing.assert_close(layer(x), expected)
    assert layer.weight is lin.weight and layer.bias is lin.bias or method == "bitfit"
    assert not layer.weight.requires_grad


@pytest.mark.parametrize("method", BUILDERS)
def test_merge_unmerge_round_trip(method):
    layer = BUILDERS[method](linear())
    perturb(layer)
    layer.eval()
    x = torch.randn(7, 24)
    y = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_ia3_unmerge_near_zero_warns():
    layer = fastpeft.IA3Linear.from_linear(linear(), "out")
    with torch.no_grad():
        layer.ia3_out[0] = 0.0
    layer.merge()
    with pytest.warns(UserWarning, match="near zero"):
        layer.unmerge()


@pytest.mark.parametrize("method", BUILDERS)
def test_state_dict_round_trip(method):
    layer = BUILDERS[method](linear())
    perturb(layer)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    fresh = BUILDERS[method](linear(seed=9))
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    x = torch.randn(4, 24)
    layer.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), layer(x))


def test_state_dict_keys_match_op_arguments():
    keys = set(BUILDERS["combined"](linear()).state_dict())
    assert keys == {"weight", "bias", "lora_A", "lora_B", "ia3_in", "ia3_out", "sparse_index", "sparse_value"}


def test_lora_init_and_scale():
    layer = fastpeft.LoRALinear.from_linear(linear(), r=4, alpha=8)
    assert layer.lora_A.shape == (4, 24) and layer.lora_B.shape == (18, 4)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert layer.lora_scale == 2.0
    rs = fastpeft.LoRALinear.from_linear(linear(), r=4, alpha=8, use_rslora=True)
    assert rs.lora_scale == pytest.approx(4.0)
    assert "r=4" in repr(layer) and "scale=2" in repr(layer) and "backend=" in repr(layer)


def test_dropout_only_in_training():
    layer = fastpeft.LoRALinear.from_linear(linear(), r=4, dropout=0.5)
    perturb(layer)
    x = torch.randn(16, 24)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_bf16_layer_keeps_fp32_adapters():
    lin = linear().bfloat16()
    layer = fastpeft.PEFTLinear.from_linear(lin, r=2, ia3="out")
    assert layer.lora_A.dtype == torch.float32 and layer.ia3_out.dtype == torch.float32
    y = layer(torch.randn(3, 24).bfloat16())
    assert y.dtype == torch.bfloat16


def test_from_linear_rejects_bad_arguments():
    with pytest.raises(TypeError, match="nn.Linear"):
        fastpeft.LoRALinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="r must be"):
        fastpeft.LoRALinear.from_linear(linear(), r=0)
    with pytest.raises(ValueError, match="position"):
        fastpeft.IA3Linear.from_linear(linear(), position="middle")
    with pytest.raises(ValueError, match="density"):
        fastpeft.SparseLinear.from_linear(linear(), density=0.0)


class TinyBlock(nn.Module):
    def __init__(self, d=32, ff=64):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
        h = self.norm(x + att)
        return h + self.down(torch.relu(self.up(h)))


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([TinyBlock(), TinyBlock()])
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_inject_lora_replaces_exactly_targets_and_counts():
    torch.manual_seed(0)
    model = TinyModel()
    x = torch.randn(2, 6, 32)
    y0 = model(x)
    fastpeft.inject(model, fastpeft.LoRAConfig(r=4, alpha=8, target_modules=["query", "value"]))
    replaced = [n for n, m in model.named_modules() if isinstance(m, fastpeft.LoRALinear)]
    assert replaced == ["layers.0.query", "layers.0.value", "layers.1.query", "layers.1.value"]
    torch.testing.assert_close(model(x), y0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 4 * 4 * (32 + 32)
    report = fastpeft.count_parameters(model)
    assert set(report) == {"weight", "bias", "adapter", "prompt", "scaling", "sparse"}
    assert report["adapter"]["trainable"] == trainable
    assert report["adapter"]["changed"] == 0 and all(r == 0 for r in report.ranks.values())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    report = fastpeft.count_parameters(model)
    assert report["adapter"]["changed"] == 4 * 32 * 32
    assert set(report.ranks.values()) == {4}
    assert "adapter" in str(report)


def test_inject_regex_ia3_feedforward_and_bitfit():
    model = TinyModel()
    fastpeft.inject(model, fastpeft.IA3Config(target_modules=r".*\.(key|value|down)", feedforward_modules=["down"]))
    downs = [m for n, m in model.named_modules() if n.endswith("down")]
    assert all(isinstance(m, fastpeft.IA3Linear) and m.ia3_in is not None and m.ia3_out is None for m in downs)
    assert isinstance(model.layers[0].key, fastpeft.IA3Linear) and model.layers[0].key.ia3_out is not None
    assert fastpeft.count_parameters(model)["scaling"]["trainable"] == 2 * (32 + 32 + 64)

    model = TinyModel()
    fastpeft.inject(model, fastpeft.BitFitConfig())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith("bias")}
    perturb(model.layers[0].query)
    report = fastpeft.count_parameters(model)
    assert report["bias"]["changed"] == 32 and report["weight"]["trainable"] == 0


def test_inject_combines_methods_and_merges_model():
    torch.manual_seed(1)
    model = TinyModel()
    x = torch.randn(3, 32)
    fastpeft.inject(model, fastpeft.LoRAConfig(r=2, target_modules=["up", "down"]))
    fastpeft.inject(model, fastpeft.SparseConfig(density=0.02, target_modules=["up", "down"]))
    layer = model.layers[0].up
    assert layer.lora_A is not None and layer.sparse_value is not None
    assert layer.lora_A.requires_grad and layer.sparse_value.requires_grad
    for m in model.modules():
        if isinstance(m, fastpeft.PEFTLinear):
            perturb(m)
    model.eval()
    y = model(x)
    fastpeft.merge(model)
    torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)
    fastpeft.unmerge(model)
    torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)


def test_inject_nothing_matched_and_bad_config():
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        fastpeft.inject(TinyModel(), fastpeft.LoRAConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="bias must be"):
        fastpeft.LoRAConfig(bias="some")
    with pytest.raises(TypeError, match="config must be"):
        fastpeft.inject(TinyModel(), {"r": 4})


def test_lora_bias_and_modules_to_save():
    model = TinyModel()
    fastpeft.inject(model, fastpeft.LoRAConfig(r=2, target_modules=["query"], bias="lora_only",
                                               modules_to_save=["head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "layers.0.query.bias" in trainable and "layers.0.key.bias" not in trainable
    assert {"head.weight", "head.bias"} <= trainable


def test_count_parameters_sparse_and_pretrained_baseline():
    model = TinyModel()
    pretrained = copy.deepcopy(model.state_dict())
    fastpeft.inject(model, fastpeft.SparseConfig(density=0.1, target_modules=["up"], seed=0))
    report = fastpeft.count_parameters(model, pretrained=pretrained)
    nnz = sum(m.sparse_value.numel() for m in model.modules() if isinstance(m, fastpeft.SparseLinear))
    assert report["sparse"]["trainable"] == nnz and report["sparse"]["changed"] == 0
    for m in model.modules():
        if isinstance(m, fastpeft.SparseLinear):
            with torch.no_grad():
                m.sparse_value[:3] = 1.0
    report = fastpeft.count_parameters(model, pretrained=pretrained)
    assert report["sparse"]["changed"] == 6
    assert set(report.ranks.values()) == {3} or max(report.ranks.values()) <= 3


# ----------------------------------------------------------------------------- meta device (issue 12, item 15)
@pytest.mark.parametrize("selection,block", [("random", None), ("magnitude", None), ("random", 4),
                                             ("magnitude", 4), ("random", 5)])
def test_sparse_layer_on_meta_device(selection, block):
    """SparseLinear / add_sparse build on the meta device with the index size the real weight gets."""
    real = linear(k=24, n=16)
    with torch.device("meta"):
        meta_lin = nn.Linear(24, 16)
    layer = fastpeft.SparseLinear.from_linear(meta_lin, density=0.1, selection=selection, block=block, seed=2)
    expected = fastpeft.SparseLinear.from_linear(real, density=0.1, selection=selection, block=block, seed=2)
    assert layer.sparse_index.device.type == "meta" and layer.sparse_value.device.type == "meta"
    assert layer.sparse_index.dtype == torch.int64 and layer.sparse_index.shape == expected.sparse_index.shape
    assert layer.sparse_value.shape == expected.sparse_value.shape and layer.sparse_value.requires_grad
    other = fastpeft.PEFTLinear.from_linear(meta_lin, r=2)
    other.add_sparse(0.1, selection, block, seed=2)
    assert other.sparse_index.shape == expected.sparse_index.shape
    # materialise and load: the layer then computes what the real one does
    layer.to_empty(device="cpu")
    layer.load_state_dict(expected.state_dict())
    x = torch.randn(3, 24)
    assert torch.equal(layer(x), expected(x))


def test_sparse_on_meta_refuses_value_dependent_block_sizes():
    with torch.device("meta"):
        meta_lin = nn.Linear(10, 9)  # 4x4 blocks are clipped at the edges: nnz depends on which blocks win
    with pytest.raises(ValueError, match="meta device.*indices"):
        fastpeft.SparseLinear.from_linear(meta_lin, density=0.1, selection="magnitude", block=4)
    idx = torch.tensor([0, 5, 17])
    layer = fastpeft.PEFTLinear(meta_lin.weight).add_sparse(index=idx)  # given indices need no values
    assert layer.sparse_index.shape == (3,) and layer.sparse_index.device.type == "meta"


def test_from_linear_failure_leaves_the_linear_as_it_was():
    lin = linear()
    with pytest.raises(ValueError, match="position"):
        fastpeft.PEFTLinear.from_linear(lin, r=2, ia3="sideways")
    assert lin.weight.requires_grad and lin.bias.requires_grad
    layer = fastpeft.PEFTLinear(lin.weight)
    with pytest.raises(ValueError, match="already has an input"):
        layer.add_ia3("in").add_ia3("both")  # "both" fails on "in": "out" must not be half-added
    assert layer.ia3_out is None
