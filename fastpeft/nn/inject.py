"""Put fastpeft layers into a model: ``inject``, ``merge`` and ``unmerge``.

``inject`` replaces matching nn.Linear layers in place with PEFTLinear modules that reuse their
weight and bias, freezes every other parameter except those the config names as trainable, and
returns the model.  A layer that is already a PEFTLinear gains the new path instead, so methods
combine (inject LoRA, then IA3, on the same layers).  A bottleneck adapter attached to a replaced
nn.Linear moves onto its replacement.

It runs in three steps, so that a failure leaves the model exactly as it was (same modules,
parameters, requires_grad flags, and torch's random state): check every target, build every new
tensor off the model, then assign (which cannot fail).

Tied weights: a layer whose weight is also another module's parameter (``tie_word_embeddings``:
the output layer shares the input embedding) is left out of the default targets
(``target_modules=None``), as peft's "all-linear" leaves out the output layer.  Targeting one
explicitly warns, and ``merge`` refuses it: merging would rewrite the embedding too.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from fastpeft.methods.adapters import adapter_of, attach_adapter, is_adapter_hook
from fastpeft.methods.heads import save_in_full
from fastpeft.nn.config import BitFitConfig, IA3Config, LoRAConfig, SparseConfig, matches
from fastpeft.nn.embedding import LoRAEmbedding, embedding_plans, embeddings_to_merge
from fastpeft.nn.modules import LAYER_CLASSES, PEFTLinear, is_conv1d
from fastpeft.nn.pretrained import freeze_all_but_adapters, train_in_place
from fastpeft.paths import get as get_path
from fastpeft.paths import weight_paths

__all__ = ["inject", "merge", "unmerge", "target_names", "tied_layers", "set_submodule", "check_replaceable",
           "freeze_all_but_adapters"]
_CONFIGS = (LoRAConfig, IA3Config, BitFitConfig, SparseConfig)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at qualified name ``name`` of ``model`` (replacing what is there)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _adaptable(module: nn.Module) -> bool:
    # MultiheadAttention's out_proj is an nn.Linear subclass whose weight MHA reads directly:
    # replacing it would bypass the adapter silently, so it is never a target.
    if type(module).__name__ == "NonDynamicallyQuantizableLinear":
        return False
    return isinstance(module, (nn.Linear, PEFTLinear)) or is_conv1d(module)


# ----------------------------------------------------------------------------- tied weights
def _keys(t) -> list:
    # The same Parameter object, or the same memory seen the same way (nn.Parameter(other.data)).
    keys = [("id", id(t))]
    if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel() > 0:  # not a QuantizedWeight
        keys.append(("view", str(t.device), t.data_ptr(), tuple(t.shape), t.stride(), t.dtype))
    return keys


def tied_layers(model: nn.Module) -> dict[str, str]:
    """{layer name: name of another module that holds the same weight} for every linear layer of
    ``model`` whose weight is shared (tied) with another module, e.g. an nn.Embedding."""
    owners: dict = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            for key in _keys(p):
                owners.setdefault(key, []).append((name, module))
    tied = {}
    for name, module in model.named_modules():
        if not name or not _adaptable(module):
            continue
        others = [n for key in _keys(module.weight) for n, m in owners.get(key, []) if m is not module]
        if others:
            tied[name] = others[0] or "<root>"
    return tied


def target_names(model: nn.Module, target_modules) -> list[str]:
    """Names of the linear layers ``inject`` adapts for ``target_modules`` (None: every one whose
    weight is not tied to another module)."""
    names = [name for name, module in model.named_modules()
             if name and _adaptable(module) and matches(name, target_modules)]
    if target_modules is None:
        tied = tied_layers(model)
        names = [n for n in names if n not in tied]
    return names


# ----------------------------------------------------------------------------- inject
@dataclass
class _Plan:
    name: str
    layer: PEFTLinear                    # the model's PEFTLinear, or the replacement (not yet in the model)
    replaces: Optional[nn.Module] = None  # the nn.Linear it replaces
    steps: list = field(default_factory=list)  # [path, options, parts or None (not built yet)]


def check_replaceable(name: str, module: nn.Module) -> None:
    """Raise unless replacing ``module`` keeps everything attached to it (only our adapter moves)."""
    adapter = adapter_of(module)
    children = [n for n, c in module.named_children() if c is not adapter]
    hooks = [h for h in module._forward_hooks.values() if not is_adapter_hook(h)]
    others = [kind for kind in ("_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
              if getattr(module, kind, None)]
    if children or hooks or others:
        what = ", ".join([f"submodules {children}"] * bool(children) + [f"{len(hooks)} forward hook(s)"] * bool(hooks)
                         + [k.strip("_").replace("_", " ") for k in others])
        raise ValueError(f"{name!r} carries {what}: replacing it with a fastpeft layer would drop them; "
                         "inject fastpeft methods before registering hooks or adding submodules to the layer")


def replacement(name: str, module: nn.Module, path: str, backend: Optional[str]) -> PEFTLinear:
    """The fastpeft layer (of ``path``'s class) that will replace the plain linear ``module`` at
    ``name``: same weight and bias objects, nothing changed yet (see ``swap_in``).  A transformers
    Conv1D keeps its [K, N] weight (``fan_in_fan_out``)."""
    check_replaceable(name, module)
    return LAYER_CLASSES.get(path, PEFTLinear)(module.weight, module.bias, backend=backend,
                                               fan_in_fan_out=is_conv1d(module))


def swap_in(model: nn.Module, name: str, layer: PEFTLinear, replaced: nn.Module) -> None:
    """Put ``layer`` in place of ``replaced`` at ``name``: its weight frozen, its train/eval mode and
    its bottleneck adapter kept.  Cannot fail (``replacement`` checked it)."""
    layer.weight.requires_grad_(False)
    layer.train(replaced.training)
    adapter = adapter_of(replaced)
    if adapter is not None:  # a bottleneck adapter attached to the nn.Linear moves onto its replacement
        attach_adapter(layer, adapter)
    set_submodule(model, name, layer)


def _check(plan: _Plan, config) -> None:
    """Every check for one target, on the layer as it is (no random draw, nothing changes)."""
    for path_name, options in config.layer_paths(plan.name, plan.layer):
        path = get_path(path_name)
        plan.steps.append([path, options, path.check(plan.layer, **options)])


def inject(model: nn.Module, config) -> nn.Module:
    """Replace the nn.Linear layers that ``config.target_modules`` selects, in place; return model.

    Every parameter the method does not train is frozen.  Raises ValueError when nothing matches;
    when it raises, the model is exactly as it was.  ``target_modules=None`` selects every linear
    layer except tied ones (see the module doc); a LoRAConfig whose ``target_modules`` name an
    ``nn.Embedding`` puts LoRA on it too (fastpeft.LoRAEmbedding, peft's lora.Embedding), and the
    modules its ``modules_to_save`` names train in place and are saved in full by save_adapter.
    Configs that carry their own placement logic (an
    ``inject(model)`` method, e.g. AdapterConfig) are delegated to.
    """
    if hasattr(config, "inject"):
        return config.inject(model)
    if not isinstance(config, _CONFIGS):
        raise TypeError("config must be LoRAConfig, IA3Config, BitFitConfig or SparseConfig, got "
                        f"{type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = target_names(model, config.target_modules)
    embeddings = embedding_plans(model, config)  # LoRA on nn.Embedding targets, checked (fastpeft.nn.embedding)
    if not names and not embeddings and not config.trains_all_biases:
        raise ValueError(f"target_modules={config.target_modules!r} matched no nn.Linear in the model")

    # 1. check every target; nothing in the model changes and nothing is drawn
    plans = []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, PEFTLinear):
            plan = _Plan(name, module)
        else:
            plan = _Plan(name, replacement(name, module, config.path, config.backend), module)
        try:
            _check(plan, config)
        except (TypeError, ValueError, RuntimeError) as exc:
            if type(exc) not in (TypeError, ValueError, RuntimeError):
                raise
            raise type(exc)(f"layer {name!r}: {exc}") from None
        plans.append(plan)
    layout = getattr(config, "fan_in_fan_out", None)  # LoRAConfig: None detects; a contradiction warns (as peft)
    wrong = [p.name for p in plans if layout is not None and p.layer.fan_in_fan_out != layout]
    if wrong:
        warnings.warn(f"fan_in_fan_out={layout} but {wrong[:3]} {'are' if len(wrong) > 1 else 'is'} "
                      f"{'nn.Linear' if layout else 'transformers Conv1D'}: using fan_in_fan_out="
                      f"{not layout} there (the layout is the layer's)", stacklevel=2)
    if config.target_modules is not None and get_path(config.path).changes_weight:
        tied = tied_layers(model)
        for name in (n for n in names if n in tied):
            warnings.warn(f"{name!r} is a target but its weight is tied to {tied[name]!r} (tie_word_embeddings): "
                          "training works, but fastpeft.merge will refuse it, since merging would rewrite "
                          f"{tied[name]!r} too; untie it first (a copy of the weight) to merge", stacklevel=2)
    # 2. build what is random (LoRA's init), still off the model
    for plan in plans:
        for step in plan.steps:
            if step[2] is None:
                step[2] = step[0].parts(plan.layer, **step[1])
    for emb in embeddings:
        emb.build()
    # 3. assign (nothing here can fail)
    freeze_all_but_adapters(model)
    for plan in plans:
        for path, _, parts in plan.steps:
            path.assign(plan.layer, parts)
        if plan.replaces is not None:
            swap_in(model, plan.name, plan.layer, plan.replaces)
    for emb in embeddings:
        emb.assign(model)
    if config.trains_all_biases:
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                train_in_place(p)
    for name, module in model.named_modules():
        if name and config.modules_to_save and matches(name, config.modules_to_save):
            for p in module.parameters():
                train_in_place(p)
            save_in_full(module)  # save_adapter writes it as peft's modules_to_save
    return model


# ----------------------------------------------------------------------------- merge
def merge(model: nn.Module) -> nn.Module:
    """Merge every fastpeft layer of ``model`` (see PEFTLinear.merge).

    Refuses (ValueError, nothing merged) when a layer to merge has a weight tied to another
    module: merging would rewrite that module too (the input embeddings of a tied output layer).
    """
    todo = [(name, m) for name, m in model.named_modules() if isinstance(m, PEFTLinear) and not m.merged]
    tied = tied_layers(model)
    refused = [f"{name!r} (tied to {tied[name]!r})" for name, m in todo if name in tied and weight_paths(m)]
    if refused:
        raise ValueError(f"cannot merge {', '.join(refused)}: the weight is shared, so merging would rewrite the other "
                         "module too (tie_word_embeddings). Keep the model unmerged (it computes the same outputs), "
                         "or untie first: layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), "
                         "requires_grad=False)")
    unfoldable = [n for n, m in todo if m.bias is None and any(p.bias_shift(m) is not None for p in weight_paths(m))]
    if unfoldable:
        raise RuntimeError(f"cannot merge {unfoldable[:3]}: their lora_bias has no base bias to fold into (the layers "
                           "have none); peft cannot merge them either. Keep the model unmerged; nothing was merged")
    tables = embeddings_to_merge(model)  # LoRAEmbedding layers (refused, nothing merged, when tied)
    for _, module in todo:
        module.merge()
    for table in tables:
        table.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Unmerge every merged fastpeft layer of ``model``."""
    for module in model.modules():
        if isinstance(module, (PEFTLinear, LoRAEmbedding)) and module.merged:
            module.unmerge()
    return model
