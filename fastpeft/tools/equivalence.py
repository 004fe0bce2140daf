"""The one equivalence harness: random cases, the error measure and the tolerance table.

Every check of a backend (the test suite, ``fastpeft check``, the benchmark's error column) runs the
op and ``fastpeft.reference.peft_linear`` in float64 on the same inputs and compares the output and
every requested gradient by ``rel_err`` = ‖out − ref‖ / ‖ref‖ (Frobenius, float64).

Tolerances (DESIGN.md, "Testing"): fp32 1e-5 (1e-3 for a CUDA fp32 dot in tf32); bf16 / fp16: the
larger of 2 × the error plain PyTorch makes on the same case in that dtype (the library's rule: a
kernel may be as far from float64 as twice a plain PyTorch computation, no further) and a floor
that keeps a lucky draw from making the bound zero, capped at 1e-2.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from fastpeft import reference

# The path names of a case, as the op's arguments read (dropout and dora only together with lora).
PATHS = ("lora", "dropout", "dora", "ia3_in", "ia3_out", "bias", "sparse")
GRAD_NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "dora_magnitude", "ia3_in", "ia3_out", "sparse_value")
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
TF32_TOLERANCE = 1e-3
HALF_FLOOR = 1e-3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (the absolute error when ref is all zeros)."""
    ref = ref.detach().double()
    err = (out.detach().double() - ref).norm().item()
    denom = ref.norm().item()
    return err / denom if denom > 0 else err


def tolerance(dtype: torch.dtype, device="cpu") -> float:
    """The fixed bound for ``dtype`` (for bf16/fp16 the cap; ``check`` tightens it per case)."""
    if dtype == torch.float32 and str(device).startswith("cuda"):
        return TF32_TOLERANCE
    return TOLERANCE[dtype]


def make_case(paths: Sequence[str], m: int = 37, k: int = 29, n: int = 23, r: int = 5, *,
              dtype: torch.dtype = torch.float32, adapter_dtype: Optional[torch.dtype] = None,
              lead: Optional[tuple] = None, noncontig: bool = False, density: float = 0.15,
              device="cpu", generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict]:
    """Fresh random (x, kwargs) for ``fastpeft.peft_linear(x, **kwargs)`` with the given paths.

    Nothing requires grad yet (``check`` decides).  ``lead`` reshapes x to [*lead, k] (its product
    must be m); ``noncontig`` makes x a transposed view; adapters are in ``adapter_dtype`` (default:
    x's).  Values are O(1) with weights scaled by 1/√k, IA3 scales near 1, the DoRA magnitude
    ‖W‖_row times a factor near 1 (so c = m / ‖W + s·B·A‖_row is away from 1).
    """
    unknown = set(paths) - set(PATHS)
    if unknown:
        raise ValueError(f"paths must be among {PATHS}, got {sorted(unknown)}")
    if "dora" in paths and "lora" not in paths:
        raise ValueError(f"paths {tuple(paths)}: dora needs lora (dropout without lora is ignored)")
    gen = generator
    ad = adapter_dtype or dtype

    def rnd(*shape, dt=dtype, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=dt)

    x = rnd(k, m).t() if noncontig else rnd(m, k)
    if lead is not None:
        x = x.reshape(*lead, k)
    kw: dict = {"weight": rnd(n, k, scale=k ** -0.5)}
    if "bias" in paths:
        kw["bias"] = rnd(n, dt=ad)
    if "lora" in paths:
        kw.update(lora_A=rnd(r, k, dt=ad, scale=k ** -0.5), lora_B=rnd(n, r, dt=ad, scale=r ** -0.5),
                  lora_scale=0.75)
        if "dropout" in paths:
            kw.update(lora_dropout=0.3, dropout_seed=int(torch.randint(0, 2**62, (), generator=gen)))
        if "dora" in paths:
            factor = 1 + 0.2 * torch.randn(n, generator=gen, dtype=torch.float64)
            kw["dora_magnitude"] = (kw["weight"].double().norm(dim=1).cpu() * factor).to(device=device, dtype=ad)
    if "ia3_in" in paths:
        kw["ia3_in"] = rnd(k, dt=ad, scale=0.3, shift=1.0)
    if "ia3_out" in paths:
        kw["ia3_out"] = rnd(n, dt=ad, scale=0.3, shift=1.0)
    if "sparse" in paths:
        nnz = max(1, int(density * n * k))
        kw["sparse_index"] = torch.randperm(n * k, generator=gen)[:nnz].sort().values.to(device)
        kw["sparse_value"] = rnd(nnz, dt=ad)
    return x, kw


def _run(fn, x, kw, trainable, grad_y, dtype=None):
    """fn's output and the gradients of ``trainable`` (leaves cast to ``dtype`` when given)."""
    def leaf(name, t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t
        t = t.detach().to(dtype) if dtype is not None else t.detach()
        return t.requires_grad_(name in trainable)

    x_l = leaf("x", x)
    kw_l = {name: leaf(name, v) for name, v in kw.items()}
    y = fn(x_l, **kw_l)
    wanted = [(name, x_l if name == "x" else kw_l[name]) for name in trainable]
    if not wanted or y.numel() == 0:
        return y, {name: None for name, _ in wanted}
    grads = torch.autograd.grad(y, [t for _, t in wanted], grad_y.to(y.dtype))
    return y, {name: g for (name, _), g in zip(wanted, grads)}


def check(x: torch.Tensor, kw: dict, trainable: Sequence[str] = ("x",), *, backend: Optional[str] = None,
          fn=None, tol: Optional[float] = None, generator: Optional[torch.Generator] = None) -> dict:
    """Run ``fn`` (default: ``fastpeft.peft_linear`` on ``backend``) and the float64 reference on the
    same case; assert the output and each gradient in ``trainable`` are within tolerance, that every
    gradient has its leaf's dtype and shape, and return {name: rel_err} ("y" for the output)."""
    import fastpeft

    trainable = tuple(name for name in trainable if name == "x" or kw.get(name) is not None)
    fn = fn or (lambda x_, **kw_: fastpeft.peft_linear(x_, backend=backend, **kw_))
    grad_y = torch.randn(*x.shape[:-1], kw["weight"].shape[0], dtype=torch.float64, generator=generator)
    ref, ref_grads = _run(reference.peft_linear, x, kw, trainable, grad_y, dtype=torch.float64)
    out, grads = _run(fn, x, kw, trainable, grad_y)
    assert out.dtype == x.dtype, f"output dtype {out.dtype}, expected {x.dtype}"
    assert out.shape == ref.shape, f"output shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    bound = tol
    if bound is None:
        bound = tolerance(x.dtype, x.device)
    errors = {"y": rel_err(out, ref)}
    half = x.dtype in (torch.bfloat16, torch.float16) and tol is None
    if half:  # twice what plain PyTorch in this dtype gets on the same case
        plain, plain_grads = _run(reference.peft_linear, x, kw, trainable, grad_y, dtype=x.dtype)
        budget = {"y": rel_err(plain, ref)} | {n: rel_err(g, ref_grads[n]) for n, g in plain_grads.items()
                                                if g is not None}
    for name, g in grads.items():
        leaf = x if name == "x" else kw[name]
        if g is None:
            continue
        assert g.dtype == leaf.dtype, f"grad {name} has dtype {g.dtype}, expected {leaf.dtype}"
        assert g.shape == leaf.shape, f"grad {name} has shape {tuple(g.shape)}, expected {tuple(leaf.shape)}"
        errors[name] = rel_err(g, ref_grads[name])
    for name, err in errors.items():
        limit = min(bound, max(2 * budget[name], HALF_FLOOR)) if half else bound
        assert err < limit, f"{name}: relative error {err:.3g} >= {limit:.3g}"
    return errors
