"""Selective layer tuning and regularisation toward the pre-trained model.

``select_layers(model, patterns)`` trains exactly the parameters whose qualified name matches a
pattern (``re.search``, so a plain substring works) and freezes the rest.

``delta_penalty(model, kind)`` is a differentiable penalty on how far training has moved the
model from its pre-trained weights, summed over every adapted part:

===================  =====================================================================
part                 what is penalised ("l2": sum of squares, no root, no 1/2; "l1": sum of |.|)
===================  =====================================================================
LoRA (only path)     ΔW = s·BA.  l2 = s²·tr((AAᵀ)(BᵀB)) from two r×r Gram matrices, never
                     forming ΔW; l1 forms s·BA in row chunks (no closed form exists).
IA3 (only path)      ΔW = W·diag(ℓ−1) (inputs) or diag(ℓ−1)·W (outputs):
                     l2 = Σ_k (ℓ_k−1)²·‖W[:,k]‖², l1 = Σ_k |ℓ_k−1|·‖W[:,k]‖₁ (rows for outputs);
                     the column (row) norms of the frozen W are cached.
sparse (only path)   ΔW = S: Σ v² or Σ |v| over its values.
several paths        ΔW = diag(ℓ_out)(W+S)diag(ℓ_in) + s·BA − W, formed in row chunks.
trained in place     parameters that fastpeft made trainable and snapshotted (BitFit biases,
                     ``select_layers``, ``modules_to_save``): p − p₀ against the snapshot.
bottleneck adapter   its up projection (W_up, b_up): the adapter adds exactly
                     up(act(down(h))) to the pre-trained function, zero iff the up projection
                     is zero (it starts there), so that is its distance from the pre-trained model.
===================  =====================================================================

Prompt/prefix embeddings and task heads have no pre-trained counterpart and are not penalised.
Merged fastpeft layers raise (their weight already holds ΔW; unmerge first).
"""
from __future__ import annotations

import re
from typing import Iterable, Union

import torch
import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary

from fastpeft.nn.accounting import _SNAPSHOTS, remember_pretrained

KINDS = ("l2", "l1")
_CHUNK_ELEMENTS = 1 << 22  # dense ΔW is formed at most this many entries at a time
_NORM_CACHE = WeakIdKeyDictionary()  # frozen weight -> {(version, axis, kind): norms}


def _compile(patterns) -> list[re.Pattern]:
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    try:
        patterns = list(patterns)
    except TypeError:
        raise TypeError(f"patterns must be a str or a list of str, got {type(patterns).__name__}") from None
    if not patterns:
        raise ValueError("patterns is empty: give at least one regular expression or substring")
    out = []
    for p in patterns:
        if isinstance(p, re.Pattern):
            out.append(p)
            continue
        if not isinstance(p, str):
            raise TypeError(f"every pattern must be a str, got {type(p).__name__}")
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise ValueError(f"pattern {p!r} is not a valid regular expression: {exc}") from None
    return out


def select_layers(model: nn.Module, patterns: Union[str, Iterable[str]]) -> nn.Module:
    """Train only the parameters whose qualified name matches a pattern; freeze the rest.

    Args:
        model: any nn.Module.
        patterns: a regular expression or a list of them, matched with ``re.search`` against
            names from ``model.named_parameters()`` (so "encoder.layer.5." or r"layer\\.(4|5)\\."
            select layers, "bias" every bias).

    Returns the model.  Raises ValueError when no parameter matches.  Call it before training:
    the selected parameters are snapshotted (once) so ``count_parameters`` and ``delta_penalty``
    know their pre-trained values.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    regexes = _compile(patterns)
    named = list(model.named_parameters())
    chosen = {name for name, _ in named if any(r.search(name) for r in regexes)}
    if not chosen:
        sample = [n for n, _ in named[:6]]
        raise ValueError(f"no parameter name matches {[r.pattern for r in regexes]} (names look like {sample})")
    for name, p in named:
        if name in chosen:
            remember_pretrained(p)  # first call wins: the values before any training
            p.requires_grad_(True)
        else:
            p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- delta penalty
def _measure(t: torch.Tensor, kind: str) -> torch.Tensor:
    return t.square().sum() if kind == "l2" else t.abs().sum()


def _work_dtype(*ts) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _weight_norms(weight: torch.Tensor, axis: int, kind: str, dtype) -> torch.Tensor:
    """Σ_n W[n,k]² (axis 0) or Σ_k W[n,k]² (axis 1), |.| for l1; cached while W is unchanged."""
    cache = _NORM_CACHE.get(weight)
    if cache is None:
        cache = _NORM_CACHE[weight] = {}
    key = (weight._version, axis, kind, dtype)
    if key not in cache:
        cache.clear()
        with torch.no_grad():
            w = weight.detach().to(dtype)
            cache[key] = (w.square() if kind == "l2" else w.abs()).sum(axis)
    return cache[key]


def _lora_l2(layer, dtype) -> torch.Tensor:
    # ‖s·BA‖²_F = s²·tr(AᵀBᵀBA) = s²·tr((AAᵀ)(BᵀB)) = s²·Σ_ij (AAᵀ)_ij (BᵀB)_ij
    a, b = layer.lora_A.to(dtype), layer.lora_B.to(dtype)
    return layer.lora_scale ** 2 * ((a @ a.t()) * (b.t() @ b)).sum()


def _dense_rows(layer, rows: slice, dtype) -> torch.Tensor:
    """ΔW[rows] = diag(ℓ_out)(W+S)diag(ℓ_in) + s·BA − W for a block of rows, differentiable in the adapters."""
    n, k = layer.weight.shape
    w = layer.weight.detach()[rows].to(dtype)
    eff = w
    if layer.sparse_value is not None:
        idx = layer.sparse_index
        lo, hi = torch.searchsorted(idx, torch.tensor([rows.start * k, rows.stop * k], device=idx.device)).tolist()
        flat = torch.zeros((rows.stop - rows.start) * k, dtype=dtype, device=w.device)
        flat = flat.index_put((idx[lo:hi] - rows.start * k,), layer.sparse_value[lo:hi].to(dtype))
        eff = eff + flat.view(-1, k)
    if layer.ia3_in is not None:
        eff = eff * layer.ia3_in.to(dtype)[None, :]
    if layer.ia3_out is not None:
        eff = eff * layer.ia3_out[rows].to(dtype)[:, None]
    if layer.lora_A is not None:
        eff = eff + layer.lora_scale * (layer.lora_B[rows].to(dtype) @ layer.lora_A.to(dtype))
    return eff - w


def _peft_linear_penalty(name: str, layer, kind: str) -> torch.Tensor:
    if layer.merged:
        raise RuntimeError(f"layer {name!r} is merged: its weight already holds ΔW; unmerge it before delta_penalty")
    paths = [p for p in ("lora", "ia3_in", "ia3_out", "sparse") if {
        "lora": layer.lora_A, "ia3_in": layer.ia3_in, "ia3_out": layer.ia3_out, "sparse": layer.sparse_value}[p]
        is not None]
    dtype = _work_dtype(layer.weight, layer.lora_A, layer.ia3_in, layer.ia3_out, layer.sparse_value)
    if not paths:
        return torch.zeros((), dtype=dtype, device=layer.weight.device)
    if paths == ["lora"] and kind == "l2":
        return _lora_l2(layer, dtype)
    if paths == ["ia3_in"]:
        return ((layer.ia3_in.to(dtype) - 1).square() if kind == "l2" else (layer.ia3_in.to(dtype) - 1).abs()).mul(
            _weight_norms(layer.weight, 0, kind, dtype)).sum()
    if paths == ["ia3_out"]:
        return ((layer.ia3_out.to(dtype) - 1).square() if kind == "l2" else (layer.ia3_out.to(dtype) - 1).abs()).mul(
            _weight_norms(layer.weight, 1, kind, dtype)).sum()
    if paths == ["sparse"]:
        return _measure(layer.sparse_value.to(dtype), kind)
    n, k = layer.weight.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, k))
    return sum(_measure(_dense_rows(layer, slice(i, min(n, i + step)), dtype), kind) for i in range(0, n, step))


def delta_penalty(model: nn.Module, kind: str = "l2") -> torch.Tensor:
    """Differentiable distance of ``model`` from its pre-trained weights (see the module docstring).

    kind: "l2" sums squared entries of every ΔW (Σ‖ΔW‖²_F, no square root, no ½), "l1" sums
    absolute values (Σ‖ΔW‖₁).  Returns a 0-d tensor (float32, or float64 if the adapters are);
    zero when the model has nothing adapted.  Typical use: ``loss = task_loss + λ·delta_penalty(model)``.
    """
    from fastpeft.methods.adapters import BottleneckAdapter
    from fastpeft.nn.modules import PEFTLinear

    if kind not in KINDS:
        raise ValueError(f"kind must be 'l2' or 'l1', got {kind!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    terms = []
    handled: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, PEFTLinear):
            terms.append(_peft_linear_penalty(name, module, kind))
            bias = module.bias
            if bias is not None and bias.requires_grad and bias not in _SNAPSHOTS:
                # BitFit on a layer that had no bias: fastpeft added a zero bias, so Δb = b
                terms.append(_measure(bias.to(_work_dtype(bias)), kind))
                handled.add(id(bias))
            handled.update(id(p) for p in (module.lora_A, module.lora_B, module.ia3_in, module.ia3_out,
                                           module.sparse_value) if p is not None)
        elif isinstance(module, BottleneckAdapter):
            handled.update(id(p) for p in module.parameters(recurse=False))
            for p in (module.up_weight, module.up_bias):
                if p is not None:
                    terms.append(_measure(p.to(_work_dtype(p)), kind))
        elif getattr(module, "PARAM_CATEGORIES", None) and "prompt" in module.PARAM_CATEGORIES.values():
            handled.update(id(p) for p in module.parameters(recurse=False))
    for p in model.parameters():
        if id(p) in handled or not p.requires_grad or p not in _SNAPSHOTS:
            continue
        handled.add(id(p))
        base = _SNAPSHOTS[p]
        dtype = _work_dtype(p)
        terms.append(_measure(p.to(dtype) - base.to(p.device, dtype), kind))
    if not terms:
        ref = next(iter(model.parameters()), None)
        return torch.zeros((), device=ref.device if ref is not None else None)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in terms) else torch.float32
    return torch.stack([t.to(dtype) for t in terms]).sum()
