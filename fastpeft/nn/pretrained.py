"""What the pre-trained model was: snapshots of parameters fastpeft makes trainable in place.

``count_parameters`` and ``delta_penalty`` compare a parameter trained in place (a BitFit bias,
``select_layers``, ``modules_to_save``) with its values before training.  fastpeft keeps a copy
of those values the moment it makes such a parameter trainable (``remember_pretrained``); the
copy lives as long as the parameter does (a weak mapping keyed by the parameter object) and the
first call wins, so a second injection never overwrites the pre-trained values.

``freeze_all_but_adapters`` is the freezing rule every model-level method shares (``inject``,
``AdapterConfig.inject``, ``load_adapter``): everything is frozen except the parameters that
fastpeft modules injected earlier already train, so methods stack.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary

_SNAPSHOTS = WeakIdKeyDictionary()


def remember_pretrained(param: torch.Tensor, values: Optional[torch.Tensor] = None) -> None:
    """Keep a copy of a pre-trained parameter's values (or of ``values``: its values before
    training, e.g. carried by a copy) before it is trained in place.  The first call wins."""
    if param not in _SNAPSHOTS:
        src = param if values is None else values
        if tuple(src.shape) != tuple(param.shape):
            raise ValueError(f"values must have the parameter's shape {list(param.shape)}, got {list(src.shape)}")
        _SNAPSHOTS[param] = src.detach().to(param.device, param.dtype).clone()


def initial_values(param: torch.Tensor) -> Optional[torch.Tensor]:
    """The values ``remember_pretrained`` kept for ``param`` (None if it kept none)."""
    return _SNAPSHOTS.get(param)


def train_in_place(param: nn.Parameter) -> None:
    """Make a pre-trained parameter trainable, snapshotting it first when it was frozen."""
    if not param.requires_grad:
        remember_pretrained(param)
    param.requires_grad_(True)


def is_fastpeft_module(module: nn.Module) -> bool:
    """Whether ``module`` is one of fastpeft's own modules (they declare ``PARAM_CATEGORIES``)."""
    return hasattr(module, "PARAM_CATEGORIES")


def trainable_adapter_params(model: nn.Module) -> set[int]:
    """ids of the parameters fastpeft modules of ``model`` train now."""
    return {id(p) for layer in model.modules() if is_fastpeft_module(layer)
            for p in layer.parameters(recurse=False) if p.requires_grad}


def freeze_all_but_adapters(model: nn.Module) -> None:
    """Freeze every parameter except the trainable ones of fastpeft modules injected earlier.

    fastpeft modules are recognised by their ``PARAM_CATEGORIES`` table, so methods stack: LoRA
    injected after adapters (or the reverse) leaves the earlier method trainable.
    """
    keep = trainable_adapter_params(model)
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
