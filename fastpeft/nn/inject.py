"""Put fastpeft layers into a model: ``inject``, ``merge`` and ``unmerge``.

``inject`` replaces matching nn.Linear layers in place with PEFTLinear modules that reuse their
weight and bias, freezes every other parameter except those the config names as trainable, and
returns the model.  A layer that is already a PEFTLinear gains the new path instead, so methods
combine (inject LoRA, then IA3, on the same layers).
"""
from __future__ import annotations

import torch.nn as nn

from fastpeft.nn.accounting import remember_pretrained
from fastpeft.nn.config import BitFitConfig, IA3Config, LoRAConfig, SparseConfig, matches
from fastpeft.nn.modules import BitFitLinear, IA3Linear, LoRALinear, PEFTLinear, SparseLinear

_LAYER_CLASS = {LoRAConfig: LoRALinear, IA3Config: IA3Linear, BitFitConfig: BitFitLinear, SparseConfig: SparseLinear}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _add_path(layer: PEFTLinear, name: str, config) -> None:
    if isinstance(config, LoRAConfig):
        layer.add_lora(config.r, config.alpha, config.dropout, config.use_rslora)
        if config.bias == "lora_only" and layer.bias is not None:
            layer.train_bias()
    elif isinstance(config, IA3Config):
        ff = config.feedforward_modules is not None and matches(name, config.feedforward_modules)
        layer.add_ia3("in" if ff else "out")
    elif isinstance(config, BitFitConfig):
        layer.train_bias()
    elif isinstance(config, SparseConfig):
        index = None
        if config.indices is not None:
            if name not in config.indices:
                raise KeyError(f"SparseConfig.indices has no entry for layer {name!r}")
            index = config.indices[name]
        elif config.selection == "gradient":
            raise ValueError("selection='gradient' needs the per-layer indices: pass "
                             "SparseConfig(indices=fastpeft.select_sparse_by_gradient(model, batches, config))")
        layer.add_sparse(config.density, config.selection, config.block, config.seed, index=index)


def _adaptable(module: nn.Module) -> bool:
    # MultiheadAttention's out_proj is an nn.Linear subclass whose weight MHA reads directly:
    # replacing it would bypass the adapter silently, so it is never a target.
    if type(module).__name__ == "NonDynamicallyQuantizableLinear":
        return False
    return isinstance(module, (nn.Linear, PEFTLinear))


def _targets(model: nn.Module, config) -> list[str]:
    return [name for name, module in model.named_modules()
            if name and _adaptable(module) and matches(name, config.target_modules)]


def inject(model: nn.Module, config) -> nn.Module:
    """Replace the nn.Linear layers that ``config.target_modules`` selects, in place; return model.

    Every parameter the method does not train is frozen.  Raises ValueError when nothing matches.
    Configs that carry their own placement logic (an ``inject(model)`` method) are delegated to.
    """
    if hasattr(config, "inject"):
        return config.inject(model)
    if type(config) not in _LAYER_CLASS:
        raise TypeError(f"config must be LoRAConfig, IA3Config, BitFitConfig or SparseConfig, got {type(config).__name__}")
    names = _targets(model, config)
    if not names and not (isinstance(config, BitFitConfig) and config.target_modules is None):
        raise ValueError(f"target_modules={config.target_modules!r} matched no nn.Linear in the model")
    freeze_all_but_adapters(model)
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, PEFTLinear):
            layer = _LAYER_CLASS[type(config)](module.weight, module.bias, backend=config.backend)
            layer.weight.requires_grad_(False)
            _add_path(layer, name, config)
            _set_submodule(model, name, layer)
        else:
            _add_path(module, name, config)
    all_biases = (isinstance(config, BitFitConfig) and config.target_modules is None) or (
        isinstance(config, LoRAConfig) and config.bias == "all")
    if all_biases:
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                _train(p)
    for name, module in model.named_modules():
        if name and config.modules_to_save and matches(name, config.modules_to_save):
            for p in module.parameters():
                _train(p)
    return model


def _train(param: nn.Parameter) -> None:
    if not param.requires_grad:
        remember_pretrained(param)
    param.requires_grad_(True)


def freeze_all_but_adapters(model: nn.Module) -> None:
    """Freeze every parameter except the trainable ones of fastpeft modules injected earlier.

    fastpeft modules are recognised by their ``PARAM_CATEGORIES`` table, so methods stack: LoRA
    injected after adapters (or the reverse) leaves the earlier method trainable.
    """
    keep = {id(p) for layer in model.modules() if hasattr(layer, "PARAM_CATEGORIES")
            for p in layer.parameters(recurse=False) if p.requires_grad}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def merge(model: nn.Module) -> nn.Module:
    """Merge every fastpeft layer of ``model`` (see PEFTLinear.merge)."""
    for module in model.modules():
        if isinstance(module, PEFTLinear) and not module.merged:
            module.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Unmerge every merged fastpeft layer of ``model``."""
    for module in model.modules():
        if isinstance(module, PEFTLinear) and module.merged:
            module.unmerge()
    return model
