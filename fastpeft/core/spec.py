"""The fused op's contract, defined once (DESIGN.md, "The op").

    h = x ⊙ ia3_in;   z = h (W + S)ᵀ + bias;   z = z ⊙ ia3_out;   y = z + s · (drop_p(x) Aᵀ) Bᵀ
    with dora_scale c:  u = h (W + S)ᵀ ⊙ ia3_out + s · (drop_p(x) Aᵀ) Bᵀ;   y = c ⊙ u + bias
    (the bias joins after the scale; c is DoRA's m / ‖W + s·B·A‖_row, fastpeft.core.dora)

Everything that spells the op's arguments out is derived from the tables below: the
torch.library schemas (``schema``), the Python autograd wiring and fakes (fastpeft.core.ops), the
backend contract (``OpArgs`` in, ``Grads`` out: named tuples, never positional lists), and the save
policy (``saved_for_backward``).  On the C++ side, csrc/op_args.h holds one argument struct and one
gradient enum in this order; tests/test_spec.py checks that the C++ schemas, struct and enum agree
with this file.

Adding an argument (a new PEFT path) means: one ``Arg`` row here, its math in fastpeft/reference.py
and the backends' epilogues, and a row in the test table (CONTRIBUTING.md has the checklist).
"""
from __future__ import annotations

from collections import namedtuple
from typing import NamedTuple


class Arg(NamedTuple):
    """One tensor argument of the op.

    shape: symbolic, in the op's 2-D form (M rows of x, K = in_features, N = out_features, r = rank).
    dtype: "float" (x itself), "x" (x's dtype), "x|fp32" (x's dtype or float32: adapters kept in fp32
    are used in x's precision and get their gradient back in their own dtype), "int64".
    grad: a gradient flows to it when it requires grad.
    path: the PEFT path it belongs to ("base" for the frozen layer).
    """

    name: str
    shape: str
    dtype: str
    grad: bool
    optional: bool
    path: str


TENSORS: tuple[Arg, ...] = (
    Arg("x", "[M, K]", "float", True, False, "base"),
    Arg("weight", "[N, K]", "x", True, False, "base"),
    Arg("bias", "[N]", "x|fp32", True, True, "bitfit"),
    Arg("lora_A", "[r, K]", "x|fp32", True, True, "lora"),
    Arg("lora_B", "[N, r]", "x|fp32", True, True, "lora"),
    Arg("ia3_in", "[K]", "x|fp32", True, True, "ia3"),
    Arg("ia3_out", "[N]", "x|fp32", True, True, "ia3"),
    Arg("sparse_index", "[nnz]", "int64", False, True, "sparse"),
    Arg("sparse_value", "[nnz]", "x|fp32", True, True, "sparse"),
    Arg("dora_scale", "[N]", "x|fp32", True, True, "dora"),
)
# Scalars, after the tensors: (name, schema type).  p is the LoRA dropout probability, seed the
# counter-based mask's key (fastpeft.mask); both are 0 without dropout.
SCALARS: tuple[tuple[str, str], ...] = (("lora_scale", "float"), ("p", "float"), ("seed", "int"))

TENSOR_NAMES = tuple(a.name for a in TENSORS)
GRAD_NAMES = tuple(a.name for a in TENSORS if a.grad)  # the order of every gradient tuple
SCALAR_NAMES = tuple(name for name, _ in SCALARS)
N_TENSORS = len(TENSORS)
N_ARGS = N_TENSORS + len(SCALARS)  # the length of an OpArgs
# For each tensor argument (TENSORS order): the index of its gradient in GRAD_NAMES, or None.
GRAD_INDEX = tuple(GRAD_NAMES.index(a.name) if a.grad else None for a in TENSORS)
# For each gradient (GRAD_NAMES order): the index of its argument in TENSORS.
GRAD_ARG = tuple(TENSOR_NAMES.index(name) for name in GRAD_NAMES)

OpArgs = namedtuple("OpArgs", TENSOR_NAMES + SCALAR_NAMES)
OpArgs.__doc__ = "The op's arguments in the 2-D form backends take (x is [M, K] contiguous)."
Grads = namedtuple("Grads", GRAD_NAMES)
Grads.__doc__ = ("One entry per differentiable argument, in GRAD_NAMES order: a gradient tensor, or "
                 "None where it is not needed (as a Needs tuple: one bool each).")
Needs = Grads

# What the forward hands to autograd besides y: the [M, r] product drop(x) Aᵀ (dB reads it) and the
# [M, N] output before ia3_out (d ia3_out reads it), or with dora_scale the output u before the scale
# (d dora_scale reads it; DoRA is not combined with IA3); empty [0] tensors when not kept.
SAVED_OUTPUTS = ("xa", "z")


class SavePolicy(NamedTuple):
    """Which activations autograd keeps for a call; the weight and adapters are Parameters (no copy)."""

    x: bool
    xa: bool
    z: bool


def saved_for_backward(needs: Needs) -> SavePolicy:
    """The one save policy of every backend and route: x only when a gradient reads it (dW, dA,
    d ia3_in, d sparse_value), xa only when lora_B trains, z only when ia3_out or dora_scale trains,
    and never a dropout mask or a dropped copy of x (the backward regenerates the mask from the seed)."""
    return SavePolicy(x=needs.weight or needs.lora_A or needs.ia3_in or needs.sparse_value,
                      xa=needs.lora_B, z=needs.ia3_out or needs.dora_scale)


def _schema_tensors(optional_x: bool = False) -> list[str]:
    out = []
    for a in TENSORS:
        opt = a.optional or (optional_x and a.name == "x")
        out.append(f"Tensor{'?' if opt else ''} {a.name}")
    return out


def _scalars(seed: str) -> list[str]:
    return [f"{seed if n == 'seed' else t} {n}" for n, t in SCALARS]


SCHEMA_OPS = ("forward", "backward", "autograd", "custom_forward", "custom_backward")


def schema(op: str) -> str:
    """The torch.library schema (without the name) of one of the op's entry points.

    C++ (torch.ops.fastpeft_cpp.*, csrc/registration.cpp):
    "forward":  (x [M, K], ..., scalars, save_z) -> (y, xa, z)
    "backward": (grad_y, x or None, ..., xa, z, scalars, needs) -> one tensor per GRAD_NAMES entry,
                empty [0] where not needed
    "autograd": the eager form with autograd inside: x [..., K], seed None draws one -> y
    Python (torch.ops.fastpeft.peft_linear_fwd / _bwd, fastpeft.core.ops): as forward / backward
    with the seed as a tensor (None: drawn inside, returned as a 4th output) and the backend's name:
    "custom_forward":  (..., Tensor? seed, bool save_z, str backend) -> (y, xa, z, seed)
    "custom_backward": (grad_y, ..., xa, z, ..., Tensor seed, needs, str backend) -> Tensor[]
    """
    needs = f"bool[{len(GRAD_NAMES)}] needs"
    saved = [f"Tensor? {n}" for n in SAVED_OUTPUTS]
    if op == "forward":
        args = _schema_tensors() + _scalars("int") + ["bool save_z"]
        return f"({', '.join(args)}) -> (Tensor, Tensor, Tensor)"
    if op == "backward":
        args = ["Tensor grad_y"] + _schema_tensors(optional_x=True) + saved + _scalars("int") + [needs]
        return f"({', '.join(args)}) -> Tensor[]"
    if op == "autograd":
        return f"({', '.join(_schema_tensors() + _scalars('int?'))}) -> Tensor"
    if op == "custom_forward":
        args = _schema_tensors() + _scalars("Tensor?") + ["bool save_z", "str backend"]
        return f"({', '.join(args)}) -> (Tensor, Tensor, Tensor, Tensor)"
    if op == "custom_backward":
        args = (["Tensor grad_y"] + _schema_tensors(optional_x=True) + saved + _scalars("Tensor")
                + [needs, "str backend"])
        return f"({', '.join(args)}) -> Tensor[]"
    raise ValueError(f"op must be one of {', '.join(map(repr, SCHEMA_OPS))}, got {op!r}")
