"""Interoperability with Hugging Face peft: convert peft models, and read/write peft checkpoints.

* :func:`from_peft` swaps the LoRA and IA3 layers of a peft model for fastpeft layers, in place,
  keeping the very same Parameter objects (an optimizer built before the conversion keeps working).
* :func:`save_adapter` writes ``adapter_model.safetensors`` + ``adapter_config.json`` in peft's own
  format, so ``peft.PeftModel.from_pretrained(base, directory)`` loads them.
* :func:`load_adapter` reads a peft LoRA or IA3 checkpoint into a model, injecting fastpeft layers
  where the model still has plain ``nn.Linear`` ones.

peft and safetensors are optional extras (``pip install fastpeft[peft]``): they are imported
inside these functions only, never when ``fastpeft`` is imported.

Checkpoint format (peft 0.21): tensor keys are ``base_model.model.<module path>.<name>`` with
``lora_A.weight`` [r, K], ``lora_B.weight`` [N, r] for LoRA, ``ia3_l`` [N, 1] (outputs) or [1, K]
(feed-forward inputs) for IA3, and, with LoRA ``bias="lora_only"``/``"all"``, the trained biases
(``<path>.base_layer.bias`` for adapted layers, ``<path>.bias`` for the others).
"""
from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from fastpeft.nn.inject import _set_submodule
from fastpeft.nn.modules import IA3Linear, LoRALinear, PEFTLinear

_INSTALL_HINT = "pip install fastpeft[peft]"
_PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def _import_peft():
    try:
        import peft
        import peft.tuners.ia3 as peft_ia3
        import peft.tuners.lora as peft_lora
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"fastpeft.from_peft needs peft: {_INSTALL_HINT}") from exc
    return peft, peft_lora, peft_ia3, BaseTunerLayer, AuxiliaryTrainingWrapper


def _import_safetensors():
    try:
        import safetensors.torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"peft checkpoints are safetensors files: {_INSTALL_HINT}") from exc
    return safetensors.torch


# ----------------------------------------------------------------------------- from_peft
def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The plain model under a PeftModel / LoraModel / IA3Model (or ``model`` itself)."""
    if hasattr(model, "get_base_model") and type(model).__module__.startswith("peft."):
        model = model.get_base_model()
    elif type(model).__module__.startswith("peft.tuners.") and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model  # a bare LoraModel / IA3Model
    return model


def _single_adapter(name: str, layer, params: dict, method: str) -> str:
    """The one active adapter of a peft layer; raise on every state fastpeft cannot reproduce."""
    active = list(layer.active_adapters)
    if len(active) != 1:
        raise NotImplementedError(
            f"{name}: several active peft adapters at once ({active}) are not supported by fastpeft; "
            "activate a single adapter (peft_model.set_adapter(name)) before from_peft")
    adapter = active[0]
    loaded = sorted(params.keys())
    if loaded != [adapter]:
        raise NotImplementedError(
            f"{name}: this {method} layer holds adapters {loaded} with {adapter!r} active; fastpeft keeps one "
            "adapter per layer: delete the others (peft_model.delete_adapter) before from_peft")
    if layer.disable_adapters:
        raise NotImplementedError(f"{name}: peft adapters are disabled on this layer (disable_adapter()); "
                                  "re-enable them before from_peft")
    if layer.merged:
        raise NotImplementedError(f"{name}: the peft adapter is merged into the base weight; "
                                  "call peft_model.unmerge_adapter() before from_peft")
    return adapter


def _convert_lora(name: str, layer, backend: Optional[str]) -> PEFTLinear:
    adapter = _single_adapter(name, layer, layer.lora_A, "LoRA")
    if layer.use_dora.get(adapter, False) or adapter in getattr(layer, "lora_magnitude_vector", {}):
        raise NotImplementedError(f"{name}: DoRA (use_dora=True) is not supported by fastpeft")
    if adapter in layer.lora_variant:
        raise NotImplementedError(f"{name}: the LoRA variant {type(layer.lora_variant[adapter]).__name__} "
                                  "is not supported by fastpeft (plain LoRA and rsLoRA are)")
    if layer.lora_bias.get(adapter, False) or layer.lora_B[adapter].bias is not None:
        raise NotImplementedError(f"{name}: lora_bias=True (a bias on lora_B) is not supported by fastpeft")
    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_A.bias is not None:
        raise NotImplementedError(f"{name}: LoRA factors of type {type(lora_A).__name__}/{type(lora_B).__name__} "
                                  "are not supported by fastpeft (plain nn.Linear factors are)")
    dropout = layer.lora_dropout[adapter]
    if isinstance(dropout, nn.Dropout):
        p = float(dropout.p)
    elif isinstance(dropout, nn.Identity):
        p = 0.0
    else:
        raise NotImplementedError(f"{name}: LoRA dropout module {type(dropout).__name__} is not supported")
    base = layer.base_layer
    new = LoRALinear(base.weight, base.bias)  # the very same Parameters, requires_grad untouched
    new.backend = backend
    new.lora_A, new.lora_B = lora_A.weight, lora_B.weight
    new.r = int(lora_A.weight.shape[0])
    new.lora_alpha = float(layer.lora_alpha[adapter])
    new.use_rslora = bool(layer.use_rslora.get(adapter, False))
    new.lora_scale = float(layer.scaling[adapter])  # peft's live value (set_scale may have changed it)
    new.lora_dropout = p
    return new


def _convert_ia3(name: str, layer, backend: Optional[str]):
    adapter = _single_adapter(name, layer, layer.ia3_l, "IA3")
    base = layer.base_layer
    new = IA3Linear(base.weight, base.bias)
    new.backend = backend
    # The vector is attached (and reshaped) only once every layer has passed its checks.
    return new, layer.ia3_l[adapter], "ia3_in" if layer.is_feedforward else "ia3_out"


def _attach_ia3(new: PEFTLinear, vec: nn.Parameter, attr: str) -> tuple:
    # peft stores [1, K] (feed-forward, scales inputs) or [N, 1] (scales outputs); fastpeft's op
    # takes [K] / [N].  Reshape the data of the same Parameter object (a view, no copy).
    old_shape = tuple(vec.shape)
    with torch.no_grad():
        vec.data = vec.data.reshape(-1)
        if vec.grad is not None:
            vec.grad = vec.grad.reshape(-1)
    setattr(new, attr, vec)
    return vec, old_shape


def _reshape_optimizer_state(optimizer, reshaped) -> None:
    for param, old_shape in reshaped:
        state = optimizer.state.get(param)
        if not state:
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and tuple(value.shape) == old_shape:
                state[key] = value.reshape(-1)


def from_peft(peft_model: nn.Module, *, backend: Optional[str] = None, optimizer=None) -> nn.Module:
    """Convert a peft model's LoRA and IA3 layers into fastpeft layers, in place.

    Every ``peft.tuners.lora.Linear`` (plain LoRA or rsLoRA, any ``lora_dropout``, any ``bias``
    setting) becomes a :class:`fastpeft.LoRALinear` and every ``peft.tuners.ia3.Linear`` an
    :class:`fastpeft.IA3Linear` (feed-forward layers scale inputs: ``ia3_in``; others outputs:
    ``ia3_out``).  The new layers hold the very same Parameter objects as peft's (``lora_A.weight``
    becomes ``lora_A``, ``base_layer.weight`` becomes ``weight``, ...), with their ``requires_grad``
    flags, so an optimizer built before the conversion keeps training them; outputs are unchanged
    (in train mode the LoRA dropout mask is fastpeft's own, so only its distribution matches).

    IA3 vectors keep their Parameter object but are reshaped from peft's [N, 1] / [1, K] to [N] /
    [K] (a view of the same storage).  Optimizer state already created for them (e.g. Adam
    moments after a step) must follow: pass ``optimizer=`` and it is reshaped too.

    Unsupported peft features raise ``NotImplementedError`` naming the feature: DoRA and other
    LoRA variants, ``lora_bias``, several active adapters (or several adapters loaded on a layer),
    disabled or merged adapters.  Layers fastpeft has no kernel for (LoRA/IA3 on Embedding or
    Conv layers, GPT-2 style Conv1D base layers, quantized base layers, other peft methods) and
    ``modules_to_save`` wrappers stay on peft's path, with a warning.

    Args:
        peft_model: a ``peft.PeftModel``, a tuner (``LoraModel``/``IA3Model``) or a model with peft
            layers injected (``peft.inject_adapter_in_model``).
        backend: backend of the new layers (None: the global choice).
        optimizer: optional optimizer whose state is reshaped along with the IA3 vectors.

    Returns:
        The underlying model (``peft_model.get_base_model()`` for a PeftModel) with the peft layers
        replaced.  The PeftModel wrapper shares that module tree, but peft's own methods
        (``save_pretrained``, ``merge_and_unload``, ...) no longer apply to the converted layers: use
        :func:`save_adapter` and :func:`fastpeft.merge` on the returned model.
    """
    _, peft_lora, peft_ia3, BaseTunerLayer, AuxiliaryTrainingWrapper = _import_peft()
    root = _unwrap_peft(peft_model)
    replacements, left, reshaped = [], [], []
    for name, module in root.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            left.append(f"{name} ({type(module).__name__}: modules_to_save / trainable tokens)")
            continue
        if not isinstance(module, BaseTunerLayer):
            continue
        fan_in_fan_out = getattr(module, "fan_in_fan_out", False)
        base = getattr(module, "base_layer", None)
        plain_base = isinstance(base, nn.Linear) and not fan_in_fan_out and not isinstance(base, BaseTunerLayer)
        if type(module) is peft_lora.Linear and plain_base:
            replacements.append((name, _convert_lora(name, module, backend), None))
        elif type(module) is peft_ia3.Linear and plain_base:
            new, vec, attr = _convert_ia3(name, module, backend)
            replacements.append((name, new, (vec, attr)))
        else:
            left.append(f"{name} ({type(module).__module__}.{type(module).__name__} on "
                        f"{type(base).__name__}{', fan_in_fan_out' if fan_in_fan_out else ''})")
    # Every layer passed its checks: only now is anything changed.
    for name, new, ia3 in replacements:
        if ia3 is not None:
            reshaped.append(_attach_ia3(new, *ia3))
        old = root.get_submodule(name)
        new.train(old.training)
        _set_submodule(root, name, new)
    if optimizer is not None:
        _reshape_optimizer_state(optimizer, reshaped)
    if left:
        warnings.warn("from_peft left these layers on peft's path (fastpeft has no kernel for them): "
                      + "; ".join(left), stacklevel=2)
    if not replacements:
        warnings.warn("from_peft found no peft LoRA or IA3 Linear layer to convert", stacklevel=2)
    return root


# ----------------------------------------------------------------------------- save_adapter
def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP (``.module``), torch.compile (``._orig_mod``) and peft wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            unwrapped = _unwrap_peft(model)
            if unwrapped is model:
                return model
            model = unwrapped


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain, contiguous CPU copy (gathers an FSDP2 DTensor shard first)."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.cpu().contiguous().clone()


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _pattern_key(name: str) -> str:
    # peft matches pattern keys with re.match(rf"(.*\.)?({key})$", module_name): an escaped full
    # module name selects exactly that module.
    return re.escape(name)


def _lora_config(layers, bias_mode: str) -> dict:
    ranks = {name: layer.r for name, layer in layers}
    rslora = {layer.use_rslora for _, layer in layers}
    use_rslora = rslora == {True}
    # alpha reproducing each layer's live scale exactly: scale = alpha / r  (or alpha / sqrt(r)).
    alphas = {name: layer.lora_scale * (math.sqrt(layer.r) if use_rslora else layer.r) for name, layer in layers}
    dropouts = {layer.lora_dropout for _, layer in layers}
    if len(dropouts) > 1:
        warnings.warn(f"LoRA layers use different dropout rates {sorted(dropouts)}; peft's config holds one: "
                      f"saving the most common (dropout only matters for further training)", stacklevel=3)
    r = _most_common(ranks.values())
    alpha = _most_common(alphas.values())
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _most_common(layer.lora_dropout for _, layer in layers),
        "use_rslora": use_rslora,
        "target_modules": [name for name, _ in layers],
        "rank_pattern": {_pattern_key(n): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {_pattern_key(n): v for n, v in alphas.items() if v != alpha},
        "bias": bias_mode,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def save_adapter(model: nn.Module, directory, *, base_model_name_or_path: Optional[str] = None) -> None:
    """Write the model's fastpeft adapters as a peft checkpoint in ``directory``.

    Writes ``adapter_model.safetensors`` and ``adapter_config.json`` exactly as peft 0.21's
    ``save_pretrained`` does, so ``peft.PeftModel.from_pretrained(base, directory)`` (and
    :func:`load_adapter`) restore the same outputs.  Module paths are relative to ``model`` (DDP,
    torch.compile and peft wrappers are looked through): save from the same model class you will
    load into.

    LoRA: per-layer ranks and scales go to ``rank_pattern``/``alpha_pattern``; the ``bias`` setting
    is read from the trainable biases ("lora_only" when only adapted layers train theirs, "all"
    when others do, else "none").  IA3: ``ia3_in`` layers are listed as ``feedforward_modules``.

    Raises ``ValueError`` for what peft cannot express: sparse deltas, LoRA and IA3 (or IA3 on
    both sides) in one model/layer, a trainable bias on a layer whose base had none.  Other
    trainable parameters (a classifier head, LayerNorm weights) are not part of the adapter and
    are skipped with a warning.  Under torch.distributed every rank must call it (FSDP2 shards are
    gathered); rank 0 writes.
    """
    model = _unwrap(model)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, PEFTLinear)]
    lora = [(n, m) for n, m in layers if m.lora_A is not None]
    ia3 = [(n, m) for n, m in layers if m.ia3_in is not None or m.ia3_out is not None]
    sparse = [n for n, m in layers if m.sparse_value is not None]
    if sparse:
        raise ValueError(f"peft has no format for sparse deltas (layers {sparse[:3]}...); save_adapter writes "
                         "LoRA or IA3 adapters only")
    if lora and ia3:
        raise ValueError("peft stores one method per adapter: this model has both LoRA "
                         f"({lora[0][0]}, ...) and IA3 ({ia3[0][0]}, ...) layers")
    if not lora and not ia3:
        raise ValueError("the model has no fastpeft LoRA or IA3 layer to save")
    adapter_params = set()
    tensors = {}
    if lora:
        lora_names = {n for n, _ in lora}
        for name, layer in lora:
            tensors[f"{_PREFIX}{name}.lora_A.weight"] = _full(layer.lora_A)
            tensors[f"{_PREFIX}{name}.lora_B.weight"] = _full(layer.lora_B)
            adapter_params |= {id(layer.lora_A), id(layer.lora_B)}
        # Biases: the state-dict key of an adapted layer's bias lives on peft's base_layer.
        biases = {}
        for pname, p in model.named_parameters():
            if pname == "bias" or pname.endswith(".bias"):
                owner = pname[:-len(".bias")] if "." in pname else ""
                biases[pname] = (owner, p)
        trainable = [(pn, owner) for pn, (owner, p) in biases.items() if p.requires_grad]
        if not trainable:
            bias_mode = "none"
        elif all(owner in lora_names for _, owner in trainable):
            bias_mode = "lora_only"
        else:
            bias_mode = "all"
        for pname, (owner, p) in biases.items():
            if bias_mode == "none" or (bias_mode == "lora_only" and owner not in lora_names):
                continue
            key = f"{_PREFIX}{owner}.base_layer.bias" if owner in lora_names else f"{_PREFIX}{pname}"
            tensors[key] = _full(p)
            adapter_params.add(id(p))
        config = _lora_config(lora, bias_mode)
    else:
        for name, layer in ia3:
            if layer.ia3_in is not None and layer.ia3_out is not None:
                raise ValueError(f"{name}: IA3 on both inputs and outputs of one layer has no peft format")
            if layer.ia3_in is not None:
                tensors[f"{_PREFIX}{name}.ia3_l"] = _full(layer.ia3_in).reshape(1, -1)
                adapter_params.add(id(layer.ia3_in))
            else:
                tensors[f"{_PREFIX}{name}.ia3_l"] = _full(layer.ia3_out).reshape(-1, 1)
                adapter_params.add(id(layer.ia3_out))
        config = {
            "peft_type": "IA3",
            "task_type": None,
            "base_model_name_or_path": None,
            "inference_mode": True,
            "target_modules": [n for n, _ in ia3],
            "feedforward_modules": [n for n, m in ia3 if m.ia3_in is not None],
            "fan_in_fan_out": False,
            "init_ia3_weights": True,
            "modules_to_save": None,
        }
    config["base_model_name_or_path"] = base_model_name_or_path
    skipped = [pn for pn, p in model.named_parameters() if p.requires_grad and id(p) not in adapter_params]
    if skipped:
        warnings.warn(f"save_adapter: trainable parameters outside the peft adapter are not saved: {skipped[:5]}"
                      f"{' ...' if len(skipped) > 5 else ''}", stacklevel=2)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    st = _import_safetensors()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    st.save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    with open(directory / CONFIG_NAME, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


# ----------------------------------------------------------------------------- load_adapter
# Config fields that change what a peft checkpoint means; fastpeft loads only their default.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (use_dora=True)", "lora_bias": "lora_bias=True", "fan_in_fan_out": "fan_in_fan_out=True",
    "use_qalora": "QA-LoRA", "use_bdlora": "BD-LoRA", "arrow_config": "Arrow", "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA", "alora_invocation_tokens": "aLoRA",
    "layer_replication": "layer_replication", "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable_token_indices", "target_parameters": "target_parameters",
}


def _pattern_value(patterns: dict, name: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_checkpoint(directory: Path) -> dict:
    path = directory / WEIGHTS_NAME
    if path.is_file():
        return _import_safetensors().load_file(str(path))
    legacy = directory / "adapter_model.bin"
    if legacy.is_file():
        return torch.load(str(legacy), map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or adapter_model.bin) in {directory}")


def _layer_at(model: nn.Module, path: str, backend: Optional[str], cls=PEFTLinear) -> PEFTLinear:
    """The fastpeft layer at ``path``, replacing a plain nn.Linear there by a ``cls`` (weight/bias reused, frozen)."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise KeyError(f"the checkpoint has an adapter for {path!r}, which the model does not have") from None
    if isinstance(module, PEFTLinear):
        return module
    if type(module) is not nn.Linear:
        raise TypeError(f"{path}: the checkpoint adapts a {type(module).__name__}; fastpeft adapts nn.Linear only")
    layer = cls(module.weight, module.bias, backend=backend)
    layer.weight.requires_grad_(False)
    if layer.bias is not None:
        layer.bias.requires_grad_(False)
    layer.train(module.training)
    _set_submodule(model, path, layer)
    return layer


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"{what}: checkpoint shape {list(src.shape)} does not match the model's {list(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src)


def load_adapter(model: nn.Module, directory, *, backend: Optional[str] = None) -> nn.Module:
    """Load a peft LoRA or IA3 checkpoint (``save_pretrained`` or :func:`save_adapter` output) into ``model``.

    Every module the checkpoint adapts is looked up by path in ``model`` (the base model peft
    wrapped: keys ``base_model.model.<path>...``).  A plain ``nn.Linear`` there is replaced by a
    fastpeft layer reusing its weight and bias; an existing fastpeft layer gets the adapter added
    or, if it already has one of the same shape, overwritten in place (same Parameter objects).
    LoRA scales follow the config (``lora_alpha``, ``alpha_pattern``, ``use_rslora``; the rank is
    the tensors'), and its ``lora_dropout``.  Trained biases in the checkpoint are copied.

    Trainability mirrors :func:`fastpeft.inject`: the loaded adapters (and, per the config's
    ``bias``, the biases) train, everything else is frozen except parameters already trainable
    inside fastpeft layers.  Returns ``model``.

    Raises ``ValueError``/``NotImplementedError`` naming the problem for other peft methods, config
    features fastpeft does not implement (DoRA, lora_bias, modules_to_save, ...), checkpoint keys
    that match nothing in the model, and shape mismatches: nothing is ignored silently.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    config = json.loads(config_path.read_text())
    peft_type = config.get("peft_type")
    if peft_type not in ("LORA", "IA3"):
        raise NotImplementedError(f"peft_type {peft_type!r} is not supported by fastpeft.load_adapter (LORA, IA3 are)")
    for field, feature in _UNSUPPORTED_FIELDS.items():
        if config.get(field):
            raise NotImplementedError(f"the checkpoint uses {feature}, which fastpeft does not support")
    state = {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: v for k, v in _read_checkpoint(directory).items()}
    already_trainable = {id(p) for m in model.modules() if isinstance(m, PEFTLinear)
                         for p in m.parameters() if p.requires_grad}
    loaded = []
    if peft_type == "LORA":
        loaded += _load_lora(model, config, state, backend)
    else:
        loaded += _load_ia3(model, config, state, backend)
    keep = already_trainable | {id(p) for p in loaded}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    if peft_type == "LORA" and config.get("bias", "none") == "all":
        for pname, p in model.named_parameters():
            if pname == "bias" or pname.endswith(".bias"):
                p.requires_grad_(True)
    return model


def _load_lora(model, config, state, backend):
    pairs, biases = {}, {}
    for key, value in state.items():
        for suffix in (".lora_A.weight", ".lora_B.weight"):
            if key.endswith(suffix):
                pairs.setdefault(key[:-len(suffix)], {})[suffix[1:7]] = value
                break
        else:
            if key.endswith(".bias"):
                biases[key] = value
            elif "lora_embedding" in key or "lora_magnitude" in key:
                raise NotImplementedError(f"checkpoint key {key!r}: LoRA on embeddings / DoRA is not supported")
            else:
                raise ValueError(f"checkpoint key {key!r} is not a LoRA tensor fastpeft understands")
    use_rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0))
    loaded = []
    for path, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{path}: the checkpoint has {sorted(ab)} but LoRA needs both lora_A and lora_B")
        A, B = ab["lora_A"], ab["lora_B"]
        r = int(A.shape[0])
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8)))
        layer = _layer_at(model, path, backend, LoRALinear)
        if layer.lora_A is None:
            layer.add_lora(r, alpha, dropout, use_rslora)
        elif layer.r != r:
            raise ValueError(f"{path}: the model's LoRA has rank {layer.r}, the checkpoint's {r}")
        layer.r, layer.lora_alpha, layer.use_rslora, layer.lora_dropout = r, alpha, use_rslora, dropout
        layer.lora_scale = alpha / (math.sqrt(r) if use_rslora else r)
        _copy(layer.lora_A, A, f"{path}.lora_A")
        _copy(layer.lora_B, B, f"{path}.lora_B")
        loaded += [layer.lora_A, layer.lora_B]
    for key, value in biases.items():
        if key.endswith(".base_layer.bias"):
            path = key[:-len(".base_layer.bias")]
            target = model.get_submodule(path).bias if path in pairs else None
        else:
            try:
                target = model.get_parameter(key)
            except AttributeError:
                target = None
        if target is None:
            raise KeyError(f"the checkpoint has bias {key!r}, which the model does not have")
        _copy(target, value, key)
        loaded.append(target)
    return loaded


def _is_feedforward(path: str, feedforward) -> bool:
    # peft's IA3Model._check_target_module_feedforward: a regex must match the whole path, a list
    # entry only has to end it (no "." boundary).
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, path) is not None
    return any(path.endswith(t) for t in feedforward)


def _load_ia3(model, config, state, backend):
    feedforward = config.get("feedforward_modules") or []
    loaded = []
    for key, value in state.items():
        if not key.endswith(".ia3_l"):
            raise ValueError(f"checkpoint key {key!r} is not an IA3 tensor fastpeft understands")
        path = key[:-len(".ia3_l")]
        layer = _layer_at(model, path, backend, IA3Linear)
        # peft: feed-forward layers hold [1, K] (input scales), the others [N, 1] (output scales).
        position = "in" if _is_feedforward(path, feedforward) else "out"
        expected = (1, layer.in_features) if position == "in" else (layer.out_features, 1)
        if tuple(value.shape) != expected:
            raise ValueError(f"{key}: IA3 on the {position}puts of a [{layer.out_features}, {layer.in_features}] "
                             f"layer must be {list(expected)}, the checkpoint has {list(value.shape)}")
        attr = "ia3_in" if position == "in" else "ia3_out"
        if getattr(layer, attr) is None:
            layer.add_ia3(position)
        vec = getattr(layer, attr)
        _copy(vec, value.reshape(-1), key)
        loaded.append(vec)
    return loaded
