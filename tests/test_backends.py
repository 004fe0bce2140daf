"""Every available backend against the float64 reference when only some arguments need gradients.

ops.py saves x only when a gradient reads it, so each backend must cope with x being absent in
the backward (dX alone, bias alone, ...).  Kernel-specific suites live in test_cpp.py and
test_triton.py; this file checks the shared contract.
"""
import pytest
import torch

import fastpeft
from fastpeft.tools.selfcheck import make_case, relative_error

ALL = ("lora", "dropout", "ia3_in", "ia3_out", "bias", "sparse")
GRAD_SUBSETS = [("x",), ("bias",), ("lora_A",), ("lora_B",), ("ia3_in",), ("ia3_out",), ("sparse_value",),
                ("x", "lora_B"), ("weight",)]


@pytest.mark.parametrize("backend", fastpeft.available_backends())
@pytest.mark.parametrize("wanted", GRAD_SUBSETS, ids="+".join)
def test_partial_gradients(backend, wanted):
    g = torch.Generator().manual_seed(hash(wanted) % 1000)
    x, w, kw = make_case(ALL, m=13, k=11, n=9, r=2, generator=g)
    tensors = {"x": x, "weight": w, **{k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}}
    for name, t in tensors.items():
        if t.is_floating_point():
            t.requires_grad_(name in wanted)
    y = fastpeft.peft_linear(x, w, backend=backend, **kw)
    gy = torch.randn(y.shape, generator=g)
    got = torch.autograd.grad(y, [tensors[n] for n in wanted], gy)
    ref = {n: t.detach().double().requires_grad_(n in wanted) if t.is_floating_point() else t
           for n, t in tensors.items()}
    y_ref = fastpeft.reference.peft_linear(ref["x"], ref["weight"], **{k: ref.get(k, v) for k, v in kw.items()})
    want = torch.autograd.grad(y_ref, [ref[n] for n in wanted], gy.double())
    assert relative_error(y, y_ref) < 1e-5
    for name, a, b in zip(wanted, got, want):
        assert relative_error(a, b) < 1e-5, name
