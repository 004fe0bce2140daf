"""IA3: trainable scales of a layer's inputs and/or outputs.

    y = ((x ⊙ ℓ_in) Wᵀ + b) ⊙ ℓ_out        ℓ_in = ia3_in [K], ℓ_out = ia3_out [N], both start at 1
    merged: W' = diag(ℓ_out) W diag(ℓ_in),   b' = b ⊙ ℓ_out

Unmerge divides by the scales: near zero (|ℓ| < 1e-4) the restored weight is unreliable (a
warning says so).  Closed forms when it is a layer's only weight path, one vector:
ΔW = W·diag(ℓ−1) (inputs) or diag(ℓ−1)·W (outputs), so ‖ΔW‖² = Σ_k (ℓ_k−1)²·‖W[:,k]‖² and
‖ΔW‖₁ = Σ_k |ℓ_k−1|·‖W[:,k]‖₁ (rows for outputs), with the frozen W's norms cached.

peft mapping (peft 0.21): ``ia3.Linear`` with ``ia3_l[a]`` [1, K] on feed-forward layers
(``feedforward_modules``: input scales) and [N, 1] on the others (output scales); checkpoint key
``<path>.ia3_l``; config ``target_modules``, ``feedforward_modules``.
"""
from __future__ import annotations

import re
import warnings
from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from fastpeft.paths.base import ROW_CHUNK, Path, check_addable, new_param, random_tensor

POSITIONS = ("in", "out", "both")
# |scale| below this makes unmerge divide by (nearly) zero: the restored weight is unreliable.
UNMERGE_EPS = 1e-4
_NORM_CACHE = WeakIdKeyDictionary()  # frozen weight -> {(version, axis, kind, dtype): norms}


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


def _is_feedforward(path: str, feedforward) -> bool:
    # peft's IA3Model._check_target_module_feedforward: a regex must match the whole path, a list
    # entry only has to end it (no "." boundary).
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, path) is not None
    return any(path.endswith(t) for t in feedforward)


class IA3Path(Path):
    name = "ia3"
    label = "IA3"
    tensors = ("ia3_in", "ia3_out")
    categories = {"ia3_in": "scaling", "ia3_out": "scaling"}
    category = "scaling"
    bench_cases = {"ia3_in": "IA3 in", "ia3_out": "IA3 out"}
    combined_case = "ia3_out"
    peft_type = "IA3"
    peft_tuner = "ia3"
    peft_adapters = "ia3_l"
    peft_fields = ("target_modules", "feedforward_modules", "init_ia3_weights")
    peft_names = ("ia3_",)

    def method_names(self, layer) -> list[str]:
        return [t for t in self.tensors if getattr(layer, t) is not None]

    linear_keywords = ("ia3",)
    example = {"ia3": "both"}

    def linear_options(self, kw: dict) -> Optional[dict]:
        return None if kw["ia3"] is None else {"position": kw["ia3"]}

    def parts(self, layer, position: str = "out") -> dict:
        check_addable(layer, self, "add IA3")
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {position!r}")
        parts = {}
        if position in ("in", "both"):
            if layer.ia3_in is not None:
                raise ValueError("this layer already has an input IA3 vector")
            parts["ia3_in"] = new_param(layer, torch.ones(layer.in_features))
        if position in ("out", "both"):
            if layer.ia3_out is not None:
                raise ValueError("this layer already has an output IA3 vector")
            parts["ia3_out"] = new_param(layer, torch.ones(layer.out_features))
        return parts

    def adopt(self, layer, ia3_in: Optional[torch.Tensor] = None, ia3_out: Optional[torch.Tensor] = None) -> dict:
        check_addable(layer, self, "add IA3")
        parts = {}
        for name, vec in (("ia3_in", ia3_in), ("ia3_out", ia3_out)):
            if vec is None:
                continue
            shape = (layer.in_features,) if name == "ia3_in" else (layer.out_features,)
            if tuple(vec.shape) != shape:
                raise ValueError(f"{name} must be {list(shape)}, got {list(vec.shape)}")
            parts[name] = vec
        return parts

    def layout(self, layer, tensor: str, value) -> tuple:
        return (value.numel(),)  # peft's [1, K] / [N, 1] -> [K] / [N]

    # ------------------------------------------------------------------ the merged weight: diag(ℓ_out) W diag(ℓ_in)
    def apply(self, layer, w, rows, inplace=False):
        if layer.ia3_in is not None:
            s = layer.ia3_in.to(w.dtype)[None, :]
            w = w.mul_(s) if inplace else w * s
        if layer.ia3_out is not None:
            s = layer.ia3_out[rows].to(w.dtype)[:, None]
            w = w.mul_(s) if inplace else w * s
        return w

    def invert(self, layer, w, bound=None):
        if bound is None:  # unmerge, in place
            for name, vec, dim in (("ia3_out", layer.ia3_out, 1), ("ia3_in", layer.ia3_in, 0)):
                if vec is None:
                    continue
                vec = vec.detach().to(w.dtype)
                if bool((vec.abs() < UNMERGE_EPS).any()):
                    warnings.warn(f"{name} has scales near zero (|s| < {UNMERGE_EPS}); the unmerged weight is not "
                                  "reliable", stacklevel=3)
                w.div_(vec[:, None] if dim == 1 else vec[None, :])
            return w
        n, k = w.shape
        s_out = layer.ia3_out.detach().to(w.dtype) if layer.ia3_out is not None else w.new_ones(n)
        s_in = layer.ia3_in.detach().to(w.dtype) if layer.ia3_in is not None else w.new_ones(k)
        scale = s_out[:, None] * s_in[None, :]
        known = scale != 0  # a zero scale erased the pre-trained entry: never divide by it
        bound.forget(known)
        safe = torch.where(known, scale, torch.ones_like(scale))
        bound.err = bound.err / safe.abs()
        return torch.where(known, w / safe, torch.zeros_like(w))

    def bias_scale(self, layer) -> Optional[torch.Tensor]:
        return layer.ia3_out

    # ------------------------------------------------------------------ accounting and penalty
    def changed(self, layer, pre) -> int:
        """Entries of the pre-trained W the scales change: scale != 1 and W != 0.

        In a merged layer, an entry a zero scale erased, or one whose reconstruction is not exactly
        0, counts as nonzero (upper bound)."""
        pre = pre()
        w = pre.weight
        n, k = w.shape
        s_in = layer.ia3_in.detach().float() if layer.ia3_in is not None else torch.ones(k, device=w.device)
        s_out = layer.ia3_out.detach().float() if layer.ia3_out is not None else torch.ones(n, device=w.device)
        total = 0
        for i in range(0, n, ROW_CHUNK):
            rows = slice(i, i + ROW_CHUNK)
            scale = s_out[rows, None] * s_in[None, :]
            nonzero = w[rows] != 0
            if pre.w_tol is not None:  # merged: zero only when the reconstruction is exactly 0 (upper bound)
                nonzero = nonzero | (pre.w_tol[rows] > 0)
            if pre.w_known is not None:
                nonzero = nonzero | ~pre.w_known[rows]
            total += int(((scale != 1) & nonzero).sum())
        return total

    def max_changed(self, layer) -> int:
        return layer.out_features * layer.in_features

    def penalty_alone(self, layer, kind, dtype):
        if (layer.ia3_in is None) == (layer.ia3_out is None):
            return NotImplemented  # both vectors: formed in row chunks
        vec, axis = (layer.ia3_in, 0) if layer.ia3_in is not None else (layer.ia3_out, 1)
        d = vec.to(dtype) - 1
        return (d.square() if kind == "l2" else d.abs()).mul(_weight_norms(layer.weight_nk, axis, kind, dtype)).sum()

    # ------------------------------------------------------------------ cases
    def random_args(self, case, weight, settings, gen) -> dict:
        n, k = weight.shape
        return {case: random_tensor(weight, gen, k if case == "ia3_in" else n, scale=0.1, shift=1.0)}

    def peft_twin(self, case, weight, args, settings, wrap, target):
        import peft

        feedforward = case == "ia3_in"  # peft: feed-forward layers scale their inputs
        layer = wrap(peft.IA3Config(target_modules=[target], feedforward_modules=[target] if feedforward else []))
        with torch.no_grad():
            layer.ia3_l["default"].copy_(args[case].view_as(layer.ia3_l["default"]))
        return layer, {case: layer.ia3_l["default"]}, True

    # ------------------------------------------------------------------ peft mapping
    def peft_tensors(self, name, layer, prepare=lambda t: t) -> dict:
        if layer.ia3_in is not None and layer.ia3_out is not None:
            raise ValueError(f"{name}: IA3 on both inputs and outputs of one layer has no peft format")
        if layer.ia3_in is not None:
            return {f"{name}.ia3_l": prepare(layer.ia3_in).reshape(1, -1)}
        return {f"{name}.ia3_l": prepare(layer.ia3_out).reshape(-1, 1)}

    def peft_config(self, layers) -> dict:
        return {"peft_type": "IA3", "target_modules": [n for n, _ in layers],
                "feedforward_modules": [n for n, m in layers if m.ia3_in is not None],
                "fan_in_fan_out": False, "init_ia3_weights": True}

    def peft_split(self, key: str) -> Optional[tuple[str, str]]:
        return (key[:-len(".ia3_l")], "ia3_l") if key.endswith(".ia3_l") else None

    def peft_reject(self, key: str) -> None:
        raise ValueError(f"checkpoint key {key!r} is not an IA3 tensor fastpeft understands")

    def peft_read(self, config, path, tensors, module):
        value = tensors["ia3_l"]
        # peft: feed-forward layers hold [1, K] (input scales), the others [N, 1] (output scales).
        position = "in" if _is_feedforward(path, config.get("feedforward_modules") or []) else "out"
        expected = (1, module.in_features) if position == "in" else (module.out_features, 1)
        if tuple(value.shape) != expected:
            raise ValueError(f"{path}.ia3_l: IA3 on the {position}puts of a [{module.out_features}, "
                             f"{module.in_features}] layer must be {list(expected)}, the checkpoint has "
                             f"{list(value.shape)}")
        return {f"ia3_{position}": value.reshape(-1)}, {}, None

    def from_peft_layer(self, name, layer, adapter, config) -> tuple[dict, dict]:
        # peft keeps [1, K] / [N, 1]; from_peft reshapes the same Parameter to [K] / [N].
        return {"ia3_in" if layer.is_feedforward else "ia3_out": layer.ia3_l[adapter]}, {}


IA3 = IA3Path()
