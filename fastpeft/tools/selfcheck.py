"""`fastpeft check`: every available backend against the float64 reference, on this machine.

The cases are the PEFT paths' own (fastpeft.paths: each path's ``bench_cases`` alone, then every
case of every path at once), with the paths' random values (``random_args``); errors are
``rel_err`` = ‖out − ref‖ / ‖ref‖ over the output and every gradient, within the tolerance table of
fastpeft.tools.equivalence (DESIGN.md section 4).

``make_case`` / ``compare`` build and check cases named in the op's own terms ("lora", "dropout",
"ia3_in", "ia3_out", "bias", "sparse") for the op's tests.
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch

from fastpeft import reference
from fastpeft.core.backends import available_backends, resolve
from fastpeft.core.ops import peft_linear
from fastpeft.paths import DISPLAY_ORDER, CaseSettings, bench_cases
from fastpeft.tools import equivalence
from fastpeft.tools.equivalence import rel_err, tolerance

relative_error = rel_err  # the one error measure (fastpeft.tools.equivalence)
SETTINGS = CaseSettings(r=3, alpha=1.5, dropout=0.25, density=0.05)


def cases() -> list[tuple[str, ...]]:
    """The checked cases: each path case alone, then every case of every path that combines with the
    others (``combined_case``; DoRA excludes IA3 and the sparse delta, so it is checked alone) together."""
    alone = [(case,) for case in bench_cases()]
    return alone + [tuple(case for p in DISPLAY_ORDER if p.combined_case for case in p.bench_cases)]


def make_case(paths, m=37, k=45, n=29, r=3, dtype=torch.float32, device="cpu", generator=None):
    """Random inputs for a set of the op's paths (``fastpeft.tools.equivalence.PATHS``) with grads
    enabled: (x, weight, kwargs)."""
    x, kw = equivalence.make_case(paths, m, k, n, r, dtype=dtype, device=device, generator=generator)
    x.requires_grad_()
    for value in kw.values():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value.requires_grad_()
    return x, kw.pop("weight"), kw


def _worst_error(backend: str, x: torch.Tensor, weight: torch.Tensor, kw: dict, g: torch.Generator) -> float:
    """Worst rel_err over the output and every gradient of ``peft_linear`` on ``backend`` vs float64."""
    tensors = {"x": x, "weight": weight, **{k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}}
    y = peft_linear(x, weight, backend=backend, **kw)
    grad = torch.randn(y.shape, generator=g).to(device=y.device, dtype=y.dtype)
    trainable = [name for name, t in tensors.items() if t.requires_grad]
    grads = torch.autograd.grad(y, [tensors[n] for n in trainable], grad)
    ref_t = {name: t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t
             for name, t in tensors.items()}
    ref_kw = {k: ref_t.get(k, v) for k, v in kw.items()}
    y_ref = reference.peft_linear(ref_t["x"], ref_t["weight"], **ref_kw)
    ref_grads = torch.autograd.grad(y_ref, [ref_t[n] for n in trainable], grad.double())
    return max([rel_err(y, y_ref)] + [rel_err(a, b) for a, b in zip(grads, ref_grads)])


def compare(backend: str, paths, dtype=torch.float32, device="cpu", seed: int = 0, **shape) -> float:
    """Worst relative error over the output and every gradient of one ``make_case`` case."""
    g = torch.Generator().manual_seed(seed)
    x, weight, kw = make_case(paths, dtype=dtype, device=device, generator=g, **shape)
    return _worst_error(backend, x, weight, kw, g)


def check_case(backend: str, case: tuple[str, ...], dtype=torch.float32, device="cpu", seed: int = 0,
               m: int = 37, k: int = 45, n: int = 29, settings: CaseSettings = SETTINGS) -> float:
    """Worst relative error of the path cases ``case`` (names from ``bench_cases``) joined in one call."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(n, k, generator=g) * k ** -0.5).to(device=device, dtype=dtype).requires_grad_()
    paths = bench_cases()
    kw: dict = {}
    for name in case:
        kw.update(paths[name].random_args(name, weight.detach(), settings, g))
    for name, value in kw.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            kw[name] = value.to(dtype).requires_grad_()
    if kw.get("lora_dropout"):
        kw["dropout_seed"] = int(torch.randint(0, 2**40, (), generator=g))
    return _worst_error(backend, x, weight, kw, g)


def run_check(backends: Optional[list[str]] = None, device: Optional[str] = None, verbose: bool = True) -> bool:
    """Compare each backend with the reference over every path case; True when all pass."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backends = backends or available_backends()
    ok = True
    if verbose:
        print(f"{'backend':<10}{'dtype':<10}{'paths':<44}{'rel err':>10}  result")
    for backend, dtype, case in itertools.product(backends, (torch.float32, torch.bfloat16), cases()):
        label = "+".join(case) if len(case) == 1 else "all paths"
        try:
            resolve(backend, torch.device(device), dtype)
        except (RuntimeError, TypeError) as exc:
            if verbose:
                print(f"{backend:<10}{str(dtype)[6:]:<10}{label:<44}{'-':>10}  skipped: {exc}")
            continue
        err = check_case(backend, case, dtype=dtype, device=device)
        passed = err < tolerance(dtype, device)
        ok &= passed
        if verbose:
            print(f"{backend:<10}{str(dtype)[6:]:<10}{label:<44}{err:>10.2e}  {'ok' if passed else 'FAIL'}")
    return ok
