"""The op's one spec (fastpeft.core.spec) against everything that spells its arguments out.

The C++ schemas (csrc/registration.cpp), the C++ argument struct and gradient enum (csrc/op_args.h),
and the Python custom ops (fastpeft.core.ops) must list spec.TENSORS / SCALARS / GRAD_NAMES in
order, with the spec's types and optionality; the backends' contract is named tuples.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

import fastpeft
from fastpeft.core import ops, spec
from fastpeft.core.backends import cpp as cpp_backend
from fastpeft.core.backends import reference

HEADER = os.path.join(cpp_backend.CSRC, "op_args.h")


def _args(schema) -> list[tuple[str, str]]:
    """(name, type) of each argument of a torch FunctionSchema, types as a schema string spells them."""
    return [(a.name, str(a.type)) for a in schema.arguments]


def _parse(text: str) -> list[tuple[str, str]]:
    return _args(torch._C.parse_schema("f" + text))


def _returns(schema) -> list[str]:
    return [str(r.type) for r in schema.returns]


@pytest.fixture(scope="module")
def cpp_ops():
    if "cpp" not in fastpeft.available_backends():
        pytest.skip("the C++ backend is not available: " + str(cpp_backend.BACKEND.unavailable()))
    return cpp_backend.build()


@pytest.mark.parametrize("name,op", [("forward", "forward"), ("backward", "backward"),
                                     ("peft_linear", "autograd")])
def test_cpp_schemas_equal_spec(cpp_ops, name, op):
    actual = getattr(cpp_ops, name).default._schema
    expected = torch._C.parse_schema("f" + spec.schema(op))
    assert _args(actual) == _args(expected)
    assert _returns(actual) == _returns(expected)


@pytest.mark.parametrize("name,op", [("peft_linear_fwd", "custom_forward"), ("peft_linear_bwd", "custom_backward")])
def test_python_custom_op_schemas_equal_spec(name, op):
    actual = getattr(torch.ops.fastpeft, name).default._schema
    expected = torch._C.parse_schema("f" + spec.schema(op))
    assert _args(actual) == _args(expected)
    assert _returns(actual) == _returns(expected)


def test_schemas_list_the_spec_in_order():
    """The generated schemas themselves: every tensor (optional as the spec says), then the scalars."""
    fwd = _parse(spec.schema("forward"))
    assert [n for n, _ in fwd[:spec.N_TENSORS]] == list(spec.TENSOR_NAMES)
    assert [n for n, _ in fwd[spec.N_TENSORS:spec.N_ARGS]] == list(spec.SCALAR_NAMES)
    for (name, typ), arg in zip(fwd, spec.TENSORS):
        assert typ == ("Optional[Tensor]" if arg.optional else "Tensor"), name
    bwd = _parse(spec.schema("backward"))
    assert bwd[0][0] == "grad_y" and bwd[1] == ("x", "Optional[Tensor]")
    assert [n for n, _ in bwd[1:1 + spec.N_TENSORS]] == list(spec.TENSOR_NAMES)
    assert bwd[-1] == ("needs", "List[bool]")
    with pytest.raises(ValueError, match="op must be one of"):
        spec.schema("sideways")


def _header() -> str:
    with open(HEADER) as f:
        return f.read()


def test_cpp_struct_fields_follow_spec():
    rows = re.findall(r"^\s*X\((\w+),\s*(\w+),\s*(\w+)\)", _header(), re.M)
    assert [name for name, _, _ in rows] == list(spec.TENSOR_NAMES)
    for (name, typ, grad), arg in zip(rows, spec.TENSORS):
        assert typ == ("OptTensor" if arg.optional else "Tensor"), name
        assert grad == (f"g_{name}" if arg.grad else "kNoGrad"), name
    struct = re.search(r"struct OpArgs \{(.*?)\};", _header(), re.S).group(1)
    scalars = re.findall(r"^\s*(?:double|int64_t)\s+(\w+)", struct, re.M)
    assert scalars == list(spec.SCALAR_NAMES)
    assert re.search(r"kNumScalars = (\d+);", _header()).group(1) == str(len(spec.SCALARS))


def test_cpp_grad_enum_follows_spec():
    body = re.search(r"enum Grad : int \{(.*?)\};", _header(), re.S).group(1)
    names = [n.strip() for n in body.split(",") if n.strip()]
    assert names == [f"g_{n}" for n in spec.GRAD_NAMES] + ["kNumGrads"]


def test_grad_index_tables():
    assert [spec.TENSOR_NAMES[i] for i in spec.GRAD_ARG] == list(spec.GRAD_NAMES)
    for arg, g in zip(spec.TENSORS, spec.GRAD_INDEX):
        assert (g is not None) == arg.grad
        if g is not None:
            assert spec.GRAD_NAMES[g] == arg.name


def test_save_policy():
    none = spec.Needs._make(False for _ in spec.GRAD_NAMES)
    assert spec.saved_for_backward(none) == spec.SavePolicy(False, False, False)
    assert spec.saved_for_backward(none._replace(x=True)) == spec.SavePolicy(False, False, False)
    assert spec.saved_for_backward(none._replace(lora_B=True)) == spec.SavePolicy(False, True, False)
    assert spec.saved_for_backward(none._replace(ia3_out=True)) == spec.SavePolicy(False, False, True)
    for name in ("weight", "lora_A", "ia3_in", "sparse_value"):
        assert spec.saved_for_backward(none._replace(**{name: True})).x, name


def test_backend_contract_is_named_tuples():
    """A backend takes an OpArgs and returns Grads (by name: reordering the fields would be caught)."""
    torch.manual_seed(0)
    x, w = torch.randn(5, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    a, b = torch.randn(2, 6, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64)
    args = spec.OpArgs(x=x, weight=w, bias=bias, lora_A=a, lora_B=b, ia3_in=None, ia3_out=None, sparse_index=None,
                       sparse_value=None, dora_scale=None, lora_scale=0.5, p=0.0, seed=0)
    y, xa, z = reference.forward(args, False)
    assert torch.allclose(y, x @ w.t() + bias + 0.5 * (x @ a.t()) @ b.t())
    needs = spec.Needs._make(n in ("bias", "lora_B") for n in spec.GRAD_NAMES)
    grads = reference.backward(torch.ones_like(y), args, xa, z, needs)
    assert isinstance(grads, spec.Grads)
    assert torch.allclose(grads.bias, torch.full((4,), 5.0, dtype=torch.float64))
    assert torch.allclose(grads.lora_B, 0.5 * torch.ones_like(y).t() @ (x @ a.t()))
    assert grads.x is None and grads.lora_A is None


def test_autograd_tuple_is_built_from_the_spec():
    """One entry per forward input of the custom op: a gradient slot or None."""
    n_inputs = len(torch.ops.fastpeft.peft_linear_fwd.default._schema.arguments)
    assert len(ops._INPUT_GRAD) == n_inputs
    assert ops._INPUT_GRAD[:spec.N_TENSORS] == spec.GRAD_INDEX


# ---- the dora row: dora_scale c [N], y = c * (h W^T + s x~ A^T B^T) + bias --------------------------

def _dora_case(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m, k, n, r = 13, 11, 7, 3
    t = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    return dict(x=t(m, k), weight=t(n, k), bias=t(n), lora_A=t(r, k), lora_B=t(n, r), dora_scale=t(n).abs() + 0.5)


@pytest.mark.parametrize("backend", fastpeft.available_backends())
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_dora_scale_row_on_every_backend(backend, with_bias):
    """Each backend's forward and backward with dora_scale against float64 autograd of the formula,
    called through the named-tuple contract (u is saved in the z slot)."""
    from fastpeft.core.backends import resolve

    dtype = torch.float32
    case = _dora_case(dtype)
    if not with_bias:
        case["bias"] = None
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    impl = resolve(backend, torch.device(device), dtype)
    dev = {k: (v.to(device, dtype) if v is not None else None) for k, v in case.items()}
    args = spec.OpArgs(**{name: dev.get(name) for name in spec.TENSOR_NAMES}, lora_scale=0.6, p=0.0, seed=0)
    y, xa, u = impl.forward(args, True)
    leaves = {k: v.clone().requires_grad_() for k, v in case.items() if v is not None}
    pre = leaves["x"] @ leaves["weight"].t() + 0.6 * (leaves["x"] @ leaves["lora_A"].t()) @ leaves["lora_B"].t()
    ref = leaves["dora_scale"] * pre + (leaves["bias"] if with_bias else 0.0)
    assert (y.cpu().double() - ref).abs().max() < 1e-4
    assert (u.cpu().double() - pre).abs().max() < 1e-4  # the z slot holds u, the output before the scale
    gy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref.backward(gy)
    names = ("x", "bias", "lora_A", "lora_B", "dora_scale") if with_bias else ("x", "lora_A", "lora_B", "dora_scale")
    needs = spec.Needs._make(name in names for name in spec.GRAD_NAMES)
    grads = impl.backward(gy.to(device, dtype), args, xa, u, needs)
    for name in names:
        got, want = getattr(grads, name).cpu().double(), leaves[name].grad
        assert (got - want).abs().max() < 1e-3 * max(1.0, want.abs().max().item()), name


@pytest.mark.skipif("cpp" not in fastpeft.available_backends(), reason="the C++ backend is not available")
def test_dora_custom_op_route_equals_eager(monkeypatch):
    """DoRA through fastpeft::peft_linear_fwd/_bwd (the torch.compile route) equals the eager C++ op."""
    torch.manual_seed(0)
    x, w, bias = torch.randn(9, 6), torch.randn(5, 6), torch.randn(5)
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    m = torch.rand(5) + 0.5
    outs = []
    for route in ("eager", "custom-op"):
        leaves = [t.clone().requires_grad_() for t in (x, bias, a, b, m)]
        with monkeypatch.context() as ctx:
            if route == "custom-op":
                ctx.setattr(ops, "_tracing", lambda: True)
            y = fastpeft.peft_linear(leaves[0], w, leaves[1], lora_A=leaves[2], lora_B=leaves[3], lora_scale=0.5,
                                     dora_magnitude=leaves[4], backend="cpp")
            y.square().sum().backward()
        outs.append([y.detach()] + [t.grad for t in leaves])
    for got, want in zip(*outs):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
