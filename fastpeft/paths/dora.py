"""DoRA: LoRA's update with a trainable per-row magnitude (weight-decomposed low-rank adaptation).

    n = ‖W + s·B·A‖_row  (over K, detached)     c = m / n  (c = 0 where n = 0)
    y = c ⊙ (x Wᵀ + s·(dropout_p(x) Aᵀ) Bᵀ) + bias           m = dora_magnitude [N]
    merged (after LoRA's part): W' = c ⊙ (W + s·B·A) per row;  the bias is not scaled

It extends the LoRA path (a layer needs LoRA for it) and is not combined with IA3 or a sparse
delta on one layer.  Init: m = ‖W‖_row in the adapter dtype, which with B = 0 equals n, so a new
layer computes the frozen one.  ``apply`` gets whole rows (W + s·B·A), so the norm is computed
there (detached); ``merge`` stores c (``_dora_scale``) for ``unmerge`` to divide by (rows with
c = 0 were erased: unmerge warns and leaves them 0).  No closed forms: ΔW is formed in row chunks.

Dropout: fastpeft feeds the dropped x to the LoRA branch only (one frozen GEMM); peft also uses it
in the base term (a second GEMM), so training-mode outputs with dropout > 0 differ from peft's (in
eval and at p = 0 they are the same).

peft mapping (peft 0.21): ``lora.Linear`` with ``use_dora[a]`` and
``lora_magnitude_vector[a].weight`` [N] (variant ``DoraLinearVariant``); checkpoint key
``<path>.lora_magnitude_vector``; config ``"use_dora": true``.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn

from fastpeft.paths.base import ROW_CHUNK, Path, adapter_dtype, check_addable, new_param, random_tensor
from fastpeft.paths.lora import LORA

DROPOUT_WARNING = ("from_peft: DoRA with lora_dropout > 0: fastpeft feeds the dropped x to the LoRA branch only (one "
                   "frozen GEMM) while peft also uses it in the base term (a second GEMM), so training-mode outputs "
                   "differ from peft's (eval and p = 0 match)")


def _scale(magnitude: torch.Tensor, rows_w: torch.Tensor) -> torch.Tensor:
    """c = m / ‖rows_w‖_row, 0 where the norm is 0 (in rows_w's dtype)."""
    n = torch.linalg.vector_norm(rows_w, dim=1)
    m = magnitude.to(rows_w.dtype)
    return torch.where(n > 0, m / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(n))


class DoRAPath(Path):
    name = "dora"
    label = "DoRA"
    tensors = ("dora_magnitude",)
    categories = {"dora_magnitude": "scaling"}
    category = "scaling"
    attrs = {"_dora_scale": None}  # c stored by merge, for unmerge
    excludes = ("ia3", "sparse")   # not combined on one layer
    requires = ("lora",)
    peft_type = "LORA"
    peft_tuner = "lora"
    peft_adapters = "lora_A"
    peft_fields = ("use_dora",)
    peft_names = ("lora_magnitude",)

    bench_cases = {"dora": "DoRA", "dora_dropout": "DoRA+dropout"}  # alone: not in the "combined" row (IA3, S)

    linear_keywords = ("use_dora",)
    example = {"r": 3, "alpha": 6, "use_dora": True}

    def linear_options(self, kw: dict) -> Optional[dict]:
        if not kw.get("use_dora"):
            return None
        # LoRA's parts are built alongside (not yet on the layer): say whether from_linear adds it
        return {"with_lora": bool(kw.get("r")), "with_conflicts": [p for p, on in (
            ("ia3", kw.get("ia3") is not None), ("sparse", kw.get("density") is not None)) if on]}

    def _check_layer(self, layer, with_lora: Optional[bool], with_conflicts=()) -> None:
        check_addable(layer, self, "add DoRA")
        if layer.dora_magnitude is not None:
            raise ValueError("this layer already has a DoRA magnitude")
        if not (layer.lora_A is not None or with_lora):
            raise ValueError("DoRA (use_dora=True) needs the LoRA path on the layer: give r > 0 (or add LoRA first)")
        if with_conflicts:  # asked for in the same from_linear call
            raise ValueError(f"DoRA cannot be combined with {' / '.join(sorted(set(with_conflicts)))} on one layer "
                             "(the op rejects dora_magnitude together with ia3_in/ia3_out/sparse)")

    def check(self, layer, with_lora: Optional[bool] = None, with_conflicts=()) -> None:
        self._check_layer(layer, with_lora, with_conflicts)
        return None  # built by parts (the norm of W), once every layer passed

    def parts(self, layer, with_lora: Optional[bool] = None, with_conflicts=()) -> dict:
        self._check_layer(layer, with_lora, with_conflicts)
        with torch.no_grad():
            if isinstance(layer.weight, torch.Tensor):
                norm = torch.linalg.vector_norm(layer.weight_nk.detach().to(adapter_dtype(layer.weight)), dim=1)
            else:  # a quantized base (fastpeft.quantize): ‖W‖_row panel by panel, never a dense W
                from fastpeft.quant.dora import row_sq_norms

                norm = row_sq_norms(layer.weight).sqrt()
        return {"dora_magnitude": new_param(layer, norm), "_dora_scale": None}

    def adopt(self, layer, dora_magnitude: torch.Tensor, with_lora: Optional[bool] = None) -> dict:
        """The DoRA part with an existing magnitude [N] (a Parameter is kept as it is)."""
        self._check_layer(layer, with_lora)
        if not isinstance(dora_magnitude, torch.Tensor) or not dora_magnitude.is_floating_point():
            raise TypeError(f"dora_magnitude must be a floating-point tensor, got {type(dora_magnitude).__name__}")
        if tuple(dora_magnitude.shape) != (layer.out_features,):
            raise ValueError(f"dora_magnitude must be [{layer.out_features}], got {list(dora_magnitude.shape)}")
        return {"dora_magnitude": dora_magnitude, "_dora_scale": None}

    def layout(self, layer, tensor, value) -> tuple:
        return (value.numel(),)

    def op_fields(self, layer):
        return (("dora_magnitude", "dora_magnitude"),)

    # ------------------------------------------------------------------ the merged weight: c ⊙ (W + s·B·A)
    def apply(self, layer, w, rows, inplace=False):
        c = _scale(layer.dora_magnitude[rows], w.detach())  # the norm is detached (peft, the paper sec. 4.3)
        if inplace:
            if not layer.merged and rows == slice(0, layer.out_features):  # merge (or delta_weight): kept for unmerge
                layer._dora_scale = c.detach().clone()
            return w.mul_(c[:, None])
        return w * c[:, None]

    def _stored(self, layer, dtype) -> torch.Tensor:
        if layer._dora_scale is None:
            raise RuntimeError("this merged layer has no stored DoRA scale (merged outside merge()); cannot unmerge")
        return layer._dora_scale.to(dtype)

    def invert(self, layer, w, bound=None):
        c = self._stored(layer, w.dtype)
        known = c != 0
        safe = torch.where(known, c, torch.ones_like(c))
        if bound is None:
            if not bool(known.all()):
                warnings.warn(f"DoRA scales of {int((~known).sum())} rows are 0 (zero magnitude or zero-norm rows): "
                              "those rows of W cannot be restored and stay 0", stacklevel=3)
            return w.div_(safe[:, None])
        bound.forget(known[:, None].expand_as(w))
        bound.err = bound.err / safe.abs()[:, None]
        return torch.where(known[:, None], w / safe[:, None], torch.zeros_like(w))

    # ------------------------------------------------------------------ accounting
    def changed(self, layer, pre) -> int:
        """Entries of W + s·B·A its row scale changes: c != 1 and the entry nonzero."""
        w = pre().weight.float()
        a, b, s = layer.lora_A.detach().float(), layer.lora_B.detach().float(), layer.lora_scale
        total = 0
        for i in range(0, w.shape[0], ROW_CHUNK):
            u = w[i:i + ROW_CHUNK] + s * (b[i:i + ROW_CHUNK] @ a)
            c = _scale(layer.dora_magnitude.detach()[i:i + ROW_CHUNK], u)
            total += int(((c != 1)[:, None] & (u != 0)).sum())
        return total

    def max_changed(self, layer) -> int:
        return layer.out_features * layer.in_features

    # ------------------------------------------------------------------ cases
    def random_args(self, case, weight, settings, gen) -> dict:
        """LoRA's random case (with dropout for "dora_dropout") and m = ‖W‖_row times a factor near 1."""
        args = LORA.random_args("lora_dropout" if case == "dora_dropout" else "lora", weight, settings, gen)
        norm = torch.linalg.vector_norm(weight.detach().to(adapter_dtype(weight)), dim=1)
        args["dora_magnitude"] = norm * random_tensor(weight, gen, weight.shape[0], scale=0.2, shift=1.0)
        return args

    def peft_twin(self, case, weight, args, settings, wrap, target):
        import peft

        layer = wrap(peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=args["lora_dropout"],
                                     target_modules=[target], use_dora=True))
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(args["lora_A"])
            layer.lora_B["default"].weight.copy_(args["lora_B"])
            layer.lora_magnitude_vector["default"].weight.copy_(args["dora_magnitude"])
        grads = {"lora_A": layer.lora_A["default"].weight, "lora_B": layer.lora_B["default"].weight,
                 "dora_magnitude": layer.lora_magnitude_vector["default"].weight}
        return layer, grads, args["lora_dropout"] == 0  # with dropout peft draws its mask, and uses it in the base

    # ------------------------------------------------------------------ peft mapping
    def peft_tensors(self, name, layer, prepare=lambda t: t) -> dict:
        return {f"{name}.lora_magnitude_vector": prepare(layer.dora_magnitude)}

    def peft_config(self, layers) -> dict:
        return {"use_dora": True}

    def peft_check_config(self, config: dict) -> None:
        if not isinstance(config.get("use_dora", False), bool):
            raise ValueError(f"the checkpoint's use_dora must be true or false, got {config.get('use_dora')!r}")

    def peft_split(self, key: str) -> Optional[tuple[str, str]]:
        for suffix in (".lora_magnitude_vector", ".lora_magnitude_vector.weight"):
            if key.endswith(suffix):
                return key[:-len(suffix)], "dora_magnitude"
        return None

    def peft_read(self, config, path, tensors, module):
        if not config.get("use_dora", False):
            raise ValueError(f"{path}.lora_magnitude_vector: the checkpoint has a DoRA magnitude but its config "
                             "does not set use_dora")
        m = tensors["dora_magnitude"]
        if tuple(m.reshape(-1).shape) != (module.out_features,):
            raise ValueError(f"{path}.lora_magnitude_vector: checkpoint shape {list(m.shape)} does not match the "
                             f"model's [{module.out_features}]")
        # LoRA comes from the same checkpoint (load_adapter assigns it before DoRA)
        return {"dora_magnitude": m.reshape(-1)}, {"with_lora": True}, None

    def from_peft_layer(self, name, layer, adapter, config):
        if not layer.use_dora.get(adapter, False):
            return None
        magnitude = layer.lora_magnitude_vector[adapter].weight
        dropout = layer.lora_dropout[adapter]
        if isinstance(dropout, nn.Dropout) and dropout.p > 0:  # shown once per place (warnings' registry)
            warnings.warn(DROPOUT_WARNING, stacklevel=4)
        return {"dora_magnitude": magnitude}, {}


DORA = DoRAPath()
