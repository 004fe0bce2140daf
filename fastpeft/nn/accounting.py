"""Honest parameter accounting for PEFT (DESIGN.md section 5).

"Number of parameters" means different things across PEFT papers.  ``count_parameters`` reports,
for each category (weight, bias, adapter, prompt, scaling, sparse):

- total: parameters of that category in the model;
- trainable: of those, how many the optimizer updates (requires_grad);
- changed: how many numbers of the *pre-trained model* differ because of that category.  For
  LoRA that is nnz(s·BA) (usually every entry of W: few trainable, many changed); for IA3 the
  entries of W its scales touch; for a sparse delta its nonzero values; for weights and biases
  trained in place, the entries that differ from their pre-trained values.  Categories with no
  pre-trained counterpart (prompt, bottleneck adapters) count the entries that differ from their
  initial values when a snapshot exists, else their trainable entries.

and per adapted layer the rank of its weight difference (``report.ranks``).

Baselines for in-place training come from ``pretrained`` (a state_dict or module of the
pre-trained model) when given, else from snapshots fastpeft takes when it makes a pre-trained
parameter trainable (``remember_pretrained``).  Without either, a trainable pre-trained
parameter counts all its entries as changed (an upper bound).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary

CATEGORIES = ("weight", "bias", "adapter", "prompt", "scaling", "sparse")
_ROW_CHUNK = 1024
_SNAPSHOTS = WeakIdKeyDictionary()


def remember_pretrained(param: torch.Tensor) -> None:
    """Keep a copy of a pre-trained parameter's values before it is trained in place."""
    if param not in _SNAPSHOTS:
        _SNAPSHOTS[param] = param.detach().clone()


def category_of(module: nn.Module, param_name: str) -> str:
    """The category of ``module``'s own parameter ``param_name``."""
    table = getattr(module, "PARAM_CATEGORIES", None) or {}
    if param_name in table:
        return table[param_name]
    return "bias" if param_name.endswith("bias") else "weight"


class ParameterReport(dict):
    """{category: {"total", "trainable", "changed"}} with ``.ranks`` and a readable str()."""

    def __init__(self, counts: dict, ranks: dict):
        super().__init__(counts)
        self.ranks = ranks

    def __str__(self) -> str:
        lines = [f"{'category':<10}{'total':>14}{'trainable':>14}{'changed':>14}"]
        for cat in CATEGORIES:
            c = self[cat]
            lines.append(f"{cat:<10}{c['total']:>14,}{c['trainable']:>14,}{c['changed']:>14,}")
        tot = {k: sum(self[c][k] for c in CATEGORIES) for k in ("total", "trainable", "changed")}
        lines.append(f"{'all':<10}{tot['total']:>14,}{tot['trainable']:>14,}{tot['changed']:>14,}")
        if tot["total"]:
            lines.append(f"trainable: {100.0 * tot['trainable'] / tot['total']:.4f}% of all parameters")
        if self.ranks:
            lines.append("rank of the weight difference per adapted layer:")
            width = max(len(n) for n in self.ranks)
            lines += [f"  {name:<{width}}  {rank}" for name, rank in self.ranks.items()]
        return "\n".join(lines)


def _count_changed(param: torch.Tensor, baseline: Optional[torch.Tensor]) -> int:
    if baseline is not None and baseline.shape == param.shape:
        return int((param.detach() != baseline.to(param.device, param.dtype)).sum())
    if param in _SNAPSHOTS:
        return int((param.detach() != _SNAPSHOTS[param]).sum())
    return param.numel() if param.requires_grad else 0


def _lora_changed(layer) -> int:
    a, b = layer.lora_A.detach().float(), layer.lora_B.detach().float()
    return sum(int(torch.count_nonzero(layer.lora_scale * (b[i:i + _ROW_CHUNK] @ a)))
               for i in range(0, b.shape[0], _ROW_CHUNK))


def _ia3_changed(layer) -> int:
    w = layer.weight.detach()
    n, k = w.shape
    s_in = layer.ia3_in.detach().float() if layer.ia3_in is not None else torch.ones(k, device=w.device)
    s_out = layer.ia3_out.detach().float() if layer.ia3_out is not None else torch.ones(n, device=w.device)
    total = 0
    for i in range(0, n, _ROW_CHUNK):
        scale = s_out[i:i + _ROW_CHUNK, None] * s_in[None, :]
        total += int(((scale != 1) & (w[i:i + _ROW_CHUNK] != 0)).sum())
    return total


def _lora_rank(layer) -> int:
    # rank(B A) = rank(R_B R_A^T) with B = Q_B R_B and A^T = Q_A R_A: an r x r problem.
    r_b = torch.linalg.qr(layer.lora_B.detach().double()).R
    r_a = torch.linalg.qr(layer.lora_A.detach().double().t()).R
    return int(torch.linalg.matrix_rank(r_b @ r_a.t()))


def _delta_rank(layer) -> int:
    has_other = layer.ia3_in is not None or layer.ia3_out is not None or layer.sparse_value is not None
    if layer.lora_A is not None and not has_other:
        return _lora_rank(layer)
    if layer.merged:
        layer.unmerge()
        try:
            delta = layer.delta_weight()
        finally:
            layer.merge()
    else:
        delta = layer.delta_weight()
    if not bool(delta.any()):
        return 0
    return int(torch.linalg.matrix_rank(delta))


def _peft_linear_counts(name: str, layer, counts: dict, ranks: Optional[dict], baseline) -> None:
    changed = {"adapter": 0, "scaling": 0, "sparse": 0}
    if layer.lora_A is not None:
        changed["adapter"] = _lora_changed(layer)
    if layer.ia3_in is not None or layer.ia3_out is not None:
        changed["scaling"] = _ia3_changed(layer)
    if layer.sparse_value is not None:
        changed["sparse"] = int(torch.count_nonzero(layer.sparse_value.detach()))
    for cat, value in changed.items():
        counts[cat]["changed"] += value
    for pname in ("weight", "bias"):
        p = getattr(layer, pname)
        if p is not None:
            base = baseline.get(f"{name}.{pname}" if name else pname)
            # A merged layer's weight holds the adapters' effect, already counted above.
            if not (layer.merged and base is None):
                counts[category_of(layer, pname)]["changed"] += _count_changed(p, base)
    if ranks is not None:
        ranks[name] = _delta_rank(layer)


def count_parameters(model: nn.Module, pretrained: Optional[Union[nn.Module, dict]] = None,
                     ranks: bool = True) -> ParameterReport:
    """Parameters of ``model`` by category: total, trainable and changed (see module docstring).

    pretrained: the pre-trained model or its state_dict, to count in-place changes exactly.
    ranks: also compute the rank of each adapted layer's weight difference (an SVD per layer).
    """
    from fastpeft.nn.modules import PEFTLinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    baseline = pretrained.state_dict() if isinstance(pretrained, nn.Module) else dict(pretrained or {})
    counts = {cat: {"total": 0, "trainable": 0, "changed": 0} for cat in CATEGORIES}
    rank_of: dict[str, int] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        own = [(pname, p) for pname, p in module.named_parameters(recurse=False) if id(p) not in seen]
        for pname, p in own:
            seen.add(id(p))
            cat = category_of(module, pname)
            counts[cat]["total"] += p.numel()
            counts[cat]["trainable"] += p.numel() if p.requires_grad else 0
        if isinstance(module, PEFTLinear):
            _peft_linear_counts(name, module, counts, rank_of if ranks else None, baseline)
            continue
        custom = getattr(module, "changed_counts", None)
        if callable(custom):
            for cat, value in custom().items():
                counts[cat]["changed"] += int(value)
            if ranks and callable(getattr(module, "delta_rank", None)):
                rank_of[name] = module.delta_rank()
            continue
        for pname, p in own:
            full = f"{name}.{pname}" if name else pname
            counts[category_of(module, pname)]["changed"] += _count_changed(p, baseline.get(full))
    return ParameterReport(counts, rank_of)
