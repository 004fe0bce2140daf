"""Read and write peft checkpoints: :func:`save_adapter`, :func:`load_adapter`.

* :func:`save_adapter` writes ``adapter_model.safetensors`` + ``adapter_config.json`` in peft's own
  format, so ``peft.PeftModel.from_pretrained(base, directory)`` loads them.
* :func:`load_adapter` reads a peft LoRA or IA3 checkpoint into a model, injecting fastpeft layers
  where the model still has plain ``nn.Linear`` ones.

safetensors is an optional extra (``pip install fastpeft[peft]``), imported inside these functions.

Checkpoint format (peft 0.21): tensor keys are ``base_model.model.<module path>.<name>`` with
``lora_A.weight`` [r, K], ``lora_B.weight`` [N, r] for LoRA, ``ia3_l`` [N, 1] (outputs) or [1, K]
(feed-forward inputs) for IA3, and, with LoRA ``bias="lora_only"``/``"all"``, the trained biases
(``<path>.base_layer.bias`` for adapted layers, ``<path>.bias`` for the others).  LoRA scale:
``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), per layer via ``rank_pattern`` /
``alpha_pattern``.

Inits that rewrite the base weight (``init_lora_weights`` = "pissa", "olora", "corda", "loftq",
"lora_ga"): peft leaves the base holding a residual ``W - scale * B0 A0`` that a checkpoint of A
and B does not carry; its config keeps the init's name and ``from_pretrained`` re-runs the init on
the original base.  fastpeft does the same (see :func:`save_adapter`, :func:`load_adapter`).

Both functions check (and serialise) everything before they change anything: when they raise,
the model and the checkpoint directory are exactly as they were.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import uuid
import warnings
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from fastpeft.methods.adapters import adapter_of, attach_adapter
from fastpeft.nn.inject import _set_submodule
from fastpeft.nn.modules import IA3Linear, LoRALinear, PEFTLinear

_INSTALL_HINT = "pip install fastpeft[peft]"
_PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"

# peft 0.21 (LoraLayer.update_layer): these inits write a residual into the base weight.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Attribute, on a fastpeft layer, of the peft init that rewrote its base weight (a dict of config fields).
_INIT_ATTR = "_peft_init"


def _import_safetensors():
    try:
        import safetensors.torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"peft checkpoints are safetensors files: {_INSTALL_HINT}") from exc
    return safetensors.torch


def _rewrites_base(init) -> bool:
    return isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS)


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The plain model under a PeftModel / LoraModel / IA3Model (or ``model`` itself)."""
    if hasattr(model, "get_base_model") and type(model).__module__.startswith("peft."):
        model = model.get_base_model()
    elif type(model).__module__.startswith("peft.tuners.") and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model  # a bare LoraModel / IA3Model
    return model


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
    # Plain Python numbers only (a scale set as a numpy or tensor value must not break json).
    ranks = {name: int(layer.r) for name, layer in layers}
    use_rslora = {bool(layer.use_rslora) for _, layer in layers} == {True}
    # alpha reproducing each layer's live scale exactly: scale = alpha / r  (or alpha / sqrt(r)).
    alphas = {name: float(layer.lora_scale) * (math.sqrt(ranks[name]) if use_rslora else ranks[name])
              for name, layer in layers}
    dropouts = [float(layer.lora_dropout) for _, layer in layers]
    if len(set(dropouts)) > 1:
        warnings.warn(f"LoRA layers use different dropout rates {sorted(set(dropouts))}; peft's config holds one: "
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
        "lora_dropout": _most_common(dropouts),
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


def _lora_init(layers) -> Optional[dict]:
    """The base-rewriting init the LoRA layers share (None: the plain init); raise when they differ."""
    records = {json.dumps(getattr(m, _INIT_ATTR, None), sort_keys=True, default=str): (n, getattr(m, _INIT_ATTR, None))
               for n, m in layers}
    if len(records) > 1:
        found = ", ".join(f"{n!r}: init_lora_weights={(rec or {}).get('init_lora_weights', True)!r}"
                          for n, rec in records.values())
        raise ValueError(f"peft's config holds one init_lora_weights, these layers differ ({found}); a base-rewriting "
                         "init cannot be written for some layers only: convert the adapter to plain LoRA with peft "
                         "(save_pretrained(path_initial_model_for_weight_conversion=...)) before from_peft")
    return next(iter(records.values()))[1]


def _as_path(value, what: str) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{what} must be a str or os.PathLike, got {type(value).__name__}")
    return Path(value)


def _write_files(directory: Path, files: dict) -> None:
    """Put ``files`` ({name: bytes}) into ``directory``, all or nothing.

    Each file is written in full to a temporary file in the directory, then swapped in with
    ``os.replace`` (atomic).  Should a swap fail, the files already swapped are put back from
    hard-link (or copy) backups; temporary files are removed in every case.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex
    temps, backups, swapped = {}, {}, []
    try:
        for name, data in files.items():
            temps[name] = directory / f".{name}.{tag}.tmp"
            with open(temps[name], "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for name in files:
            target = directory / name
            if target.exists():
                backups[name] = directory / f".{name}.{tag}.bak"
                try:
                    os.link(target, backups[name])
                except OSError:
                    shutil.copy2(target, backups[name])
        try:
            for name, tmp in temps.items():
                os.replace(tmp, directory / name)
                swapped.append(name)
        except BaseException:
            for name in swapped:
                if name in backups:
                    os.replace(backups.pop(name), directory / name)
                else:
                    os.unlink(directory / name)
            raise
    finally:
        for path in [*temps.values(), *backups.values()]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


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
    Layers converted by :func:`from_peft` (or loaded by :func:`load_adapter`) from a base-rewriting
    init keep it: the config names the init (``init_lora_weights="pissa"``, with its
    ``loftq_config``/``corda_config``/... when there is one), exactly as peft writes it, so loading
    re-runs the init on the original base.  :func:`load_adapter` re-runs "pissa" and "olora"; for
    the others a warning says so.

    Everything is checked and serialised in memory first, then both files are swapped in
    atomically (temporary files + ``os.replace``): when it raises, an existing checkpoint in
    ``directory`` is left as it was.

    Raises ``TypeError`` for a ``directory`` / ``base_model_name_or_path`` that is not a str or
    path, ``ValueError`` for what peft cannot express: sparse deltas, LoRA and IA3 (or IA3 on both
    sides) in one model/layer, layers with different base-rewriting inits, a trainable bias on a
    layer whose base had none.  Other trainable parameters (a classifier head, LayerNorm weights)
    are not part of the adapter and are skipped with a warning.  Under torch.distributed every rank
    must call it (FSDP2 shards are gathered); rank 0 writes.
    """
    directory = _as_path(directory, "directory")
    if base_model_name_or_path is not None:
        base_model_name_or_path = os.fspath(_as_path(base_model_name_or_path, "base_model_name_or_path"))
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"directory {str(directory)!r} is a file, not a directory")
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
        init = _lora_init(lora)
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
        if init is not None:
            config.update(init)
            if init["init_lora_weights"].lower() not in _RERUNNABLE_INITS:
                name = init["init_lora_weights"]
                warnings.warn(f"save_adapter: init_lora_weights={name!r} rewrote the base weights; the checkpoint "
                              "names it as peft does, but fastpeft.load_adapter cannot re-run it: peft recommends "
                              "converting such adapters to plain LoRA (save_pretrained("
                              "path_initial_model_for_weight_conversion=...))", stacklevel=2)
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
    # Serialise everything in memory (on every rank: the same errors everywhere), then write.
    files = {WEIGHTS_NAME: _import_safetensors().save(tensors, metadata={"format": "pt"}),
             CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True).encode()}
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    _write_files(directory, files)


# ----------------------------------------------------------------------------- load_adapter
# Config fields that change what a peft checkpoint means; fastpeft loads only their default.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (use_dora=True)", "lora_bias": "lora_bias=True", "fan_in_fan_out": "fan_in_fan_out=True",
    "use_qalora": "QA-LoRA", "use_bdlora": "BD-LoRA", "arrow_config": "Arrow", "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA", "alora_invocation_tokens": "aLoRA",
    "layer_replication": "layer_replication", "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable_token_indices", "target_parameters": "target_parameters",
}


def _pissa_residual(weight: torch.Tensor, r: int, scale: float) -> torch.Tensor:
    # peft 0.21 LoraLayer.pissa_init ("pissa": exact SVD), step for step.
    w = weight.detach().to(torch.float32)
    V, S, Uh = torch.linalg.svd(w, full_matrices=False)
    Vr, Sr, Uhr = V[:, :r], S[:r], Uh[:r]
    Sr /= scale
    lora_A = torch.diag(torch.sqrt(Sr)) @ Uhr
    lora_B = Vr @ torch.diag(torch.sqrt(Sr))
    return (w - scale * lora_B @ lora_A).to(weight.dtype)


def _olora_residual(weight: torch.Tensor, r: int, scale: float) -> torch.Tensor:
    # peft 0.21 LoraLayer.olora_init, step for step.
    w = weight.detach().to(torch.float32).clone()
    Q, R = torch.linalg.qr(w)
    w -= scale * Q[:, :r].contiguous() @ R[:r].contiguous()
    return w.to(weight.dtype)


# The base-rewriting inits load_adapter re-runs as peft's from_pretrained does (deterministic ones).
_RERUNNABLE_INITS = {"pissa": _pissa_residual, "olora": _olora_residual}


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


def _check_unmerged(model: nn.Module, path: str) -> None:
    module = model.get_submodule(path)
    if isinstance(module, PEFTLinear) and module.merged:
        raise RuntimeError(f"load_adapter: layer {path!r} is merged (its weight holds its current adapter); loading "
                           "over it would leave the old adapter in the weight for good: call fastpeft.unmerge(model) "
                           "(or the layer's unmerge()) first, and merge again after loading")


def _target(model: nn.Module, path: str) -> nn.Module:
    """The module at ``path`` the checkpoint adapts: a fastpeft layer (unmerged) or a plain nn.Linear."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise KeyError(f"the checkpoint has an adapter for {path!r}, which the model does not have") from None
    if not isinstance(module, PEFTLinear) and type(module) is not nn.Linear:
        raise TypeError(f"{path}: the checkpoint adapts a {type(module).__name__}; fastpeft adapts nn.Linear only")
    _check_unmerged(model, path)
    return module


def _layer_at(model: nn.Module, path: str, backend: Optional[str], cls) -> PEFTLinear:
    """The fastpeft layer at ``path``, replacing a plain nn.Linear there by a ``cls`` (weight/bias reused, frozen)."""
    module = model.get_submodule(path)
    if isinstance(module, PEFTLinear):
        return module
    layer = cls(module.weight, module.bias, backend=backend)
    layer.weight.requires_grad_(False)
    if layer.bias is not None:
        layer.bias.requires_grad_(False)
    layer.train(module.training)
    adapter = adapter_of(module)
    if adapter is not None:  # a bottleneck adapter attached to the nn.Linear moves onto its replacement
        attach_adapter(layer, adapter)
    _set_submodule(model, path, layer)
    return layer


def _check_shape(src: torch.Tensor, shape, what: str) -> None:
    if tuple(src.shape) != tuple(shape):
        raise ValueError(f"{what}: checkpoint shape {list(src.shape)} does not match the model's {list(shape)}")


def _copy(dst: torch.Tensor, src: torch.Tensor) -> list:
    with torch.no_grad():
        dst.copy_(src)
    return [dst]


def load_adapter(model: nn.Module, directory, *, backend: Optional[str] = None) -> nn.Module:
    """Load a peft LoRA or IA3 checkpoint (``save_pretrained`` or :func:`save_adapter` output) into ``model``.

    Every module the checkpoint adapts is looked up by path in ``model`` (the base model peft
    wrapped: keys ``base_model.model.<path>...``).  A plain ``nn.Linear`` there is replaced by a
    fastpeft layer reusing its weight and bias; an existing fastpeft layer gets the adapter added
    or, if it already has one of the same shape, overwritten in place (same Parameter objects).
    LoRA scales follow the config (``lora_alpha``, ``alpha_pattern``, ``use_rslora``; the rank is
    the tensors'), and its ``lora_dropout``.  Trained biases in the checkpoint are copied.

    Base-rewriting inits are handled as peft's ``from_pretrained`` handles them: for
    ``init_lora_weights="pissa"`` and ``"olora"`` the init is re-run on the layer's (original)
    weight, which then holds the residual peft's training started from, before the trained A and
    B are loaded; this needs a plain ``nn.Linear`` there (a fastpeft layer's weight may already be
    a residual: ``ValueError``).  Inits fastpeft cannot re-run exactly ("pissa_niter_*", "corda",
    "loftq", "lora_ga") raise ``NotImplementedError`` naming the init.

    Trainability mirrors :func:`fastpeft.inject`: the loaded adapters (and, per the config's
    ``bias``, the biases) train, everything else is frozen except parameters already trainable
    inside fastpeft layers.  Returns ``model``.

    Everything is checked before anything changes; when it raises, the model is exactly as it was.
    Raises ``ValueError``/``NotImplementedError`` naming the problem for other peft methods, config
    features fastpeft does not implement (DoRA, lora_bias, modules_to_save, ...), bad config values
    (``lora_dropout`` outside [0, 1), ...), shape mismatches; ``KeyError`` for checkpoint keys that
    match nothing in the model; ``RuntimeError`` for a merged fastpeft layer the checkpoint
    adapts (unmerge it first: loading into it would leave the old adapter in its weight).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    directory = _as_path(directory, "directory")
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
    init = config.get("init_lora_weights", True) if peft_type == "LORA" else True
    if _rewrites_base(init) and init.lower() not in _RERUNNABLE_INITS:
        raise NotImplementedError(
            f"the checkpoint was trained from init_lora_weights={init!r}, which rewrote the base weights; fastpeft "
            f"re-runs only {sorted(_RERUNNABLE_INITS)} on load. Convert the adapter to plain LoRA with peft "
            "(save_pretrained(path_initial_model_for_weight_conversion=...)) and load that")
    state = {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: v for k, v in _read_checkpoint(directory).items()}
    # 1. check everything and plan the changes; 2. apply them (nothing there can fail).
    steps = (_plan_lora if peft_type == "LORA" else _plan_ia3)(model, config, state, backend)
    already_trainable = {id(p) for m in model.modules() if isinstance(m, PEFTLinear)
                         for p in m.parameters() if p.requires_grad}
    loaded = [p for step in steps for p in step()]
    keep = already_trainable | {id(p) for p in loaded}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    if peft_type == "LORA" and config.get("bias", "none") == "all":
        for pname, p in model.named_parameters():
            if pname == "bias" or pname.endswith(".bias"):
                p.requires_grad_(True)
    return model


def _number(config: dict, field: str, default, low=None, high=None) -> float:
    value = config.get(field, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"the checkpoint's {field} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value >= high):
        raise ValueError(f"the checkpoint's {field} must be in [{low}, {high}), got {value!r}")
    return float(value)


def _plan_lora(model, config, state, backend) -> list:
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
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise ValueError(f"the checkpoint's use_rslora must be true or false, got {use_rslora!r}")
    dropout = _number(config, "lora_dropout", 0.0, 0.0, 1.0)
    init = config.get("init_lora_weights", True)
    residual_of = _RERUNNABLE_INITS.get(init.lower()) if _rewrites_base(init) else None
    record = {"init_lora_weights": init} if residual_of is not None else None
    steps = []
    for path, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{path}: the checkpoint has {sorted(ab)} but LoRA needs both lora_A and lora_B")
        A, B = ab["lora_A"], ab["lora_B"]
        if A.dim() != 2 or A.shape[0] == 0:
            raise ValueError(f"{path}.lora_A: expected a [r, in_features] tensor with r > 0, got {list(A.shape)}")
        r = int(A.shape[0])
        alpha = _number({"lora_alpha": _pattern_value(config.get("alpha_pattern") or {}, path,
                                                      config.get("lora_alpha", 8))}, "lora_alpha", 8)
        scale = alpha / (math.sqrt(r) if use_rslora else r)
        module = _target(model, path)
        _check_shape(A, (r, module.in_features), f"{path}.lora_A")
        _check_shape(B, (module.out_features, r), f"{path}.lora_B")
        if isinstance(module, PEFTLinear) and module.lora_A is not None and module.r != r:
            raise ValueError(f"{path}: the model's LoRA has rank {module.r}, the checkpoint's {r}")
        residual = None
        if residual_of is not None:
            if isinstance(module, PEFTLinear):
                raise ValueError(f"init_lora_weights={init!r} rewrites the base weight of {path!r}, which is already "
                                 "a fastpeft layer (its weight may be a residual already): load into the original "
                                 "model, with a plain nn.Linear there")
            residual = residual_of(module.weight, r, scale)
        steps.append(partial(_apply_lora, model, path, backend, A, B,
                             dict(r=r, lora_alpha=alpha, use_rslora=use_rslora, lora_dropout=dropout, lora_scale=scale),
                             residual, record))
    for key, value in biases.items():
        if key.endswith(".base_layer.bias"):
            owner = key[:-len(".base_layer.bias")]
            target = model.get_submodule(owner).bias if owner in pairs else None
        else:
            owner = key.rpartition(".")[0]
            try:
                target = model.get_parameter(key)
            except AttributeError:
                target = None
        if target is None:
            raise KeyError(f"the checkpoint has bias {key!r}, which the model does not have")
        _check_unmerged(model, owner)
        _check_shape(value, target.shape, key)
        steps.append(partial(_copy, target, value))
    return steps


def _apply_lora(model, path, backend, A, B, attrs: dict, residual, record) -> list:
    layer = _layer_at(model, path, backend, LoRALinear)
    if residual is not None:  # the init peft re-runs on load: the base now holds its residual
        with torch.no_grad():
            layer.weight.copy_(residual)
        setattr(layer, _INIT_ATTR, record)
    if layer.lora_A is None:
        layer.lora_A, layer.lora_B = layer._new_param(A), layer._new_param(B)
    else:
        _copy(layer.lora_A, A)
        _copy(layer.lora_B, B)
    for name, value in attrs.items():
        setattr(layer, name, value)
    return [layer.lora_A, layer.lora_B]


def _is_feedforward(path: str, feedforward) -> bool:
    # peft's IA3Model._check_target_module_feedforward: a regex must match the whole path, a list
    # entry only has to end it (no "." boundary).
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, path) is not None
    return any(path.endswith(t) for t in feedforward)


def _plan_ia3(model, config, state, backend) -> list:
    feedforward = config.get("feedforward_modules") or []
    steps = []
    for key, value in state.items():
        if not key.endswith(".ia3_l"):
            raise ValueError(f"checkpoint key {key!r} is not an IA3 tensor fastpeft understands")
        path = key[:-len(".ia3_l")]
        module = _target(model, path)
        # peft: feed-forward layers hold [1, K] (input scales), the others [N, 1] (output scales).
        position = "in" if _is_feedforward(path, feedforward) else "out"
        expected = (1, module.in_features) if position == "in" else (module.out_features, 1)
        if tuple(value.shape) != expected:
            raise ValueError(f"{key}: IA3 on the {position}puts of a [{module.out_features}, {module.in_features}] "
                             f"layer must be {list(expected)}, the checkpoint has {list(value.shape)}")
        steps.append(partial(_apply_ia3, model, path, backend, "ia3_in" if position == "in" else "ia3_out",
                             value.reshape(-1)))
    return steps


def _apply_ia3(model, path, backend, attr: str, value: torch.Tensor) -> list:
    layer = _layer_at(model, path, backend, IA3Linear)
    if getattr(layer, attr) is None:
        setattr(layer, attr, layer._new_param(value))
        return [getattr(layer, attr)]
    return _copy(getattr(layer, attr), value)
