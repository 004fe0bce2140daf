"""DoRA on the fused op: the row norm without forming B·A, and the scaled output (DESIGN.md, "DoRA").

    y = c ⊙ (x Wᵀ + s·(x̃ Aᵀ) Bᵀ) + bias,   c = m / n,   m = dora_magnitude [N] (trainable)

    n = ‖W + s·B·A‖_row                      (per output row, over K; detached, as in peft)
    n² = ‖W‖²_row + 2s·rowsum((W Aᵀ) ⊙ B) + s²·rowsum((B (A Aᵀ)) ⊙ B)

‖W‖²_row is fixed for a frozen W: it is computed once per weight and recomputed only when the
weight's version counter changes (an in-place update, a merge).  W Aᵀ is an [N, K] × [K, r] product,
r/M of the forward's FLOPs; A Aᵀ is [r, r]; nothing of size [N, K] or [K, K] is allocated.  The
squared norm is clamped at 0 before the square root (cancellation when ΔW ≈ −W can make it
slightly negative), so n ≥ 0; a zero row of the adapted weight gives n = 0, which
``dora_scale`` maps to a scale of 0 (not NaN, unlike peft at step 0).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

_WEIGHT_SQ_NORMS = WeakIdKeyDictionary()  # weight (or the tensor it views) -> (key, ‖W‖²_row in fp32/fp64)
_NORMS = WeakIdKeyDictionary()  # lora_B -> (key of (W, A, B, s) versions and storages, n)


def _accum_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _row_sq_norms(w: Tensor, dtype: torch.dtype) -> Tensor:
    """‖W‖²_row in ``dtype`` with no [N, K] temporary: one reduction, or for a weight narrower than
    ``dtype`` (the reduction would up-cast a copy of W) row blocks of at most 2**20 elements."""
    if w.dtype == dtype:
        return torch.linalg.vector_norm(w, dim=1).square()
    step = max(1, (1 << 20) // max(1, w.shape[1]))
    return torch.cat([torch.linalg.vector_norm(w[i:i + step], dim=1, dtype=dtype) for i in range(0, w.shape[0], step)]
                     or [w.new_zeros(0, dtype=dtype)]).square()


def weight_sq_norms(weight: Tensor) -> Tensor:
    """‖W‖²_row [N] in fp32 (fp64 for a fp64 weight), cached until ``weight`` changes in place
    (or is replaced)."""
    dtype = _accum_dtype(weight)
    # A view (a Conv1D layer's weight.t(), made anew by every forward) is cached on the tensor it
    # views, with its layout in the key: the same view hits, another view of that tensor does not.
    owner = weight if weight._base is None else weight._base
    key = (weight._version, dtype, weight.device, tuple(weight.shape), weight.stride(), weight.storage_offset())
    hit = _WEIGHT_SQ_NORMS.get(owner)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        sq = _row_sq_norms(weight.detach(), dtype)
    _WEIGHT_SQ_NORMS[owner] = (key, sq)
    return sq


def _version_key(*ts: Tensor) -> tuple:
    return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in ts)


def dora_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, lora_scale: float) -> Tensor:
    """n = ‖W + s·B·A‖ per row [N], detached, in fp32 (fp64 for fp64 inputs); no [N, K] transient.

    The adapters are used in the weight's precision (as the op uses them in x's), accumulated in
    fp32.  The result is cached until W, A or B is changed in place (their version counters: an
    optimizer step or a merge) or replaced, so forwards between two steps (evaluation, gradient
    accumulation) compute it once; writing through ``.data`` bypasses the version counter and is
    not seen.  Under torch.compile nothing is cached (the graph recomputes it).
    """
    tracing = torch.compiler.is_compiling()
    if not tracing:
        key = (_version_key(weight, lora_A, lora_B), float(lora_scale))
        hit = _NORMS.get(lora_B)
        if hit is not None and hit[0] == key:
            return hit[1]
    n = _dora_norm(weight, lora_A, lora_B, lora_scale, cache_w=not tracing)
    if not tracing:
        _NORMS[lora_B] = (key, n)
    return n


def _dora_norm(weight, lora_A, lora_B, lora_scale, cache_w: bool) -> Tensor:
    dtype = _accum_dtype(weight)
    with torch.no_grad():
        w = weight.detach()
        a = lora_A.detach().to(w.dtype)
        b = lora_B.detach().to(w.dtype).to(dtype)
        wa = (w @ a.t()).to(dtype)                     # [N, r]
        a_f = a.to(dtype)
        bg = b @ (a_f @ a_f.t())                       # [N, r]
        s = float(lora_scale)
        w_sq = weight_sq_norms(weight) if cache_w else _row_sq_norms(w, dtype)
        sq = w_sq + 2.0 * s * (wa * b).sum(1) + (s * s) * (bg * b).sum(1)
        return sq.clamp_min_(0.0).sqrt_()


def dora_scale(magnitude: Tensor, norm: Tensor) -> Tensor:
    """c = m / n, differentiable in m (n is detached); rows with n = 0 get c = 0."""
    n = norm.to(magnitude.dtype)
    safe = torch.where(n > 0, n, torch.ones_like(n))
    return torch.where(n > 0, magnitude / safe, torch.zeros_like(magnitude))


def dora_linear(op, weight: Tensor, lora_A: Tensor, lora_B: Tensor, lora_scale: float,
                dora_magnitude: Tensor) -> Tensor:
    """y = c ⊙ (x Wᵀ + s·(x̃ Aᵀ) Bᵀ) + bias as ``op``(c): the fused op with its output scale
    ``dora_scale`` = c = m / n (fastpeft.core.spec), applied after the LoRA term joins and before
    the bias.

    One frozen GEMM: the LoRA branch's dropout acts on the LoRA branch only (peft's DoRA also
    feeds the dropped x to the base term, a second GEMM; at p = 0 and in eval both are exactly
    peft's DoRA).  The op keeps u [M, N] (the output before the scale) when c trains and computes
    dc = Σ_rows gy ⊙ u in the pass that reduces the bias gradient; autograd carries dc to m
    (dm = dc / n); the LoRA and dX products read c ⊙ gy.
    """
    n = dora_norm(weight, lora_A, lora_B, lora_scale)
    return op(dora_scale(dora_magnitude, n))


def dense_dora_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, lora_scale: float) -> Tensor:
    """The definition, for tests: ‖W + s·B·A‖_row with B·A formed densely (float64)."""
    w = weight.detach().double() + float(lora_scale) * (lora_B.detach().double() @ lora_A.detach().double())
    return w.norm(dim=1)
