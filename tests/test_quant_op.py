"""The fused op over a quantized frozen base (fastpeft.peft_linear(x, QuantizedWeight, ...)).

Ground truth: fastpeft.reference.peft_linear in float64 on the dequantized weight, forward and every
gradient, NF4 (double quant on and off) and int8, fp32 and bf16 (fp32 adapters too), odd sizes (K
not a multiple of the block), 3-D and non-contiguous x, M = 0, with dropout; nothing of size [N, K]
saved for backward; bad input.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import fastpeft
from fastpeft.tools.equivalence import check, make_case

PATHS = ("lora", "dropout", "bias", "ia3_in", "ia3_out")
TRAINABLE = ("x", "lora_A", "lora_B", "bias", "ia3_in", "ia3_out")


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def quantized_case(fmt, paths=PATHS, m=37, k=70, n=23, r=5, double_quant=True, **kw_case):
    """(x, kwargs with the dequantized dense weight, the QuantizedWeight)."""
    x, kw = make_case(paths, m, k, n, r, **kw_case)
    qw = fastpeft.quantize_weight(kw["weight"], fmt, blocksize=64, double_quant=double_quant)
    kw["weight"] = qw.dequantize()  # the reference's weight: exactly what the kernels use
    return x, kw, qw


def on(qw):
    return lambda x, **kw: fastpeft.peft_linear(x, **{**kw, "weight": qw})


@pytest.mark.parametrize("fmt,double_quant", [("nf4", True), ("nf4", False), ("int8", False)],
                         ids=["nf4-dq", "nf4", "int8"])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                 (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16", "bf16-fp32-adapters"])
@pytest.mark.parametrize("paths", [PATHS, ("lora",), ("lora", "dropout"), ("bias",), ("ia3_in", "ia3_out")],
                         ids="+".join)
def test_quantized_base_matches_float64(fmt, double_quant, dtype, adapter_dtype, paths):
    x, kw, qw = quantized_case(fmt, paths, double_quant=double_quant, dtype=dtype, adapter_dtype=adapter_dtype)
    check(x, kw, TRAINABLE, fn=on(qw))


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@pytest.mark.parametrize("shape", ["3d", "noncontig", "m0", "k-not-a-block-multiple", "rank-above-kernel"])
def test_quantized_base_shapes(fmt, shape):
    m, k, n, r, lead, noncontig = 31, 64, 19, 4, None, False
    if shape == "3d":
        m, lead = 30, (2, 3, 5)
    elif shape == "noncontig":
        noncontig = True
    elif shape == "m0":
        m, lead = 0, (0, 2)
    elif shape == "k-not-a-block-multiple":
        k = 45
    elif shape == "rank-above-kernel":
        r = 65  # the C++ rank-r kernels stop at 64: the torch products take over
    x, kw, qw = quantized_case(fmt, m=m, k=k, n=n, r=r, lead=lead, noncontig=noncontig)
    check(x, kw, TRAINABLE, fn=on(qw))


def test_nothing_of_the_weights_size_is_saved():
    x, kw, qw = quantized_case("nf4", m=8, k=256, n=192)
    for name in ("lora_A", "lora_B", "bias"):
        kw[name].requires_grad_()
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        y = fastpeft.peft_linear(x.requires_grad_(), **{**kw, "weight": qw})
    y.sum().backward()
    assert sizes and max(sizes) < 192 * 256


def test_quantized_base_trains_and_weight_stays_frozen():
    x, kw, qw = quantized_case("nf4", paths=("lora", "bias"))
    before = {k: v.clone() for k, v in qw.tensors().items()}
    params = [kw[name].requires_grad_() for name in ("lora_A", "lora_B", "bias")]
    opt = torch.optim.SGD(params, lr=0.1)
    losses = []
    for _ in range(3):
        loss = fastpeft.peft_linear(x, **{**kw, "weight": qw}).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[k], v) for k, v in qw.tensors().items())


@pytest.mark.parametrize("case,error,match", [
    ("sparse index", ValueError, r"sparse_index values must be flat indices in \[0, 1610\)"),
    ("dora without lora", ValueError, "dora_magnitude needs lora_A and lora_B"),
    ("dora shape", ValueError, r"dora_magnitude must have shape \[23\]"),
    ("dtype", TypeError, "weight dtype torch.float32 must match x dtype torch.bfloat16"),
    ("lora shape", ValueError, r"lora_A must have shape \[r, 70\]"),
    ("x shape", ValueError, r"x must have shape \[\.\.\., 70\]"),
    ("p", ValueError, r"lora_dropout must be in \[0, 1\)"),
])
def test_quantized_base_bad_input_raises_before_any_work(case, error, match):
    x, kw, qw = quantized_case("nf4", paths=("lora", "dropout", "bias", "sparse") if case == "sparse index"
                               else ("lora", "dropout", "bias"))
    kw = {**kw, "weight": qw, "dropout_seed": None}
    if case == "sparse index":
        kw["sparse_index"] = kw["sparse_index"] + 1610 - int(kw["sparse_index"][-1])
    elif case == "dora without lora":
        kw = {**kw, "lora_A": None, "lora_B": None, "dora_magnitude": torch.ones(23)}
    elif case == "dora shape":
        kw["dora_magnitude"] = torch.ones(22)
    elif case == "dtype":
        x = x.bfloat16()
    elif case == "lora shape":
        kw["lora_A"] = kw["lora_A"][:, :-1]
    elif case == "x shape":
        x = x[:, :-1]
    elif case == "p":
        kw["lora_dropout"] = 1.0
    state = torch.get_rng_state()
    with pytest.raises(error, match=match):
        fastpeft.peft_linear(x, **kw)
    assert torch.equal(torch.get_rng_state(), state)
