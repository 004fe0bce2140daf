"""select_layers and delta_penalty: against dense float64 ΔW computed independently, values and gradients."""
import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.methods.adapters import AdapterConfig
from fastpeft.methods.selective import delta_penalty, select_layers
from fastpeft.nn.modules import PEFTLinear
from fastpeft.reference import sparse_delta


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 21), nn.ReLU(), nn.Linear(21, 17), nn.ReLU(), nn.Linear(17, 5))


def test_select_layers_trains_only_matches():
    net = _net()
    out = select_layers(net, ["^2\\.", "4.bias"])
    assert out is net
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {"2.weight", "2.bias", "4.bias"}
    select_layers(net, "0.weight")  # a plain string, re.search semantics; the previous selection is frozen
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {"0.weight"}
    net(torch.randn(3, 13)).sum().backward()
    assert net[0].weight.grad is not None and net[2].weight.grad is None


def test_select_layers_bad_input():
    net = _net()
    with pytest.raises(ValueError, match="no parameter name matches"):
        select_layers(net, ["decoder"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        select_layers(net, ["(unclosed"])
    with pytest.raises(ValueError, match="empty"):
        select_layers(net, [])
    with pytest.raises(TypeError, match="str"):
        select_layers(net, [3])
    with pytest.raises(TypeError, match="nn.Module"):
        select_layers("net", "0")


def _randomise(layer: PEFTLinear):
    """Give every adapter non-trivial values (they start at the identity)."""
    with torch.no_grad():
        for name in ("lora_A", "lora_B", "ia3_in", "ia3_out", "sparse_value"):
            p = getattr(layer, name)
            if p is not None:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.startswith("ia3") else 0.0))


def _dense_delta(layer: PEFTLinear, params: dict) -> torch.Tensor:
    """ΔW in float64 from the definition, differentiable in ``params`` (float64 leaves)."""
    w = layer.weight.detach().double()
    n, k = w.shape
    eff = w
    if "sparse_value" in params:
        eff = eff + sparse_delta(layer.sparse_index, params["sparse_value"], n, k)
    if "ia3_in" in params:
        eff = eff * params["ia3_in"][None, :]
    if "ia3_out" in params:
        eff = eff * params["ia3_out"][:, None]
    if "lora_A" in params:
        eff = eff + layer.lora_scale * params["lora_B"] @ params["lora_A"]
    return eff - w


CASES = {
    "lora": lambda l: l.add_lora(3, alpha=6),
    "ia3_in": lambda l: l.add_ia3("in"),
    "ia3_out": lambda l: l.add_ia3("out"),
    "sparse": lambda l: l.add_sparse(0.2, "random", seed=1),
    "lora+ia3+sparse": lambda l: (l.add_lora(2, alpha=4), l.add_ia3("both"), l.add_sparse(0.1, "random", seed=2)),
}


@pytest.mark.parametrize("kind", ["l2", "l1"])
@pytest.mark.parametrize("case", list(CASES))
def test_delta_penalty_matches_dense(case, kind):
    torch.manual_seed(5)
    layer = PEFTLinear.from_linear(nn.Linear(19, 23))
    CASES[case](layer)
    _randomise(layer)
    model = nn.Sequential(layer)
    names = [n for n in ("lora_A", "lora_B", "ia3_in", "ia3_out", "sparse_value") if getattr(layer, n) is not None]
    pen = delta_penalty(model, kind)
    assert pen.dim() == 0
    grads = torch.autograd.grad(pen, [getattr(layer, n) for n in names])
    params = {n: getattr(layer, n).detach().double().requires_grad_() for n in names}
    delta = _dense_delta(layer, params)
    # independent check of the dense ΔW against the module's own (no-grad) delta_weight
    assert torch.allclose(delta.float(), layer.delta_weight(), atol=1e-5)
    ref = delta.square().sum() if kind == "l2" else delta.abs().sum()
    ref_grads = torch.autograd.grad(ref, [params[n] for n in names])
    assert abs(float(pen.detach()) - float(ref.detach())) <= 1e-5 * float(ref.detach())
    for n, g, rg in zip(names, grads, ref_grads):
        assert float((g.double() - rg).norm() / rg.norm()) < 1e-5, n


def test_lora_l2_never_forms_dense_delta(monkeypatch):
    """The l2 LoRA path uses only r x r Gram matrices: no [N, K] tensor is created."""
    layer = PEFTLinear.from_linear(nn.Linear(300, 200)).add_lora(4)
    _randomise(layer)
    import fastpeft.methods.selective as sel

    def boom(*args, **kwargs):
        raise AssertionError("dense ΔW formed")

    monkeypatch.setattr(sel, "_dense_rows", boom)
    pen = delta_penalty(nn.Sequential(layer), "l2")
    ref = (layer.lora_scale * layer.lora_B.double() @ layer.lora_A.double()).square().sum()
    assert abs(float(pen.detach()) - float(ref.detach())) <= 1e-5 * float(ref.detach())


def test_delta_penalty_in_place_bias_adapters_and_zero():
    torch.manual_seed(6)
    net = _net()
    assert delta_penalty(net).item() == 0.0  # nothing adapted
    fastpeft.inject(net, fastpeft.BitFitConfig(target_modules=["0"]))
    AdapterConfig(bottleneck=3, target_modules=["2"]).inject(net)
    assert delta_penalty(net).item() == 0.0  # everything at its pre-trained / identity value
    bias = net[0].bias
    base = bias.detach().clone()
    ad = net[2].adapter
    with torch.no_grad():
        bias.add_(torch.randn_like(bias))
        ad.up_weight.normal_()
        ad.up_bias.normal_()
        ad.down_weight.normal_()  # the down projection alone does not move the function
    for kind, f in (("l2", torch.square), ("l1", torch.abs)):
        expected = f(bias - base).sum() + f(ad.up_weight).sum() + f(ad.up_bias).sum()
        pen = delta_penalty(net, kind)
        assert torch.allclose(pen, expected.detach(), rtol=1e-6)
    pen.backward()
    assert torch.allclose(bias.grad, torch.sign(bias - base).detach())
    assert ad.down_weight.grad is None


def test_select_layers_penalty_against_snapshot():
    net = _net()
    before = net[2].weight.detach().clone()
    select_layers(net, ["^2\\.weight"])
    with torch.no_grad():
        net[2].weight.add_(0.5)
    assert torch.allclose(delta_penalty(net), torch.tensor(0.25 * before.numel()), rtol=1e-5)


def test_delta_penalty_errors():
    layer = PEFTLinear.from_linear(nn.Linear(5, 4)).add_lora(2)
    with pytest.raises(ValueError, match="kind"):
        delta_penalty(nn.Sequential(layer), "l3")
    layer.merge()
    with pytest.raises(RuntimeError, match="merged"):
        delta_penalty(nn.Sequential(layer))


# ----------------------------------------------------------------------------- sparse gradient selection (issue 12)
def test_select_sparse_by_gradient_needs_no_selection_restated():
    """A function named for gradient selection selects by gradient with SparseConfig's default selection."""
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 13, generator=g) for _ in range(2)]
    loss_fn = lambda out, batch: out.square().mean()  # noqa: E731
    net = _net()
    plain = fastpeft.select_sparse_by_gradient(net, batches, fastpeft.SparseConfig(density=0.1, target_modules=["0", "2"]),
                                               loss_fn=loss_fn)
    explicit = fastpeft.select_sparse_by_gradient(
        net, batches, fastpeft.SparseConfig(density=0.1, selection="gradient", target_modules=["0", "2"]), loss_fn=loss_fn)
    assert plain.keys() == explicit.keys() == {"0", "2"}
    assert all(torch.equal(plain[n], explicit[n]) for n in plain)
    magnitude = fastpeft.select_sparse_indices(net[0].weight, 0.1, "magnitude")
    assert not torch.equal(plain["0"], magnitude)  # really by gradient
    with pytest.raises(TypeError, match="loss_fn"):
        fastpeft.select_sparse_by_gradient(net, batches, fastpeft.SparseConfig(), loss_fn="mse")


def test_select_sparse_by_gradient_default_targets_skip_tied_layers():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.body, self.head = nn.Embedding(11, 6), nn.Linear(6, 6), nn.Linear(6, 11, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.body(self.emb(ids)))).logsumexp(-1).mean()

    torch.manual_seed(0)
    picked = fastpeft.select_sparse_by_gradient(Tied(), [torch.randint(0, 11, (2, 3))], fastpeft.SparseConfig(density=0.2))
    assert set(picked) == {"body"}  # the layers inject(SparseConfig()) would adapt
