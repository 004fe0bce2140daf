"""Sparse fine-tuning: mask selection (random, magnitude, gradient, blocks), SparseLinear
equivalence with the float64 reference on every backend, merge/unmerge, accounting, bad input."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.methods.sparse_select import count_for_density, select_sparse_by_gradient, select_sparse_indices
from fastpeft.reference import peft_linear as ref_peft_linear
from fastpeft.tools.equivalence import rel_err

BACKENDS = fastpeft.available_backends()
SELECTIONS = ("random", "magnitude", "gradient")


def check_index(idx, numel):
    assert idx.dtype == torch.int64 and idx.dim() == 1
    assert bool((idx[1:] > idx[:-1]).all()), "indices must be sorted and unique"
    assert int(idx.min()) >= 0 and int(idx.max()) < numel


def select(weight, density, selection, seed=0, block=None):
    """select_sparse_indices with made-up gradient scores for "gradient"."""
    scores = None
    if selection == "gradient":
        scores = torch.rand(weight.shape, generator=torch.Generator().manual_seed(seed + 100)) ** 2
    return select_sparse_indices(weight, density, selection, seed=seed, scores=scores, block=block)


def dense_mask(idx, n, k):
    mask = torch.zeros(n * k, dtype=torch.bool)
    mask[idx] = True
    return mask.view(n, k)


# ----------------------------------------------------------------------------- selection


@pytest.mark.parametrize("block", [None, 1, 4, 16])
@pytest.mark.parametrize("selection", SELECTIONS)
def test_selection_deterministic_sorted_unique(selection, block):
    w = torch.randn(37, 53)
    a = select(w, 0.07, selection, seed=5, block=block)
    b = select(w.clone(), 0.07, selection, seed=5, block=block)
    check_index(a, w.numel())
    assert torch.equal(a, b)
    target = count_for_density(w.numel(), 0.07)
    if block in (None, 1):
        assert a.numel() == target
    else:  # whole blocks: at least the target, less than one block more
        assert target <= a.numel() < target + block * block


def test_random_seed_changes_mask_and_is_uniform():
    w = torch.randn(10, 10)
    assert not torch.equal(select_sparse_indices(w, 0.1, "random", seed=0),
                           select_sparse_indices(w, 0.1, "random", seed=1))
    # each entry is picked with probability density; both sampling paths (rejection and permutation)
    for density in (0.1, 0.5):
        hits = torch.zeros(100)
        trials = 600
        for seed in range(trials):
            hits[select_sparse_indices(w, density, "random", seed=seed)] += 1
        freq = hits / trials
        sd = math.sqrt(density * (1 - density) / trials)
        assert float((freq - density).abs().max()) < 5 * sd


def test_random_blocks_differ_by_seed():
    w = torch.randn(64, 64)
    assert not torch.equal(select_sparse_indices(w, 0.1, "random", seed=0, block=8),
                           select_sparse_indices(w, 0.1, "random", seed=1, block=8))


def test_magnitude_picks_largest_and_breaks_ties_to_lower_index():
    w = torch.randn(29, 31)
    idx = select_sparse_indices(w, 0.2, "magnitude")
    expected = torch.topk(w.abs().flatten(), idx.numel()).indices.sort().values
    assert torch.equal(idx, expected)
    assert torch.equal(select_sparse_indices(torch.ones(8, 8), 0.25, "magnitude"), torch.arange(16))
    # seed does not matter for a score-based selection
    assert torch.equal(select_sparse_indices(w, 0.2, "magnitude", seed=9), idx)


def test_gradient_selection_uses_scores():
    w = torch.randn(13, 17)
    scores = torch.rand(13, 17)
    idx = select_sparse_indices(w, 0.3, "gradient", scores=scores)
    assert torch.equal(idx, torch.topk(scores.flatten(), idx.numel()).indices.sort().values)


def test_count_instead_of_density():
    w = torch.randn(9, 11)
    assert select_sparse_indices(w, None, "random", count=7).numel() == 7
    assert select_sparse_indices(w, None, "magnitude", count=99).numel() == 99
    with pytest.raises(ValueError, match="count"):
        select_sparse_indices(w, None, "random", count=100)
    with pytest.raises(ValueError, match="either density or count"):
        select_sparse_indices(w, 0.1, "random", count=7)


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("n,k,b", [(37, 53, 8), (64, 48, 16), (5, 70, 8), (20, 20, 32)])
def test_block_structure(selection, n, k, b):
    w = torch.randn(n, k)
    scores = torch.rand(n, k) if selection == "gradient" else None
    idx = select_sparse_indices(w, 0.15, selection, seed=2, scores=scores, block=b)
    check_index(idx, n * k)
    mask = dense_mask(idx, n, k)
    rows, cols = -(-n // b), -(-k // b)
    target = count_for_density(n * k, 0.15)
    assert target <= idx.numel() < target + b * b
    chosen, means = [], []
    score = w.abs() if selection == "magnitude" else scores
    for i in range(rows):
        for j in range(cols):
            blk = mask[i * b:(i + 1) * b, j * b:(j + 1) * b]  # edge blocks are clipped by slicing
            assert bool(blk.all()) or not bool(blk.any()), f"block ({i}, {j}) is partly selected"
            chosen.append(bool(blk.all()))
            if score is not None:
                means.append(float(score[i * b:(i + 1) * b, j * b:(j + 1) * b].double().mean()))
    if score is not None:  # the chosen blocks are the best by mean score
        best_out = max((m for m, c in zip(means, chosen) if not c), default=-1.0)
        worst_in = min(m for m, c in zip(means, chosen) if c)
        assert worst_in >= best_out


def test_block_one_is_unstructured():
    w = torch.randn(21, 19)
    assert torch.equal(select_sparse_indices(w, 0.1, "magnitude", block=1),
                       select_sparse_indices(w, 0.1, "magnitude"))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(selection="fisher"), ValueError, "selection must be one of"),
    (dict(block=0), ValueError, "block"),
    (dict(block=True), ValueError, "block"),
    (dict(block=2.0), ValueError, "block"),
    (dict(density=0.0), ValueError, "density"),
    (dict(density=1.5), ValueError, "density"),
    (dict(density=True), TypeError, "density"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(selection="gradient"), ValueError, "select_sparse_by_gradient"),
    (dict(selection="gradient", scores=torch.rand(3, 3)), ValueError, "scores must have"),
    (dict(selection="gradient", scores=torch.full((6, 7), float("nan"))), ValueError, "NaN"),
    (dict(selection="gradient", scores=torch.ones(6, 7, dtype=torch.int64)), TypeError, "scores"),
    (dict(selection="magnitude", scores=torch.rand(6, 7)), ValueError, "only used by"),
])
def test_selection_bad_arguments(kwargs, exc, match):
    args = dict(weight=torch.randn(6, 7), density=0.2, selection="random")
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        select_sparse_indices(**args)


def test_selection_bad_weight():
    with pytest.raises(ValueError, match="weight must be 2-D"):
        select_sparse_indices(torch.randn(10), 0.1)
    with pytest.raises(ValueError, match="no entries"):
        select_sparse_indices(torch.randn(0, 4), 0.1)


def test_module_uses_selection():
    lin = nn.Linear(23, 19)
    for selection, block in (("random", None), ("magnitude", None), ("random", 4), ("magnitude", 8)):
        layer = fastpeft.SparseLinear.from_linear(lin, density=0.1, selection=selection, block=block, seed=3)
        assert torch.equal(layer.sparse_index, select_sparse_indices(lin.weight, 0.1, selection, seed=3, block=block))
        assert layer.sparse_value.shape == layer.sparse_index.shape
    with pytest.raises(ValueError, match="select_sparse_by_gradient"):
        fastpeft.SparseLinear.from_linear(lin, density=0.1, selection="gradient")


# ----------------------------------------------------------------------------- gradient (FISH) selection


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(6, 10)
        self.act = nn.Tanh()
        self.down = nn.Linear(10, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x, target=None):
        out = self.head(self.down(self.act(self.up(x))))
        if target is None:
            return out
        return nn.functional.mse_loss(out, target)


def make_batches(count=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)) for _ in range(count)]


def manual_fisher(model, batches, names):
    weights = [model.get_submodule(n).weight for n in names]
    acc = [torch.zeros_like(w) for w in weights]
    for x, t in batches:
        grads = torch.autograd.grad(model(x, t), weights)
        for a, g in zip(acc, grads):
            a += g * g
    return dict(zip(names, acc))


@pytest.mark.parametrize("block", [None, 2])
def test_gradient_selection_picks_largest_accumulated_grad_squared(block):
    torch.manual_seed(0)
    model = TinyNet()
    batches = make_batches()
    config = fastpeft.SparseConfig(density=0.2, selection="gradient", target_modules=["up", "down"], block=block)
    for p in model.parameters():
        p.requires_grad_(True)
    expected_scores = manual_fisher(model, batches, ["up", "down"])
    # the model as users have it: frozen, one flag on, a leftover gradient
    for p in model.parameters():
        p.requires_grad_(False)
    model.head.bias.requires_grad_(True)
    leftover = torch.randn(3)
    model.head.bias.grad = leftover
    before = copy.deepcopy(model.state_dict())
    result = select_sparse_by_gradient(model, batches, config)
    assert set(result) == {"up", "down"}
    for name, idx in result.items():
        check_index(idx, model.get_submodule(name).weight.numel())
        w = model.get_submodule(name).weight
        assert torch.equal(idx, select_sparse_indices(w, 0.2, "gradient", scores=expected_scores[name], block=block))
        if block is None:
            top = torch.topk(expected_scores[name].flatten(), idx.numel()).indices.sort().values
            assert torch.equal(idx, top)
    # the model is untouched: values, flags, grads
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert [p.requires_grad for p in model.parameters()] == [False] * 5 + [True]
    assert model.head.bias.grad is leftover
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.bias")
    # deterministic
    again = select_sparse_by_gradient(model, batches, config)
    assert all(torch.equal(again[n], result[n]) for n in result)


def test_gradient_selection_with_loss_fn_and_inject():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(4, 6, generator=g) for _ in range(2)]
    config = fastpeft.SparseConfig(density=0.25, selection="gradient", target_modules=["0", "2"])
    indices = select_sparse_by_gradient(model, batches, config, loss_fn=lambda out, batch: out.pow(2).sum())
    assert set(indices) == {"0", "2"}
    with pytest.raises(ValueError, match="select_sparse_by_gradient"):
        fastpeft.inject(copy.deepcopy(model), config)
    config.indices = indices
    fastpeft.inject(model, config)
    for name in ("0", "2"):
        layer = model.get_submodule(name)
        assert isinstance(layer, fastpeft.PEFTLinear)
        assert torch.equal(layer.sparse_index, indices[name])
        assert layer.sparse_value.requires_grad and not layer.weight.requires_grad


def test_gradient_selection_bad_input():
    model = TinyNet()
    batches = make_batches(1)
    config = fastpeft.SparseConfig(density=0.2, selection="gradient", target_modules=["up"])
    with pytest.raises(TypeError, match="SparseConfig"):
        select_sparse_by_gradient(model, batches, {"density": 0.2, "target_modules": ["up"]})
    with pytest.raises(ValueError, match="empty"):
        select_sparse_by_gradient(model, [], config)
    with pytest.raises(ValueError, match="matched no"):
        select_sparse_by_gradient(model, batches, fastpeft.SparseConfig(selection="gradient", target_modules=["nope"]))
    with pytest.raises(TypeError, match="loss_fn"):
        select_sparse_by_gradient(model, [b[0] for b in batches], config)  # output is not a scalar
    flags = [p.requires_grad for p in model.parameters()]
    assert flags == [True] * len(flags)  # restored even after the failure


# ----------------------------------------------------------------------------- equivalence

N, K = 19, 29
COMBOS = {
    "sparse": {},
    "sparse+ia3_in": dict(ia3="in"),
    "sparse+ia3_out+bias": dict(ia3="out", train_bias=True),
    "sparse+lora": dict(r=3, alpha=5.0),
    "all": dict(r=2, alpha=3.0, ia3="both", train_bias=True),
}
MASKS = [("random", None), ("magnitude", None), ("gradient", None), ("random", 4), ("magnitude", 8), ("gradient", 4)]


def build_layer(combo, selection, block, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N)
    kwargs = dict(COMBOS[combo])
    layer = fastpeft.PEFTLinear.from_linear(lin, density=None, **kwargs)
    layer.add_sparse(0.15, selection, block, seed, index=select(lin.weight, 0.15, selection, seed, block)
                     if selection == "gradient" else None)
    if selection != "gradient":
        assert torch.equal(layer.sparse_index, select_sparse_indices(lin.weight, 0.15, selection, seed=seed, block=block))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move every trained path away from its identity init
        for name, p in layer.named_parameters():
            if p.requires_grad:
                offset = 1.0 if name.startswith("ia3") else 0.0
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + offset)
    return layer


def reference_outputs(layer, x, grad_y):
    """Float64 ground truth through fastpeft.reference.peft_linear and autograd."""
    params = {name: p.detach().double().requires_grad_(p.requires_grad) for name, p in layer.named_parameters()}
    xd = x.detach().double().requires_grad_(True)
    y = ref_peft_linear(xd, params["weight"], params.get("bias"), lora_A=params.get("lora_A"),
                        lora_B=params.get("lora_B"), lora_scale=layer.lora_scale, ia3_in=params.get("ia3_in"),
                        ia3_out=params.get("ia3_out"), sparse_index=layer.sparse_index,
                        sparse_value=params["sparse_value"])
    y.backward(grad_y.double())
    grads = {name: p.grad for name, p in params.items() if p.requires_grad}
    grads["x"] = xd.grad
    return y.detach(), grads


# every selection with every path at once, and every path combination on one mask
CASES = [("all", sel, blk) for sel, blk in MASKS] + [(combo, "random", 4) for combo in COMBOS if combo != "all"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combo,selection,block", CASES)
def test_sparse_linear_matches_reference(backend, combo, selection, block):
    layer = build_layer(combo, selection, block)
    layer.backend = backend
    x = torch.randn(3, 7, K * 2)[..., ::2]  # 3-D and non-contiguous
    x.requires_grad_(True)
    grad_y = torch.randn(3, 7, N)
    y = layer(x)
    y.backward(grad_y)
    y_ref, grads_ref = reference_outputs(layer, x, grad_y)
    assert y.dtype == torch.float32 and y.shape == (3, 7, N)
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(x.grad, grads_ref["x"]) < 1e-5
    trained = [name for name, p in layer.named_parameters() if p.requires_grad]
    assert "sparse_value" in trained and set(trained) <= set(grads_ref)
    for name in trained:
        assert rel_err(getattr(layer, name).grad, grads_ref[name]) < 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_with_dropout_matches_reference(backend):
    torch.manual_seed(4)
    w = torch.randn(N, K)
    idx = select_sparse_indices(w, 0.2, "random", seed=4, block=4)
    args = dict(bias=torch.randn(N), lora_A=torch.randn(3, K), lora_B=torch.randn(N, 3), ia3_in=torch.rand(K) + 0.5,
                ia3_out=torch.rand(N) + 0.5, sparse_value=torch.randn(idx.numel()))
    for t in args.values():
        t.requires_grad_(True)
    x = torch.randn(2, 9, K, requires_grad=True)
    y = fastpeft.peft_linear(x, w, args["bias"], lora_A=args["lora_A"], lora_B=args["lora_B"], lora_scale=0.7,
                             lora_dropout=0.3, dropout_seed=123, ia3_in=args["ia3_in"], ia3_out=args["ia3_out"],
                             sparse_index=idx, sparse_value=args["sparse_value"], backend=backend)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *args.values()], gy)
    d = {k: v.detach().double().requires_grad_(True) for k, v in args.items()}
    xd = x.detach().double().requires_grad_(True)
    yr = ref_peft_linear(xd, w.double(), d["bias"], lora_A=d["lora_A"], lora_B=d["lora_B"], lora_scale=0.7,
                         lora_dropout=0.3, dropout_seed=123, ia3_in=d["ia3_in"], ia3_out=d["ia3_out"],
                         sparse_index=idx, sparse_value=d["sparse_value"])
    want = torch.autograd.grad(yr, [xd, *d.values()], gy.double())
    assert rel_err(y, yr) < 1e-5
    for name, a, b in zip(["x", *args], got, want):
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_empty_batch(backend):
    layer = build_layer("sparse", "random", None)
    layer.backend = backend
    x = torch.randn(0, K, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, N)
    assert x.grad.shape == (0, K)
    assert torch.equal(layer.sparse_value.grad, torch.zeros_like(layer.sparse_value))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_bf16(backend):
    try:
        fastpeft.core.backends.resolve(backend, torch.device("cpu"), torch.bfloat16)
    except TypeError as exc:  # the backend declares it does not compute in bf16 here
        pytest.skip(str(exc))
    layer = build_layer("sparse+lora", "magnitude", 4)
    layer.backend = backend
    layer.to(torch.bfloat16)
    # adapters in fp32 like peft's autocast_adapter_dtype, the frozen weight and x in bf16
    layer.sparse_value.data = layer.sparse_value.data.float()
    layer.lora_A.data, layer.lora_B.data = layer.lora_A.data.float(), layer.lora_B.data.float()
    x = torch.randn(11, K, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(11, N, dtype=torch.bfloat16)
    y = layer(x)
    y.backward(gy)
    y_ref, grads_ref = reference_outputs(layer, x, gy)
    assert y.dtype == torch.bfloat16 and layer.sparse_value.grad.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-2
    assert rel_err(x.grad, grads_ref["x"]) < 1e-2
    assert rel_err(layer.sparse_value.grad, grads_ref["sparse_value"]) < 1e-2


# ----------------------------------------------------------------------------- merge / unmerge


@pytest.mark.parametrize("selection,block", [("random", None), ("magnitude", 4)])
def test_merge_unmerge_exact(selection, block):
    lin = nn.Linear(K, N)
    with torch.no_grad():  # dyadic values: sums are exact in fp32, so merge/unmerge must be too
        lin.weight.copy_(torch.randint(-512, 512, (N, K)) / 256.0)
    layer = fastpeft.SparseLinear.from_linear(lin, density=0.2, selection=selection, block=block)
    with torch.no_grad():
        layer.sparse_value.copy_(torch.randint(-64, 64, layer.sparse_value.shape) / 64.0)
    w0 = layer.weight.detach().clone()
    x = torch.randn(6, K)
    y = layer(x).detach()
    layer.merge()
    expected = w0.clone()
    expected.view(-1).index_add_(0, layer.sparse_index, layer.sparse_value.detach())
    assert torch.equal(layer.weight, expected)
    outside = ~dense_mask(layer.sparse_index, N, K)
    assert torch.equal(layer.weight[outside], w0[outside])
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


def test_merge_unmerge_random_values_touch_only_the_mask():
    lin = nn.Linear(K, N)
    layer = fastpeft.SparseLinear.from_linear(lin, density=0.1, selection="random", seed=2)
    with torch.no_grad():
        layer.sparse_value.normal_()
    w0 = layer.weight.detach().clone()
    layer.merge()
    outside = ~dense_mask(layer.sparse_index, N, K)
    assert torch.equal(layer.weight[outside], w0[outside])
    torch.testing.assert_close(layer.weight.view(-1)[layer.sparse_index],
                               w0.view(-1)[layer.sparse_index] + layer.sparse_value.detach(), rtol=0, atol=1e-6)
    layer.unmerge()
    assert torch.equal(layer.weight[outside], w0[outside])
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- accounting


def test_count_parameters_sparse_trainable_and_changed_after_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, N), nn.ReLU(), nn.Linear(N, 7))
    fastpeft.inject(model, fastpeft.SparseConfig(density=0.1, selection="magnitude", block=4))
    layers = [m for m in model.modules() if isinstance(m, fastpeft.SparseLinear)]
    nnz = sum(m.sparse_index.numel() for m in layers)
    report = fastpeft.count_parameters(model)
    assert report["sparse"]["total"] == nnz and report["sparse"]["trainable"] == nnz
    assert report["sparse"]["changed"] == 0
    assert report["weight"]["trainable"] == 0 and report["weight"]["total"] == N * K + 7 * N
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(16, K)).pow(2).sum().backward()
    opt.step()
    changed = sum(int((m.sparse_value != 0).sum()) for m in layers)
    assert changed > nnz // 2  # most masked entries got a gradient
    report = fastpeft.count_parameters(model)
    assert report["sparse"]["changed"] == changed
    assert report["sparse"]["trainable"] == nnz and report["weight"]["changed"] == 0


# ----------------------------------------------------------------------------- bad input


BAD = [
    (dict(sparse_index=torch.tensor([-1, 3])), ValueError, "sparse_index"),
    (dict(sparse_index=torch.tensor([2, N * K])), ValueError, "sparse_index"),
    (dict(sparse_index=torch.tensor([5, 3])), ValueError, "sorted"),
    (dict(sparse_index=torch.tensor([3, 3])), ValueError, "unique"),
    (dict(sparse_index=torch.tensor([1, 3], dtype=torch.int32)), TypeError, "sparse_index must be int64"),
    (dict(sparse_index=torch.tensor([1.0, 3.0])), TypeError, "sparse_index must be int64"),
    (dict(sparse_index=torch.tensor([[1, 3]])), ValueError, "sparse_index must be 1-D"),
    (dict(sparse_value=torch.randn(3)), ValueError, "sparse_value must have shape"),
    (dict(sparse_value=torch.tensor([1, 2])), TypeError, "sparse_value"),
    (dict(sparse_value=torch.randn(2, dtype=torch.float64)), TypeError, "sparse_value"),
    (dict(sparse_value=None), ValueError, "together"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad,exc,match", BAD)
def test_bad_sparse_input(backend, bad, exc, match):
    args = dict(sparse_index=torch.tensor([1, 3]), sparse_value=torch.randn(2, requires_grad=True))
    args.update(bad)
    with pytest.raises(exc, match=match):
        fastpeft.peft_linear(torch.randn(4, K), torch.randn(N, K), backend=backend, **args)


@pytest.mark.parametrize("bad,exc,match", [
    (torch.tensor([4, 2]), ValueError, "sorted"),
    (torch.tensor([2, 2]), ValueError, "unique"),
    (torch.tensor([0, N * K]), ValueError, "sparse_index"),
])
def test_bad_precomputed_index(bad, exc, match):
    layer = fastpeft.PEFTLinear.from_linear(nn.Linear(K, N))
    with pytest.raises(exc, match=match):
        layer.add_sparse(index=bad)
    assert layer.sparse_value is None
