"""``fastpeft.quantize(model, "nf4" | "int8", target_modules=None)``: quantized frozen bases, in place.

Every target (an nn.Linear, or a PEFTLinear before or after ``inject``) keeps its bias and its PEFT
paths; its weight Parameter (trainable or not: a quantized base is frozen) is replaced by a
``QuantizedWeight`` whose tensors are registered as
buffers ``weight_<name>`` (so ``state_dict`` carries them), and ``layer.weight`` is that object:
the fused op dequantizes it panel by panel inside its products (fastpeft.quant.op).  An nn.Linear
becomes a PEFTLinear with no path yet, so ``inject`` adds LoRA (QLoRA) or any other path to it.

Choices: ``target_modules=None`` converts every linear layer except an output layer tied to the
input embeddings (quantizing it would quantize the embeddings); ``merge()`` of a layer with a
quantized base raises (dequantize–merge–requantize would change the base by the quantization error
each time).  Every path runs over a quantized base (LoRA with dropout, DoRA, IA3, BitFit, a sparse
delta: fastpeft.quant.op); DoRA's magnitude is initialised from ‖W‖_row of the dequantized base and
keeps its value when the base is quantized after ``inject`` (c then follows the quantized W).
Everything is validated before any layer changes: when ``quantize`` raises, the model is as it was.
"""
from __future__ import annotations

import torch.nn as nn

from fastpeft.nn.inject import check_replaceable, set_submodule, target_names
from fastpeft.nn.modules import PEFTLinear, is_conv1d
from fastpeft.quant.weight import BUFFER_PREFIX, FORMATS, QuantizedWeight, quantize_weight


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer``'s frozen weight is a QuantizedWeight."""
    return isinstance(getattr(layer, "weight", None), QuantizedWeight)


def _check(name: str, module: nn.Module) -> None:
    if is_quantized(module):
        raise ValueError(f"layer {name!r} is already quantized ({module.weight.format})")
    if getattr(module, "fan_in_fan_out", False) or is_conv1d(module):
        raise NotImplementedError(f"layer {name!r} is a transposed (transformers Conv1D, [K, N]) base: quantizing "
                                  "it is not supported yet; pass target_modules without it")
    if isinstance(module, PEFTLinear):
        if module.merged:
            raise ValueError(f"layer {name!r} is merged: unmerge it before quantizing its base")
    else:
        check_replaceable(name, module)


def quantize(model: nn.Module, format: str = "nf4", target_modules=None, *, blocksize: int = 64,
             double_quant: bool = True) -> nn.Module:
    """Quantize the frozen bases of the matching linear layers in place; returns ``model``.

    format: "nf4" (bitsandbytes' layout, ``blocksize``, ``double_quant``) or "int8" (one absmax
    per output row).  target_modules: as in the configs (names or a regex; None: every linear
    layer but a tied output layer).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    names = target_names(model, target_modules)
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matched no linear layer in the model")
    modules = {name: model.get_submodule(name) for name in names}
    for name, module in modules.items():
        _check(name, module)
    quantized = {name: quantize_weight(m.weight.detach(), format, blocksize=blocksize, double_quant=double_quant)
                 for name, m in modules.items()}  # may raise (bad blocksize...): nothing changed yet
    for name, module in modules.items():
        layer = module
        if not isinstance(module, PEFTLinear):  # a frozen base, as PEFTLinear.from_linear makes it
            layer = PEFTLinear(module.weight, module.bias)
            if layer.bias is not None:
                layer.bias.requires_grad_(False)
            layer.train(module.training)
        attach(layer, quantized[name])
        if layer is not module:
            set_submodule(model, name, layer)
    return model


def attach(layer: PEFTLinear, qw: QuantizedWeight) -> None:
    """Make ``qw`` the frozen base of ``layer`` (its tensors as buffers ``weight_<name>``)."""
    if tuple(qw.shape) != (layer.out_features, layer.in_features):
        raise ValueError(f"the quantized weight is {list(qw.shape)}, the layer [{layer.out_features}, "
                         f"{layer.in_features}]")
    del layer._parameters["weight"]
    for key, tensor in qw.tensors().items():
        layer.register_buffer(BUFFER_PREFIX + key, tensor)
    object.__setattr__(layer, "weight", qw)
