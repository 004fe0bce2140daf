"""BitFit: the layer's bias trains, nothing else.

    y = x Wᵀ + b,  b trainable (a zero bias is added when the layer has none)

The bias is an argument the layer always passes to the op, so the path adds nothing to the call
and nothing to the merged weight (``changes_weight`` is False).  A pre-trained bias is snapshotted
before it trains (fastpeft.nn.pretrained), so count_parameters and delta_penalty compare with its
pre-trained values; a bias BitFit added started at zero, so its distance is the bias itself.
peft has no BitFit method: a LoRA checkpoint carries trained biases through its ``bias`` field.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from fastpeft.nn.pretrained import initial_values, remember_pretrained
from fastpeft.paths.base import Path, measure, random_tensor


class BitFitPath(Path):
    name = "bitfit"
    label = "BitFit"
    tensors = ("bias",)
    slots = ()  # the bias belongs to the base layer
    categories = {"bias": "bias"}
    changes_weight = False
    bench_cases = {"bitfit": "BitFit"}
    combined_case = "bitfit"

    def present(self, layer) -> bool:
        return layer.bias is not None and layer.bias.requires_grad

    linear_keywords = ("train_bias",)
    example = {"train_bias": True}

    def linear_options(self, kw: dict) -> Optional[dict]:
        return {} if kw["train_bias"] else None

    def parts(self, layer) -> dict:
        if layer.bias is not None:
            return {}
        zeros = torch.zeros(layer.out_features, dtype=layer.weight.dtype, device=layer.weight.device)
        return {"bias": nn.Parameter(zeros)}

    def assign(self, layer, parts: dict) -> None:
        if "bias" not in parts:
            remember_pretrained(layer.bias)  # so count_parameters can tell which entries training changed
        super().assign(layer, parts)
        layer.bias.requires_grad_(True)


    def op_fields(self, layer):
        return ()  # the layer passes its bias to the op whether it trains or not

    def penalty_extra(self, layer, kind):
        bias = layer.bias
        if bias is None or not bias.requires_grad or initial_values(bias) is not None:
            return [], []  # a snapshotted bias is penalised with every parameter trained in place
        # BitFit on a layer that had no bias: fastpeft added a zero bias, so Δb = b
        dtype = torch.float64 if bias.dtype == torch.float64 else torch.float32
        return [measure(bias.to(dtype), kind)], [bias]

    def penalised(self, layer) -> list:
        return []

    def random_args(self, case, weight, settings, gen) -> dict:
        return {"bias": random_tensor(weight, gen, weight.shape[0], scale=0.1)}


BITFIT = BitFitPath()
