"""Triton backend vs the float64 reference: forward, every gradient, every path, masks.

Without a GPU this runs the kernels under TRITON_INTERPRET=1 (set by tests/conftest.py before
fastpeft is imported) on small odd shapes: M, N, K are not multiples of the interpreter's
16-wide blocks, so every kernel sees ragged tiles in every dimension.
"""
from __future__ import annotations

import pytest
import torch

import fastpeft
from fastpeft import reference
from fastpeft.mask import hash_offsets, keep_mask, keep_threshold
from fastpeft.tools.equivalence import TOLERANCE, rel_err

pytestmark = pytest.mark.skipif("triton" not in fastpeft.available_backends(),
                                reason="triton backend unavailable (no GPU and TRITON_INTERPRET unset)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
M, K, N, R = 37, 45, 29, 3
TOL = {dt: TOLERANCE[dt] for dt in (torch.float32, torch.bfloat16, torch.float16)}
if DEVICE == "cuda":  # tf32x3 products on a GPU are fp32-accurate to ~1e-6, not exact
    TOL[torch.float32] = 1e-4
ALL = ("bias", "lora", "dropout", "ia3_in", "ia3_out", "sparse", "weight")


def sparse_pattern(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted unique flat indices: row 0 full, row 1 empty, ~20% of the rest."""
    rest = torch.nonzero(torch.rand(n - 2, k, generator=gen) < 0.2)
    flat = (rest[:, 0] + 2) * k + rest[:, 1]
    return torch.cat([torch.arange(k), flat]).to(torch.int64)


def make_inputs(paths, dtype, adapter_dtype=None, lead=(M,), r=R, seed=0, noncontig=False, x_grad=True):
    """Fresh random leaves for the given paths: (x, weight, bias, kwargs, leaves needing grad)."""
    gen = torch.Generator().manual_seed(seed)
    ad = adapter_dtype or dtype

    def rand(*shape, dt=dtype, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=gen) * scale + offset).to(dt)

    if noncontig:  # a transposed view: strides differ from the contiguous layout
        x = rand(*reversed(lead), K).transpose(0, -2) if len(lead) > 1 else rand(K, *lead).t()
    else:
        x = rand(*lead, K)
    weight = rand(N, K, scale=K ** -0.5)
    leaves = {"x": x.requires_grad_(x_grad), "weight": weight.requires_grad_("weight" in paths)}
    bias = None
    kwargs = {}
    if "bias" in paths:
        bias = leaves["bias"] = rand(N, dt=ad).requires_grad_()
    if "lora" in paths:
        leaves["lora_A"] = rand(r, K, dt=ad, scale=K ** -0.5).requires_grad_()
        leaves["lora_B"] = rand(N, r, dt=ad, scale=0.5).requires_grad_()
        kwargs.update(lora_scale=1.7, lora_dropout=0.3 if "dropout" in paths else 0.0, dropout_seed=2**40 + 123)
    if "ia3_in" in paths:
        leaves["ia3_in"] = rand(K, dt=ad, scale=0.3, offset=1.0).requires_grad_()
    if "ia3_out" in paths:
        leaves["ia3_out"] = rand(N, dt=ad, scale=0.3, offset=1.0).requires_grad_()
    if "sparse" in paths:
        kwargs["sparse_index"] = sparse_pattern(N, K, gen)
        leaves["sparse_value"] = rand(kwargs["sparse_index"].numel(), dt=ad, scale=0.1).requires_grad_()
    for name in ("lora_A", "lora_B", "ia3_in", "ia3_out", "sparse_value"):
        if name in leaves:
            kwargs[name] = leaves[name]
    return x, weight, bias, kwargs, leaves


def check(paths, dtype=torch.float32, adapter_dtype=None, lead=(M,), r=R, noncontig=False, x_grad=True, seed=0):
    """Run the Triton op and the float64 reference; compare the output and every gradient."""
    x, weight, bias, kwargs, leaves = make_inputs(paths, dtype, adapter_dtype, lead, r, seed, noncontig, x_grad)
    to_dev = {name: t.detach().to(DEVICE).requires_grad_(t.requires_grad) for name, t in leaves.items()}
    dev_kwargs = {k: (to_dev[k] if k in to_dev else v.to(DEVICE) if torch.is_tensor(v) else v)
                  for k, v in kwargs.items()}
    y = fastpeft.peft_linear(to_dev["x"], to_dev["weight"], to_dev.get("bias"), backend="triton", **dev_kwargs)
    # The op uses adapters in x's precision (DESIGN.md section 1): round them the same way, then
    # compute in float64.
    ref_leaves = {name: t.detach().to(dtype).double().requires_grad_(t.requires_grad) for name, t in leaves.items()}
    ref_kwargs = {k: (ref_leaves[k] if k in ref_leaves else v) for k, v in kwargs.items()}
    y_ref = reference.peft_linear(ref_leaves["x"], ref_leaves["weight"], ref_leaves.get("bias"), **ref_kwargs)
    assert y.dtype == dtype and y.shape == y_ref.shape
    tol = TOL[dtype]
    if y_ref.numel():
        assert rel_err(y.cpu(), y_ref) < tol, f"forward error {rel_err(y.cpu(), y_ref):.3g}"
    grad = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(seed + 1))
    y.backward(grad.to(dtype).to(DEVICE))
    y_ref.backward(grad.to(dtype).double())
    checked = []
    for name, leaf in to_dev.items():
        if not leaf.requires_grad:
            assert leaf.grad is None
            continue
        ref_grad = ref_leaves[name].grad
        assert leaf.grad is not None, f"no gradient for {name}"
        assert leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape, name
        if ref_grad.numel() and ref_grad.norm() > 0:
            err = rel_err(leaf.grad.cpu(), ref_grad)
            assert err < tol, f"gradient of {name}: error {err:.3g} >= {tol}"
        else:
            assert torch.count_nonzero(leaf.grad) == 0, f"gradient of {name} should be zero"
        checked.append(name)
    return checked


# --- every path on its own and in combination (fp32: the interpreter is exact-ish) -------------

@pytest.mark.parametrize("paths", [
    ("weight",),
    ("bias",),
    ("lora",),
    ("lora", "dropout"),
    ("ia3_in",),
    ("ia3_out",),
    ("sparse",),
    ("bias", "ia3_in", "ia3_out", "weight"),
    ("sparse", "ia3_in", "ia3_out"),
    ("lora", "dropout", "ia3_in", "bias"),
    ALL,
], ids=lambda p: "+".join(p))
def test_paths_fp32(paths):
    checked = check(paths)
    assert "x" in checked and ("weight" in checked) == ("weight" in paths)


@pytest.mark.parametrize("dtype,adapter_dtype", [
    (torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
], ids=["bf16", "fp16", "bf16-fp32adapters", "fp16-fp32adapters"])
def test_all_paths_half(dtype, adapter_dtype):
    check(ALL, dtype, adapter_dtype)


def test_3d_input():
    check(ALL, lead=(3, 13))


def test_noncontiguous_3d_input_bf16():
    check(ALL, torch.bfloat16, lead=(3, 13), noncontig=True)


def test_noncontiguous_2d_input():
    check(("lora", "dropout", "ia3_out", "bias"), noncontig=True)


def test_empty_batch():
    check(ALL, lead=(0,))
    check(ALL, lead=(2, 0))


def test_ia3_in_trains_while_x_does_not():
    # dX is not needed, but the dX GEMM still runs for d_ia3_in's reduction.
    check(("ia3_in", "lora", "dropout", "bias"), x_grad=False)


def test_rank_above_one_block():
    # r = 70 spans two 64-wide LoRA blocks in the epilogue loop.
    check(("lora", "dropout"), r=70)


def test_sparse_without_nonzeros():
    x, weight = torch.randn(M, K, device=DEVICE), torch.randn(N, K, device=DEVICE)
    value = torch.zeros(0, device=DEVICE, requires_grad=True)
    index = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    y = fastpeft.peft_linear(x, weight, sparse_index=index, sparse_value=value, backend="triton")
    assert rel_err(y.cpu(), x.double().cpu() @ weight.double().cpu().t()) < TOL[torch.float32]
    y.sum().backward()
    assert value.grad.shape == (0,)


def test_seed_changes_mask_and_is_reproducible():
    x, weight, bias, kwargs, _ = make_inputs(("lora", "dropout"), torch.float32)
    kwargs = {k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    x, weight = x.detach().to(DEVICE), weight.detach().to(DEVICE)
    kwargs = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in kwargs.items()}
    a = fastpeft.peft_linear(x, weight, backend="triton", **kwargs)
    b = fastpeft.peft_linear(x, weight, backend="triton", **kwargs)
    c = fastpeft.peft_linear(x, weight, backend="triton", **{**kwargs, "dropout_seed": 7})
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


# --- the in-kernel mask is fastpeft.mask, bit for bit -------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2**31 + 7, 2**32 + 5, 2**62 + 12345, 2**63 - 1])
def test_keep_mask_bit_identical(seed):
    from fastpeft.kernels.dropout import keep_mask as triton_keep_mask

    for p in (0.1, 0.5, 0.95):
        got = triton_keep_mask(seed, p, 3, 700, device=DEVICE).cpu()
        assert torch.equal(got, keep_mask(seed, p, 3, 700)), (seed, p)


@pytest.mark.parametrize("base", [2**32 - 300, 2**32, 2**40 + 3, 2**61 + 2**33 + 11])
def test_keep_mask_large_offsets(base):
    # Offsets >= 2**32 exercise the high word: off_hi * 0x9E3779B9 must wrap modulo 2**32.
    from fastpeft.kernels.dropout import keep_mask as triton_keep_mask

    seed, p = 0x1234_5678_9ABC_DEF0 & (2**63 - 1), 0.37
    got = triton_keep_mask(seed, p, 4, 150, offset_base=base, device=DEVICE).cpu().flatten()
    expected = hash_offsets(seed, base + torch.arange(600, dtype=torch.int64)) >= keep_threshold(p)
    assert torch.equal(got, expected)
    assert 0.5 < got.float().mean().item() < 0.75  # keep rate ~ 1 - p: the words are not degenerate


# --- kernels with row splits (M large enough to split the contraction over M) -------------------

def test_contractions_over_long_m():
    from fastpeft.kernels.dropout import mask_args
    from fastpeft.kernels.fused_linear import bias_scale_grad, matmul_tn
    from fastpeft.kernels.sparse import sddmm

    gen = torch.Generator().manual_seed(5)
    m, p, q = 300, 20, 33
    lhs, rhs = torch.randn(m, p, generator=gen), torch.randn(m, q, generator=gen)
    ls, rs = torch.rand(p, generator=gen) + 0.5, torch.rand(q, generator=gen) + 0.5
    seed, drop = 99, 0.25
    keep = keep_mask(seed, drop, m, q).double() / (1 - drop)
    got = matmul_tn(lhs.to(DEVICE), rhs.to(DEVICE), torch.float32, scale=0.5, l_scale=ls.to(DEVICE),
                    r_scale=rs.to(DEVICE), dropout=(*mask_args(seed, drop), 1 / (1 - drop)))
    want = 0.5 * (lhs.double() * ls.double()).t() @ (rhs.double() * rs.double() * keep)
    assert rel_err(got.cpu(), want) < TOL[torch.float32]

    z = torch.randn(m, p, generator=gen)
    db, ds = bias_scale_grad(lhs.to(DEVICE), z.to(DEVICE), ls.to(DEVICE), True, True)
    assert rel_err(db.cpu(), (lhs.double() * ls.double()).sum(0)) < TOL[torch.float32]
    assert rel_err(ds.cpu(), (lhs.double() * z.double()).sum(0)) < TOL[torch.float32]

    index = torch.randperm(p * q, generator=gen)[:150].sort().values
    got = sddmm(lhs.to(DEVICE), rhs.to(DEVICE), index.to(DEVICE), p, q, ls.to(DEVICE), rs.to(DEVICE))
    dense = (lhs.double() * ls.double()).t() @ (rhs.double() * rs.double())
    assert rel_err(got.cpu(), dense.flatten()[index]) < TOL[torch.float32]


# --- errors -------------------------------------------------------------------------------------

def test_float64_is_rejected_with_a_clear_error():
    x = torch.randn(4, K, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="triton"):
        fastpeft.peft_linear(x, torch.randn(N, K, dtype=torch.float64, device=DEVICE), backend="triton")


def test_device_errors_name_the_device():
    from fastpeft.core.backends.triton import BACKEND

    assert BACKEND.unavailable() is None
    assert BACKEND.device_error(torch.device(DEVICE)) is None
    assert "meta" in BACKEND.device_error(torch.device("meta"))


def test_zero_out_features():
    # N = 0: no output columns, yet every gradient (x, bias, LoRA, ia3_in) is well defined.
    gen = torch.Generator().manual_seed(3)
    leaves = {"x": torch.randn(5, K, generator=gen), "bias": torch.randn(0), "lora_A": torch.randn(2, K, generator=gen),
              "lora_B": torch.randn(0, 2), "ia3_in": torch.rand(K, generator=gen)}
    grads = []
    for backend in ("triton", None):
        ts = {k: v.clone().to(DEVICE if backend else "cpu").requires_grad_() for k, v in leaves.items()}
        fn = (lambda *a, **k: fastpeft.peft_linear(*a, backend="triton", **k)) if backend else reference.peft_linear
        y = fn(ts["x"], torch.randn(0, K, device=ts["x"].device), ts["bias"], lora_A=ts["lora_A"],
               lora_B=ts["lora_B"], lora_dropout=0.2, dropout_seed=3, ia3_in=ts["ia3_in"])
        assert y.shape == (5, 0)
        grads.append(torch.autograd.grad(y.sum(), list(ts.values())))
    for got, want in zip(*grads):
        assert got.shape == want.shape and torch.count_nonzero(got) == 0
