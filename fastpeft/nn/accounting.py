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

and per adapted layer the rank of its weight difference (``report.ranks``).  What each PEFT path
changes, and the closed forms used when it is a layer's only path (the rank of s·BA from r x r
factors), come from the path objects (fastpeft.paths: ``changed``, ``rank_alone``, ``invert``).

Baselines for in-place training come from ``pretrained`` (a state_dict or module of the
pre-trained model) when given, else from snapshots fastpeft takes when it makes a pre-trained
parameter trainable (``remember_pretrained``, fastpeft.nn.pretrained).  Without either, a trainable pre-trained
parameter counts all its entries as changed (an upper bound).

Accounting only reads: it never modifies the model (no merge/unmerge round trip, no flag
flipped, no bit of any tensor changed) and does not raise on a valid model.  A merged layer is
undone out of place in float64 (its rounding is allowed for when comparing with the baseline).
Values equal within that rounding count as unchanged.  Where a merged IA3 scale is exactly 0,
merge() erased the pre-trained entries: they count as changed (upper bound), and the layer's
rank is taken from ``pretrained`` when given, else reported as None with a warning (also None,
with a warning, for a non-finite difference).  On the meta device (no values) totals and
trainable counts are exact, "changed" is an upper bound and ranks are None.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Optional, Union

import torch
import torch.nn as nn

from fastpeft.nn.modules import PEFTLinear
from fastpeft.nn.pretrained import initial_values
from fastpeft.paths import Rounding, merged_rows, weight_paths
from fastpeft.paths.base import finite_rank

CATEGORIES = ("weight", "bias", "adapter", "prompt", "scaling", "sparse")


def category_of(module: nn.Module, param_name: str) -> str:
    """The category of ``module``'s own parameter ``param_name``."""
    table = getattr(module, "PARAM_CATEGORIES", None) or {}
    if param_name in table:
        return table[param_name]
    return "bias" if param_name.endswith("bias") else "weight"


class ParameterReport(dict):
    """{category: {"total", "trainable", "changed"}} with ``.ranks`` (name -> int, or None when
    unknown) and a readable str()."""

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
            lines += [f"  {name:<{width}}  {'unknown' if rank is None else rank}" for name, rank in self.ranks.items()]
        return "\n".join(lines)


class _Unmerged:
    """The pre-trained weight and bias of a PEFTLinear, worked out without touching the layer.

    Unmerged layer: the tensors themselves (exact).  Merged layer: undo merge() out of place in
    float64, every path's ``invert`` in reverse PATHS order, W = (W' - s·B·A) / (ia3_out ⊗ ia3_in) - S
    and b = b' / ia3_out, with a per-entry rounding bound ``tol`` (the merged weight was rounded to
    its dtype).  Entries whose IA3 scale is exactly 0 were erased by merge(): ``known`` is False
    there (no division by zero, ever).
    """

    def __init__(self, layer):
        w = layer.weight_nk  # [N, K] (for a transposed Conv1D base: a view of its [K, N] storage)
        w = w.detach() if isinstance(w, torch.Tensor) else w.dequantize()  # a quantized base: its values
        b = layer.bias.detach() if layer.bias is not None else None
        if not layer.merged:
            self.weight, self.bias, self.w_tol, self.b_tol = w, b, None, None
            self.w_known = self.b_known = None  # everything known exactly
            return
        eps = torch.finfo(w.dtype).eps if w.dtype.is_floating_point else 0.0
        ww = w.double()
        bound = Rounding(ww)
        for path in reversed(weight_paths(layer)):
            ww = path.invert(layer, ww, bound)
        self.weight, self.w_tol, self.w_known = ww, 8 * eps * bound.err, bound.known
        self.bias, self.b_known, self.b_tol = b, None, None
        scales = [s.detach().double() for s in (p.bias_scale(layer) for p in weight_paths(layer)) if s is not None]
        if b is not None and scales:
            s_out = torch.stack(scales).prod(0)
            known = s_out != 0
            bb = torch.where(known, b.double() / torch.where(known, s_out, torch.ones_like(s_out)),
                             torch.zeros_like(s_out))
            self.bias, self.b_known, self.b_tol = bb, known, 8 * eps * bb.abs()


def _stored(layer, *ts) -> tuple:
    """[N, K] tensors (None passes) in the layout the layer stores its weight in ([K, N] for fan_in_fan_out)."""
    return tuple(t.t() if t is not None and layer.fan_in_fan_out else t for t in ts)


def _reference_of(param: torch.Tensor, baseline: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The pre-trained values of ``param``: the user's baseline, else fastpeft's snapshot, else None."""
    if baseline is not None and baseline.shape == param.shape:
        return baseline
    return initial_values(param)


def _count_changed(param: torch.Tensor, baseline: Optional[torch.Tensor], unmerged=None) -> int:
    """Entries of ``param`` that differ from its pre-trained values.

    unmerged: for a merged layer's weight/bias, a callable giving (values, known, tol): the unmerged
    values to compare instead, which entries are known, and their rounding bound.  Entries that
    cannot be known count as changed when the parameter trains (upper bound).
    """
    ref = _reference_of(param, baseline)
    if ref is None or param.is_meta or ref.is_meta:  # nothing to compare with (meta: no values)
        return param.numel() if param.requires_grad else 0
    if unmerged is None:
        return int((param.detach() != ref.to(param.device, param.dtype)).sum())
    cur, known, tol = unmerged()
    ref = ref.to(cur.device, cur.dtype)
    differ = ~((cur - ref).abs() <= tol) if tol is not None else cur != ref  # NaN counts as changed
    if known is None:
        return int(differ.sum())
    unknown = int((~known).sum()) if param.requires_grad else 0
    return int((differ & known).sum()) + unknown


def _delta_rank(name: str, layer, unmerged, baseline: Optional[torch.Tensor]) -> Optional[int]:
    """Rank of the layer's weight difference, never modifying the layer; None when it cannot be known."""
    paths = weight_paths(layer)
    rank = paths[0].rank_alone(layer) if len(paths) == 1 else NotImplemented
    if rank is not NotImplemented:
        pass
    elif not layer.merged:
        rank = finite_rank(layer.delta_weight())
    else:
        pre = unmerged()
        w0 = pre.weight
        if pre.w_known is not None and not bool(pre.w_known.all()):
            ref = _reference_of(layer.weight, baseline)
            ref = ref.t() if ref is not None and layer.fan_in_fan_out else ref  # stored [K, N]: as pre.weight
            if ref is None:
                warnings.warn(f"count_parameters: the rank of {name or 'the layer'}'s weight difference is unknown "
                              "(merged with IA3 scales equal to 0, which erased pre-trained entries); pass "
                              "pretrained= to count it", stacklevel=4)
                return None
            w0 = torch.where(pre.w_known, w0, ref.to(w0.device, w0.dtype))
        w0 = w0.float()
        rows = slice(0, layer.out_features)
        rank = finite_rank(merged_rows(layer, w0.clone(), rows, inplace=True) - w0)  # w0 is our own copy
    if rank is None:
        warnings.warn(f"count_parameters: {name or 'the layer'}'s weight difference has non-finite entries; "
                      "its rank is reported as None", stacklevel=4)
    return rank


def _peft_linear_counts(name: str, layer, counts: dict, ranks: Optional[dict], baseline: dict,
                        own: set) -> None:
    """Changed counts (and rank) of a PEFTLinear; ``own``: its parameter names not counted elsewhere."""
    if any(t.is_meta for t in layer.parameters()):  # upper bounds: no values to look at
        for path in weight_paths(layer):
            counts[path.category]["changed"] += path.max_changed(layer)
        for pname in ("weight", "bias"):
            p = getattr(layer, pname)
            if p is not None and pname in own:
                counts[category_of(layer, pname)]["changed"] += _count_changed(p, None)
        if ranks is not None:
            ranks[name] = None
        return
    cache: list = []

    def pre() -> _Unmerged:  # built only when needed (float64 copies of a merged layer)
        if not cache:
            cache.append(_Unmerged(layer))
        return cache[0]

    for path in weight_paths(layer):
        counts[path.category]["changed"] += path.changed(layer, pre)
    # weight and bias: in-place changes only (a merged layer's adapter effect is counted above)
    merged = layer.merged
    base_w = baseline.get(f"{name}.weight" if name else "weight")
    if "weight" in own:  # a weight tied to an earlier module was counted there
        counts[category_of(layer, "weight")]["changed"] += _count_changed(
            layer.weight, base_w,
            (lambda: _stored(layer, pre().weight, pre().w_known, pre().w_tol)) if merged else None)
    if layer.bias is not None and "bias" in own:
        base_b = baseline.get(f"{name}.bias" if name else "bias")
        counts[category_of(layer, "bias")]["changed"] += _count_changed(
            layer.bias, base_b, (lambda: (pre().bias, pre().b_known, pre().b_tol)) if merged else None)
    if ranks is not None:
        ranks[name] = _delta_rank(name, layer, pre, base_w)


def count_parameters(model: nn.Module, pretrained: Optional[Union[nn.Module, dict]] = None,
                     ranks: bool = True) -> ParameterReport:
    """Parameters of ``model`` by category: total, trainable and changed (see module docstring).

    pretrained: the pre-trained model or its state_dict, to count in-place changes exactly.
    ranks: also compute the rank of each adapted layer's weight difference (an SVD per layer);
        a rank that cannot be known (see the module docstring) is None.
    The model is only read, never modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if pretrained is not None and not isinstance(pretrained, (nn.Module, Mapping)):
        raise TypeError("pretrained must be an nn.Module, a state_dict (dict) or None, "
                        f"got {type(pretrained).__name__}")
    if not isinstance(ranks, bool):
        raise TypeError(f"ranks must be a bool, got {type(ranks).__name__}")
    baseline = pretrained.state_dict() if isinstance(pretrained, nn.Module) else dict(pretrained or {})
    if any(p.is_meta for p in model.parameters()):
        warnings.warn("count_parameters: parameters on the meta device have no values: their 'changed' counts are "
                      "upper bounds and their ranks are None", stacklevel=2)
    counts = {cat: {"total": 0, "trainable": 0, "changed": 0} for cat in CATEGORIES}
    rank_of: dict[str, Optional[int]] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        own = [(pname, p) for pname, p in module.named_parameters(recurse=False) if id(p) not in seen]
        for pname, p in own:
            seen.add(id(p))
            cat = category_of(module, pname)
            counts[cat]["total"] += p.numel()
            counts[cat]["trainable"] += p.numel() if p.requires_grad else 0
        if isinstance(module, PEFTLinear):
            with torch.no_grad():
                _peft_linear_counts(name, module, counts, rank_of if ranks else None, baseline, {n for n, _ in own})
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
