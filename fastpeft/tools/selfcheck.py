"""`fastpeft check`: every available backend against the float64 reference, on this machine."""
from __future__ import annotations

import itertools
from typing import Optional

import torch

from fastpeft import reference
from fastpeft.core.backends import available_backends, resolve
from fastpeft.core.ops import peft_linear

# DESIGN.md section 4: ||out - ref|| / ||ref|| against float64 (fp32 on a GPU may use tf32 dots).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-10}
TF32_TOLERANCE = 1e-3


def tolerance(dtype: torch.dtype, device: str) -> float:
    return TF32_TOLERANCE if dtype == torch.float32 and str(device).startswith("cuda") else TOLERANCE[dtype]
PATHS = ("lora", "dropout", "ia3_in", "ia3_out", "bias", "sparse")
CASES = [("lora",), ("lora", "dropout"), ("ia3_in",), ("ia3_out",), ("bias",), ("sparse",), PATHS]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    denom = ref.norm().item()
    err = (out.double() - ref).norm().item()
    return err / denom if denom > 0 else err


def make_case(paths, m=37, k=45, n=29, r=3, dtype=torch.float32, device="cpu", generator=None):
    """Random inputs for a set of paths; returns (x, weight, kwargs) with grads enabled."""
    g = generator
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()
    x = rnd(m, k)
    weight = rnd(n, k, scale=k ** -0.5)
    kw = {}
    if "bias" in paths:
        kw["bias"] = rnd(n)
    if "lora" in paths:
        kw.update(lora_A=rnd(r, k, scale=k ** -0.5), lora_B=rnd(n, r), lora_scale=0.5)
        if "dropout" in paths:
            kw.update(lora_dropout=0.25, dropout_seed=int(torch.randint(0, 2**40, (), generator=g)))
    if "ia3_in" in paths:
        kw["ia3_in"] = (1 + 0.3 * torch.randn(k, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    if "ia3_out" in paths:
        kw["ia3_out"] = (1 + 0.3 * torch.randn(n, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    if "sparse" in paths:
        nnz = max(1, n * k // 20)
        kw["sparse_index"] = torch.randperm(n * k, generator=g)[:nnz].sort().values.to(device)
        kw["sparse_value"] = rnd(nnz, scale=0.1)
    return x, weight, kw


def compare(backend: str, paths, dtype=torch.float32, device="cpu", seed: int = 0, **shape) -> float:
    """Worst relative error over the output and every gradient of one case."""
    g = torch.Generator().manual_seed(seed)
    x, weight, kw = make_case(paths, dtype=dtype, device=device, generator=g, **shape)
    tensors = {"x": x, "weight": weight, **{k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}}
    y = peft_linear(x, weight, backend=backend, **kw)
    grad = torch.randn(y.shape, generator=g).to(device=device, dtype=dtype)
    trainable = [name for name, t in tensors.items() if t.requires_grad]
    grads = torch.autograd.grad(y, [tensors[n] for n in trainable], grad)
    ref_t = {name: t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t
             for name, t in tensors.items()}
    ref_kw = {k: ref_t.get(k, v) for k, v in kw.items()}
    y_ref = reference.peft_linear(ref_t["x"], ref_t["weight"], **ref_kw)
    ref_grads = torch.autograd.grad(y_ref, [ref_t[n] for n in trainable], grad.double())
    errors = [relative_error(y, y_ref)] + [relative_error(a, b) for a, b in zip(grads, ref_grads)]
    return max(errors)


def run_check(backends: Optional[list[str]] = None, device: Optional[str] = None, verbose: bool = True) -> bool:
    """Compare each backend with the reference over every path combination; True when all pass."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backends = backends or available_backends()
    ok = True
    if verbose:
        print(f"{'backend':<10}{'dtype':<10}{'paths':<44}{'rel err':>10}  result")
    for backend, dtype, paths in itertools.product(backends, (torch.float32, torch.bfloat16), CASES):
        try:
            resolve(backend, torch.device(device), dtype)
        except (RuntimeError, TypeError) as exc:
            if verbose:
                print(f"{backend:<10}{str(dtype)[6:]:<10}{'+'.join(paths):<44}{'-':>10}  skipped: {exc}")
            continue
        err = compare(backend, paths, dtype=dtype, device=device)
        passed = err < tolerance(dtype, device)
        ok &= passed
        if verbose:
            print(f"{backend:<10}{str(dtype)[6:]:<10}{'+'.join(paths):<44}{err:>10.2e}  {'ok' if passed else 'FAIL'}")
    return ok
