"""Bottleneck adapters: every backend against the float64 reference, module, config placement, bad input."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastpeft
from fastpeft.methods.adapters import (
    ACTIVATIONS,
    AdapterConfig,
    BottleneckAdapter,
    adapters_of,
    backend_unavailable,
    bottleneck_adapter,
    reference_bottleneck_adapter,
)
from fastpeft.nn.accounting import count_parameters
from fastpeft.tools.equivalence import rel_err

CPU = torch.device("cpu")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _backend_or_skip(name):
    reason = backend_unavailable(name, CPU)
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable: {reason}")


def _make(dtype, lead, d, m, adapter_dtype=None, bias=True, noncontig=False, strided_params=False):
    adapter_dtype = adapter_dtype or dtype
    if noncontig:  # a strided view: every other column of a wider tensor
        h = torch.randn(*lead, 2 * d, dtype=dtype)[..., ::2]
        assert not h.is_contiguous()
    else:
        h = torch.randn(*lead, d, dtype=dtype)
    h.requires_grad_(True)
    wd = (torch.randn(m, d) / d ** 0.5).to(adapter_dtype).requires_grad_()
    wu = (torch.randn(d, m) / m ** 0.5).to(adapter_dtype).requires_grad_()
    bd = torch.randn(m).to(adapter_dtype).requires_grad_() if bias else None
    bu = torch.randn(d).to(adapter_dtype).requires_grad_() if bias else None
    if strided_params:  # transposed / strided views of the adapter tensors (leaves all the same)
        wd = (torch.randn(d, m) / d ** 0.5).to(adapter_dtype).t().requires_grad_()
        bu = torch.randn(2 * d).to(adapter_dtype)[::2].detach().requires_grad_()
        assert not wd.is_contiguous() and not bu.is_contiguous()
    return h, wd, bd, wu, bu


def _check(backend, dtype, lead, d, m, act, **kw):
    h, wd, bd, wu, bu = _make(dtype, lead, d, m, **kw)
    inputs = [t for t in (h, wd, bd, wu, bu) if t is not None]
    y = bottleneck_adapter(h, wd, bd, wu, bu, activation=act, backend=backend)
    assert y.dtype == dtype and y.shape == h.shape
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, g) if y.numel() else [torch.zeros_like(t) for t in inputs]
    ref_in = [t.detach().double().requires_grad_() for t in (h, wd, bd, wu, bu) if t is not None]
    hd, wdd, *rest = ref_in
    bdd, wud, bud = (rest if len(rest) == 3 else (None, rest[0], None))
    ref = reference_bottleneck_adapter(hd, wdd, bdd, wud, bud, activation=act)
    ref_grads = torch.autograd.grad(ref, ref_in, g.double()) if ref.numel() else [torch.zeros_like(t) for t in ref_in]
    tol = TOL[dtype]
    if y.numel():
        assert rel_err(y, ref) < tol, (backend, dtype, act)
    for name, t, gr, rg in zip(("h", "down_weight", "down_bias", "up_weight", "up_bias"), inputs, grads, ref_grads):
        assert gr.dtype == t.dtype and gr.shape == t.shape, name
        if rg.numel() == 0 or rg.abs().max() == 0:  # M = 0: empty or all-zero gradients
            assert gr.numel() == 0 or gr.abs().max() == 0, (name, backend, dtype)
        else:
            assert rel_err(gr, rg) < tol, (name, backend, dtype, act, rel_err(gr, rg))


BACKENDS = ["reference", "cpp", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_equivalence_every_activation(backend, dtype):
    _backend_or_skip(backend)
    torch.manual_seed(hash((backend, str(dtype))) % 2**31)
    for act in ACTIVATIONS:
        _check(backend, dtype, (37,), 45, 13, act)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_strides_and_mixed_dtypes(backend):
    _backend_or_skip(backend)
    torch.manual_seed(1)
    _check(backend, torch.float32, (3, 11), 29, 7, "gelu", noncontig=True)       # 3-D, non-contiguous
    _check(backend, torch.float32, (0,), 29, 7, "relu")                           # M = 0
    _check(backend, torch.float32, (5, 0), 29, 7, "silu")                         # M = 0, 3-D
    _check(backend, torch.bfloat16, (2, 19), 33, 5, "tanh", adapter_dtype=torch.float32)  # fp32 adapters
    _check(backend, torch.float32, (23,), 17, 1, "relu", bias=False)              # no biases, bottleneck 1
    _check(backend, torch.float32, (9,), 31, 4, "gelu", strided_params=True)      # strided adapter tensors


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_grads(backend):
    """Only some arguments train: the others get no gradient and the rest stay correct."""
    _backend_or_skip(backend)
    torch.manual_seed(2)
    h, wd, bd, wu, bu = _make(torch.float32, (21,), 19, 6)
    for frozen in ((h, wd), (wd, bd, wu), (h, wu, bu)):
        for t in (h, wd, bd, wu, bu):
            t.requires_grad_(all(t is not f for f in frozen))
        y = bottleneck_adapter(h, wd, bd, wu, bu, activation="gelu", backend=backend)
        trainable = [t for t in (h, wd, bd, wu, bu) if t.requires_grad]
        grads = torch.autograd.grad(y.square().sum(), trainable)
        ref_in = [t.detach().double().requires_grad_(t.requires_grad) for t in (h, wd, bd, wu, bu)]
        ref = reference_bottleneck_adapter(*ref_in, activation="gelu")
        ref_grads = torch.autograd.grad(ref.square().sum(), [t for t in ref_in if t.requires_grad])
        for gr, rg in zip(grads, ref_grads):
            assert rel_err(gr, rg) < 1e-5


def test_backend_choice_and_errors():
    h, wd, bd, wu, bu = _make(torch.float32, (4,), 8, 2)
    with pytest.raises(RuntimeError, match="not available"):
        bottleneck_adapter(h, wd, bd, wu, bu, backend="nope")
    if backend_unavailable("cpp", CPU) is None:
        with pytest.raises(RuntimeError, match="CPU tensors only"):
            from fastpeft.methods.adapters import _resolve
            _resolve("cpp", torch.device("cuda"))
    # auto on CPU is the C++ backend when built, else the reference
    from fastpeft.methods.adapters import _resolve
    expected = "cpp" if backend_unavailable("cpp", CPU) is None else "reference"
    assert _resolve(None, CPU).name == expected


def test_bad_input():
    h, wd, bd, wu, bu = _make(torch.float32, (4,), 8, 3)
    with pytest.raises(ValueError, match="up_weight"):
        bottleneck_adapter(h, wd, bd, wu[:, :2], bu)
    with pytest.raises(ValueError, match="down_bias"):
        bottleneck_adapter(h, wd, bd[:2], wu, bu)
    with pytest.raises(ValueError, match="bottleneck size"):
        bottleneck_adapter(h, wd[:0], None, wu[:, :0], bu)
    with pytest.raises(TypeError, match="dtype"):
        bottleneck_adapter(h, wd.double(), bd, wu, bu)
    with pytest.raises(TypeError, match="floating"):
        bottleneck_adapter(h.long(), wd, bd, wu, bu)
    with pytest.raises(ValueError, match="activation"):
        bottleneck_adapter(h, wd, bd, wu, bu, activation="swish2")
    with pytest.raises(ValueError, match="bottleneck must be a positive int"):
        BottleneckAdapter(8, 0)
    with pytest.raises(ValueError, match="adapter size"):
        AdapterConfig(bottleneck=0)
    with pytest.raises(ValueError, match="variant"):
        AdapterConfig(variant="lora")


def test_cpp_op_rejects_bad_input_directly():
    _backend_or_skip("cpp")
    ops = torch.ops.fastpeft_cpp
    h = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="up_weight"):
        ops.adapter_fwd(h, torch.randn(3, 8), None, torch.randn(8, 2), None, 1, False)
    with pytest.raises(RuntimeError, match="activation"):
        ops.adapter_fwd(h, torch.randn(3, 8), None, torch.randn(8, 3), None, 9, False)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.adapter_fwd(h, torch.randn(3, 8, dtype=torch.float64), None, torch.randn(8, 3), None, 1, False)


def test_module_identity_at_init_and_trains():
    torch.manual_seed(3)
    ad = BottleneckAdapter(24, 5, activation="gelu")
    h = torch.randn(2, 7, 24)
    assert torch.equal(ad(h), h)  # up projection is zero: the identity
    opt = torch.optim.SGD(ad.parameters(), lr=0.1)
    ad(h).square().sum().backward()
    opt.step()
    assert not torch.equal(ad(h), h)
    assert ad.up_weight.grad is not None and ad.down_weight.dtype == torch.float32
    assert BottleneckAdapter(8, 2, dtype=torch.bfloat16).up_weight.dtype == torch.float32  # peft keeps adapters fp32


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    from fastpeft.tools.minilm import load_minilm

    model, tokenizer = load_minilm()
    batch = tokenizer(["adapters are small", "a longer sentence about bottleneck adapters in BERT"],
                      padding=True, return_tensors="pt")
    return model, batch


def test_variant_placement_on_minilm(minilm):
    base, _ = minilm
    houlsby = adapters_of(AdapterConfig(bottleneck=4, variant="houlsby").inject(copy.deepcopy(base)))
    pfeiffer = adapters_of(AdapterConfig(bottleneck=4, variant="pfeiffer").inject(copy.deepcopy(base)))
    assert len(houlsby) == 12 and len(pfeiffer) == 6  # after attention output + FFN output / FFN output only
    assert set(pfeiffer) < set(houlsby) and all(".attention." not in name for name in pfeiffer)


def test_output_blocks_get_houlsby_placement_on_minilm(minilm):
    """target_modules=["output"] matches BERT's attention.output / output blocks (no out_features):
    the adapter goes after their dense layer, where Houlsby (and the default variant) puts it."""
    base, batch = minilm
    model = copy.deepcopy(base)
    AdapterConfig(bottleneck=8, target_modules=["output"]).inject(model)
    default = adapters_of(AdapterConfig(bottleneck=8).inject(copy.deepcopy(base)))
    assert set(adapters_of(model)) == set(default) and len(default) == 12
    assert all(n.endswith(("attention.output.dense.adapter", ".output.dense.adapter")) for n in default)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).last_hidden_state, base(**batch).last_hidden_state)


def test_adapter_target_without_output_size_says_what_to_target(minilm):
    base, _ = minilm
    model = copy.deepcopy(base)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=r"'encoder.layer.0.attention.self'.*target one of the linear layers inside "
                                         r"it, e.g. \['encoder.layer.0.attention.self.query'"):
        AdapterConfig(target_modules=r"encoder\.layer\.0\.attention\.self").inject(model)
    assert [p.requires_grad for p in model.parameters()] == flags and not adapters_of(model)


def test_inject_on_minilm_trains(minilm):
    base, batch = minilm
    model = copy.deepcopy(base)
    with torch.no_grad():
        before = model(**batch).last_hidden_state
    out = fastpeft.inject(model, AdapterConfig(bottleneck=16, activation="gelu"))  # generic inject delegates
    assert out is model and len(adapters_of(model)) == 12
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, before)  # identity at init
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    report = count_parameters(model, ranks=False)
    assert report["adapter"]["total"] == report["adapter"]["trainable"] == 12 * (16 * 384 * 2 + 16 + 384)
    assert report["adapter"]["changed"] == 0
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(**batch).last_hidden_state.square().mean().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model(**batch).last_hidden_state
    assert not torch.allclose(after, before)
    assert count_parameters(model, ranks=False)["adapter"]["changed"] > 0
    # state_dict round trip into a freshly injected copy
    other = AdapterConfig(bottleneck=16, activation="gelu").inject(copy.deepcopy(base))
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(other(**batch).last_hidden_state, after)


def test_inject_targets_and_errors():
    net = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 4))
    AdapterConfig(bottleneck=3, target_modules=["0", "2"]).inject(net)
    assert set(adapters_of(net)) == {"0.adapter", "2.adapter"}
    assert net[0].adapter.features == 10 and net[2].adapter.features == 4
    with pytest.raises(ValueError, match="already has"):
        AdapterConfig(bottleneck=3, target_modules=["0"]).inject(net)
    with pytest.raises(ValueError, match="matched no module"):
        AdapterConfig(target_modules=["nothing"]).inject(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    mha = torch.nn.Sequential(torch.nn.MultiheadAttention(8, 2))
    with pytest.raises(ValueError, match="out_proj"):
        AdapterConfig(target_modules=r".*out_proj").inject(mha)
    with pytest.raises(ValueError, match="output size"):
        AdapterConfig(target_modules=["1"]).inject(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))


def test_stacks_with_lora():
    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Linear(12, 12), torch.nn.GELU(), torch.nn.Linear(12, 12))
    fastpeft.inject(net, fastpeft.LoRAConfig(r=2, target_modules=["0", "2"]))
    AdapterConfig(bottleneck=4, target_modules=["2"]).inject(net)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B", "2.adapter.down_weight"} <= trainable
    x = torch.randn(5, 12)
    net(x).sum().backward()
    assert net[2].adapter.up_weight.grad is not None and net[0].lora_B.grad is not None


def test_triton_aot_compile_sm80_sm90():
    """The kernels compile ahead of time for sm_80 / sm_90 (catches what the interpreter lets through)."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        from fastpeft.kernels.adapter import aot_compile
        print(aot_compile([80, 90], variants=["down_fwd", "wu_grad"], dtypes=["bf16"]))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr:
        pytest.skip("no ptxas on this machine")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "down_fwd" in res.stdout and "wu_grad" in res.stdout


def test_torch_compile_fullgraph():
    torch.manual_seed(7)
    ad = BottleneckAdapter(24, 5, activation="silu")
    with torch.no_grad():
        ad.up_weight.normal_()
    h = torch.randn(3, 7, 24, requires_grad=True)
    y = torch.compile(ad, fullgraph=True)(h)
    y.square().sum().backward()
    grads = [h.grad.clone(), ad.down_weight.grad.clone()]
    h.grad = None
    ad.zero_grad()
    ad(h).square().sum().backward()
    assert torch.allclose(y, ad(h), atol=1e-6)
    assert torch.allclose(grads[0], h.grad, atol=1e-6) and torch.allclose(grads[1], ad.down_weight.grad, atol=1e-6)
