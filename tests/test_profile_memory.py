"""fastpeft.profile_memory: saved-for-backward bytes per layer, parameters excluded, shared
storages counted once, and a peak that covers what the step allocates."""
import math

import pytest
import torch
from torch import nn

from fastpeft.tools.profiling import MemoryProfile, profile_memory


def _nbytes(*shape, dtype=torch.float32):
    return math.prod(shape) * torch.tensor([], dtype=dtype).element_size()


def test_plain_linear_saves_exactly_its_input():
    torch.manual_seed(0)
    lin = nn.Linear(37, 23)
    x = torch.randn(11, 37, requires_grad=True)
    prof = profile_memory(lin, x)
    assert isinstance(prof, MemoryProfile) and isinstance(prof, dict)
    # weight and bias are parameters (excluded); x is the one activation F.linear saves
    assert prof["saved_bytes"] == _nbytes(11, 37)
    assert prof["saved_bytes_by_layer"] == {"": _nbytes(11, 37)}
    assert x.grad is not None and lin.weight.grad is not None  # backward of the sum ran


def test_frozen_linear_with_frozen_input_saves_nothing():
    lin = nn.Linear(16, 8).requires_grad_(False)
    prof = profile_memory(lin, torch.randn(4, 16), backward=False)
    assert prof["saved_bytes"] == 0 and prof["saved_bytes_by_layer"] == {}


def test_per_layer_attribution_and_shared_storage_counted_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    x = torch.randn(7, 20, requires_grad=True)
    prof = profile_memory(model, x)
    # layer 0 saves x; ReLU saves its output; layer 2 saves the same tensor (its input): once
    assert prof["saved_bytes_by_layer"] == {"0": _nbytes(7, 20), "1": _nbytes(7, 30)}
    assert prof["saved_bytes"] == _nbytes(7, 20) + _nbytes(7, 30)
    assert prof["saved_tensors"] >= 3


def test_views_of_one_storage_count_its_full_size_once():
    big = torch.randn(64, 32, requires_grad=True)

    def fn(t):
        # two saved views of the same storage (mul saves both operands)
        return t[:8] * t[8:16]

    prof = profile_memory(fn, big)
    assert prof["saved_bytes"] == _nbytes(64, 32)


def test_lora_layer_saves_x_plus_an_m_by_r_tensor():
    import fastpeft

    torch.manual_seed(0)
    m, k, n, r = 33, 48, 40, 4
    weight = nn.Parameter(torch.randn(n, k), requires_grad=False)
    lora_A = nn.Parameter(torch.randn(r, k) * 0.1)
    lora_B = nn.Parameter(torch.randn(n, r) * 0.1)
    x = torch.randn(m, k, requires_grad=True)
    for p in (0.0, 0.25):  # dropout must not add a saved mask or a dropped copy of x
        prof = profile_memory(lambda t: fastpeft.peft_linear(t, weight, lora_A=lora_A, lora_B=lora_B,
                                                             lora_dropout=p, backend="reference"), x)
        assert prof["saved_bytes"] <= _nbytes(m, k) + _nbytes(m, r) + 64, p
        assert prof["saved_bytes"] >= _nbytes(m, k), p


def test_exclude_argument_and_parameter_detection():
    w = torch.randn(16, 16, requires_grad=True)  # a plain tensor closed over, not a Parameter
    x = torch.randn(5, 16, requires_grad=True)
    fn = lambda t: t @ w  # noqa: E731  (matmul saves both t and w)
    assert profile_memory(fn, x)["saved_bytes"] == _nbytes(5, 16) + _nbytes(16, 16)
    assert profile_memory(fn, x, exclude=[w])["saved_bytes"] == _nbytes(5, 16)
    wp = nn.Parameter(w.detach().clone())
    assert profile_memory(lambda t: t @ wp, x)["saved_bytes"] == _nbytes(5, 16)


def test_peak_covers_the_step_allocations():
    x = torch.randn(256, 512, requires_grad=True)
    lin = nn.Linear(512, 1024)
    prof = profile_memory(lin, x)
    # the output [256, 1024] exists during the step, and the grads of x, weight and bias are allocated
    assert prof["peak_bytes"] >= _nbytes(256, 1024)
    assert prof["peak_bytes"] < 64 * _nbytes(256, 1024)
    assert prof["peak_source"]


def test_table_and_bad_input():
    prof = profile_memory(nn.Sequential(nn.Linear(8, 8), nn.Tanh()), torch.randn(3, 8, requires_grad=True))
    text = str(prof)
    assert "total saved" in text and "peak" in text and "0" in text
    with pytest.raises(ValueError, match="require"):
        profile_memory(nn.Linear(4, 4).requires_grad_(False), torch.randn(2, 4))
