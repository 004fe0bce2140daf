"""The op's math: reference backend vs plain-autograd reference vs float64, every path combination."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastpeft
from fastpeft import mask
from fastpeft.tools.selfcheck import compare, make_case, relative_error

PATHS = ("lora", "dropout", "ia3_in", "ia3_out", "bias", "sparse")
COMBOS = [c for n in range(1, len(PATHS) + 1) for c in itertools.combinations(PATHS, n)
          if not ("dropout" in c and "lora" not in c)]


@pytest.mark.parametrize("paths", COMBOS, ids=lambda c: "+".join(c))
def test_reference_backend_every_combination_fp32(paths):
    assert compare("reference", paths, dtype=torch.float32, seed=len(paths)) < 1e-5


@pytest.mark.parametrize("paths", [("lora", "dropout"), ("ia3_in", "ia3_out", "bias"), PATHS], ids="+".join)
def test_reference_backend_bf16(paths):
    assert compare("reference", paths, dtype=torch.bfloat16, seed=3) < 1e-2


@pytest.mark.parametrize("paths", [("lora", "dropout", "ia3_in", "ia3_out", "bias", "sparse"), ("lora",)])
def test_gradcheck_float64(paths):
    g = torch.Generator().manual_seed(1)
    x, w, kw = make_case(paths, m=5, k=7, n=6, r=2, dtype=torch.float64, generator=g)
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    def fn(x, w, *adapters):
        return fastpeft.peft_linear(x, w, **{**kw, **dict(zip(names, adapters))}, backend="reference")
    assert torch.autograd.gradcheck(fn, (x, w, *[kw[n] for n in names]))
    def ref(x, w, *adapters):
        return fastpeft.reference.peft_linear(x, w, **{**kw, **dict(zip(names, adapters))})
    assert torch.autograd.gradcheck(ref, (x, w, *[kw[n] for n in names]))


@pytest.mark.parametrize("shape", [(0, 9), (3, 4, 9), (2, 3, 4, 9)])
def test_leading_dims_and_empty(shape):
    x = torch.randn(*shape, requires_grad=True)
    w, a, b = torch.randn(5, 9), torch.randn(2, 9, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    y = fastpeft.peft_linear(x, w, lora_A=a, lora_B=b, backend="reference")
    assert y.shape == (*shape[:-1], 5)
    y_ref = fastpeft.reference.peft_linear(x, w, lora_A=a, lora_B=b)
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    assert x.grad.shape == x.shape and a.grad.shape == a.shape


def test_non_contiguous_x():
    base = torch.randn(9, 6, 4).double()
    x = base.transpose(0, 2)[:, ::2]  # [4, 3, 9], non-contiguous
    assert not x.is_contiguous()
    w, a, b = torch.randn(5, 9).double(), torch.randn(3, 9).double(), torch.randn(5, 3).double()
    kw = dict(lora_A=a, lora_B=b, lora_dropout=0.3, dropout_seed=11)
    y = fastpeft.peft_linear(x, w, backend="reference", **kw)
    torch.testing.assert_close(y, fastpeft.reference.peft_linear(x.contiguous(), w, **kw))


def test_fp32_adapters_with_bf16_x_keep_their_dtype():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g).bfloat16().requires_grad_()
    w = torch.randn(4, 8, generator=g).bfloat16()
    a = torch.randn(2, 8, generator=g, requires_grad=True)
    b = torch.randn(4, 2, generator=g, requires_grad=True)
    s = torch.ones(4, requires_grad=True)
    y = fastpeft.peft_linear(x, w, lora_A=a, lora_B=b, ia3_out=s, backend="reference")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert a.grad.dtype == b.grad.dtype == s.grad.dtype == torch.float32
    assert x.grad.dtype == torch.bfloat16


def test_dropout_seed_reproducible_and_uses_default_generator():
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    a, b = torch.randn(3, 16), torch.randn(4, 3)
    kw = dict(lora_A=a, lora_B=b, lora_dropout=0.5, backend="reference")
    torch.manual_seed(5)
    y1 = fastpeft.peft_linear(x, w, **kw)
    torch.manual_seed(5)
    y2 = fastpeft.peft_linear(x, w, **kw)
    y3 = fastpeft.peft_linear(x, w, **kw)
    torch.testing.assert_close(y1, y2)
    assert not torch.equal(y2, y3)


def test_backward_saves_no_mask_or_dropped_x():
    x = torch.randn(64, 32, requires_grad=False)
    w = torch.randn(16, 32)
    a = torch.randn(4, 32, requires_grad=True)
    b = torch.randn(16, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fastpeft.peft_linear(x, w, lora_A=a, lora_B=b, lora_dropout=0.5, dropout_seed=1, backend="reference")
    params = {id(w), id(a), id(b)}
    big = [t for t in saved if id(t) not in params and t.numel() >= x.numel()]
    # only x itself (for dA) may be x-sized; no mask, no dropped copy
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()


class TestMask:
    def test_keep_rate(self):
        keep = mask.keep_mask(1234, 0.1, 300, 300)
        assert abs(keep.float().mean().item() - 0.9) < 0.01

    def test_p_zero_keeps_all(self):
        assert mask.keep_mask(7, 0.0, 10, 10).all()

    def test_known_values_match_uint32_arithmetic(self):
        """The function documented in fastpeft/mask.py, written out in numpy uint32 arithmetic."""
        import numpy as np

        def mix32(v):
            v = np.uint64(v)
            v ^= v >> np.uint64(16)
            v = (v * np.uint64(0x7FEB352D)) & np.uint64(0xFFFFFFFF)
            v ^= v >> np.uint64(15)
            v = (v * np.uint64(0x846CA68B)) & np.uint64(0xFFFFFFFF)
            return int(v ^ (v >> np.uint64(16)))

        seed_lo, seed_hi = 0x12345678, 0x5EADBEEF
        seed = (seed_hi << 32) | seed_lo
        k0 = mix32(seed_lo ^ mix32(seed_hi ^ 0x243F6A88))
        k1 = mix32(seed_hi ^ mix32(k0 ^ 0x85A308D3))
        assert mask.seed_key(seed) == (k0, k1)
        offsets = [0, 1, 77, 2**32 - 1, 2**32, 2**35 + 3]
        got = mask.hash_offsets(seed, torch.tensor(offsets)).tolist()
        for off, h in zip(offsets, got):
            first = mix32((off & 0xFFFFFFFF) ^ k0)
            expect = mix32(first ^ (((off >> 32) * 0x9E3779B9 + k1) & 0xFFFFFFFF))
            assert h == expect

    def test_seed_key_is_a_bijection_on_a_sample(self):
        """Distinct seeds give distinct round keys (so distinct masks), including seeds 2**32 apart."""
        seeds = list(range(4096)) + [s << 32 for s in range(1, 4096)] + [2**63 - 1 - s for s in range(4096)]
        assert len({mask.seed_key(s) for s in seeds}) == len(seeds)

    def test_seeds_decorrelated(self):
        a, b = mask.keep_mask(1, 0.5, 64, 64), mask.keep_mask(1 + 2**32, 0.5, 64, 64)
        agree = (a == b).float().mean().item()
        assert 0.4 < agree < 0.6


@settings(max_examples=25, deadline=None)
@given(m=st.integers(0, 9), k=st.integers(1, 12), n=st.integers(1, 10), r=st.integers(1, 4),
       paths=st.sets(st.sampled_from(PATHS)), seed=st.integers(0, 2**31))
def test_fuzz_reference_backend(m, k, n, r, paths, seed):
    paths = tuple(sorted(paths - ({"dropout"} if "lora" not in paths else set())))
    g = torch.Generator().manual_seed(seed)
    x, w, kw = make_case(paths, m=m, k=k, n=n, r=r, dtype=torch.float64, generator=g)
    y = fastpeft.peft_linear(x, w, backend="reference", **kw)
    y_ref = fastpeft.reference.peft_linear(x, w, **kw)
    assert y.shape == (m, n)
    if m:
        assert relative_error(y, y_ref) < 1e-10
