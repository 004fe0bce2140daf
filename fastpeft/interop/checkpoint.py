"""Read and write peft checkpoints: :func:`save_adapter`, :func:`load_adapter`.

* :func:`save_adapter` writes ``adapter_model.safetensors`` + ``adapter_config.json`` in peft's own
  format, so ``peft.PeftModel.from_pretrained(base, directory)`` loads them.
* :func:`load_adapter` reads a peft LoRA or IA3 checkpoint into a model, injecting fastpeft layers
  where the model still has plain ``nn.Linear`` ones.

safetensors is an optional extra (``pip install fastpeft[peft]``), imported inside these functions.

Checkpoint format (peft 0.21): tensor keys are ``base_model.model.<module path>.<name>``; which
names, their shapes and the config fields are each path's peft mapping (fastpeft.paths: LoRA's
``lora_A.weight`` [r, K] / ``lora_B.weight`` [N, r] with ``lora_alpha``, ``rank_pattern``, ...;
IA3's ``ia3_l`` [N, 1] / [1, K] with ``feedforward_modules``).  A checkpoint holds one path (its
``peft_type``).  With LoRA ``bias="lora_only"``/``"all"`` it also holds the trained biases
(``<path>.base_layer.bias`` for adapted layers, ``<path>.bias`` for the others).  With
``lora_bias=True`` lora_B's bias is ``<path>.lora_B.bias`` [N] (LoRA's own key, never a trained
base bias).  A transformers Conv1D base (GPT-2) is written and read like an nn.Linear (A and B
do not depend on the layout); its config says ``fan_in_fan_out: true`` as peft's does.  LoRA on an
embedding (fastpeft.LoRAEmbedding) is ``<path>.lora_embedding_A`` [r, V] / ``.lora_embedding_B``
[N, r].  ``modules_to_save`` (modules trained and saved in full: a head) are the config's
``modules_to_save`` list and each module's state_dict under ``<path>.<key>``, as peft 0.21 writes
them (peft maps them to ``<path>.modules_to_save.<adapter>.<key>`` on load).

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
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from fastpeft.methods.heads import is_modules_to_save, modules_saved_in_full, save_in_full, saved_copy
from fastpeft.nn.config import matches
from fastpeft.nn.embedding import LoRAEmbedding
from fastpeft.nn.inject import check_replaceable, replacement, set_submodule, swap_in
from fastpeft.nn.modules import PEFTLinear, is_conv1d
from fastpeft.nn.pretrained import remember_pretrained, trainable_adapter_params
from fastpeft.paths import DISPLAY_ORDER, PATHS
from fastpeft.paths.base import lookup, new_param
from fastpeft.paths.lora import rewrites_base

__all__ = ["save_adapter", "load_adapter", "unwrap_peft", "WEIGHTS_NAME", "CONFIG_NAME", "INSTALL_HINT"]

INSTALL_HINT = "pip install fastpeft[peft]"
_PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_NAMED_ORDER = DISPLAY_ORDER  # messages name paths outermost first: LoRA, IA3, ...
# The paths peft has a format for, by peft_type ("LORA": LoRA and the paths that extend its format).
_FAMILIES: dict = {}
for _p in PATHS:
    if _p.peft_type is not None:
        _FAMILIES.setdefault(_p.peft_type, []).append(_p)
_PEFT_LABELS = " or ".join(p.label for p in _NAMED_ORDER if p.peft_type is not None and _FAMILIES[p.peft_type][0] is p)


def _import_safetensors():
    try:
        import safetensors.torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"peft checkpoints are safetensors files: {INSTALL_HINT}") from exc
    return safetensors.torch


def unwrap_peft(model: nn.Module) -> nn.Module:
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
            unwrapped = unwrap_peft(model)
            if unwrapped is model:
                return model
            model = unwrapped


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain, contiguous CPU copy (gathers an FSDP2 DTensor shard first)."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.cpu().contiguous().clone()


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


def _saved_biases(model: nn.Module, adapted: set, tensors: dict, saved: set) -> str:
    """peft's LoRA ``bias`` mode of the model's trainable biases; put them into ``tensors``.

    "lora_only" when only adapted layers train theirs, "all" when others do, else "none".  The
    state-dict key of an adapted layer's bias lives on peft's base_layer.
    """
    biases = {}
    for pname, p in model.named_parameters():
        if (pname == "bias" or pname.endswith(".bias")) and id(p) not in saved:  # not a module saved in full
            biases[pname] = (pname[:-len(".bias")] if "." in pname else "", p)
    trainable = [owner for owner, p in biases.values() if p.requires_grad]
    if not trainable:
        return "none"
    mode = "lora_only" if all(owner in adapted for owner in trainable) else "all"
    for pname, (owner, p) in biases.items():
        if mode == "lora_only" and owner not in adapted:
            continue
        key = f"{_PREFIX}{owner}.base_layer.bias" if owner in adapted else f"{_PREFIX}{pname}"
        tensors[key] = _full(p)
        saved.add(id(p))
    return mode


def _saved_in_full(model: nn.Module, tensors: dict, saved: set) -> list:
    """peft's ``modules_to_save``: every module saved in full (fastpeft.methods.heads.modules_saved_in_full:
    marked by ``save_in_full``, or a peft ModulesToSaveWrapper's active copy) has its state_dict written
    under ``<path>.<key>``, as peft 0.21 writes it; returns their paths for the config."""
    names = []
    for name, module in modules_saved_in_full(model):
        tensors.update({f"{_PREFIX}{name}.{key}": _full(t) for key, t in module.state_dict(keep_vars=True).items()})
        saved.update(id(p) for p in module.parameters())
        names.append(name)
    return names


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
    layer whose base had none.  Modules saved in full are written as peft's ``modules_to_save``:
    those ``LoRAConfig(modules_to_save=...)`` (or the other configs) named at inject, a
    ``ModelWithHead``'s head, a head loaded by :func:`load_adapter`, and the trained copies of the
    ``ModulesToSaveWrapper`` modules :func:`from_peft` left in place.  Other trainable parameters
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
    embeddings = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRAEmbedding) and m.lora_A is not None]
    by_path = {p: [(n, m) for n, m in layers if p.present(m)] for p in _NAMED_ORDER if p.changes_weight}
    by_path = {p: found for p, found in by_path.items() if found}
    for path, found in by_path.items():
        if path.peft_type is None:
            raise ValueError(f"peft has no format for {path.label}s (layers {[n for n, _ in found][:3]}...); "
                             f"save_adapter writes {_PEFT_LABELS} adapters only")
    kinds = {}  # peft_type -> (first path of that type found, its layers)
    for path, found in by_path.items():
        kinds.setdefault(path.peft_type, (path, found))
    if embeddings:  # LoRA on embeddings (fastpeft.nn.embedding): in peft's LORA format
        kinds.setdefault("LORA", (_FAMILIES["LORA"][0], embeddings))
    if len(kinds) > 1:
        (a, first), (b, second) = list(kinds.values())[:2]
        raise ValueError(f"peft stores one method per adapter: this model has both {a.label} ({first[0][0]}, ...) "
                         f"and {b.label} ({second[0][0]}, ...) layers")
    if not kinds:
        raise ValueError(f"the model has no fastpeft {_PEFT_LABELS} layer to save")
    (peft_type,) = kinds
    config, tensors, saved, adapted = {}, {}, set(), set()
    for path in _FAMILIES[peft_type]:  # its first path writes the base config, the others extend it
        found = by_path.get(path, [])
        tables = embeddings if path is _FAMILIES[peft_type][0] and peft_type == "LORA" else []
        if not found and not tables:
            continue
        config.update(path.peft_config(found + tables))
        for name, layer in found:
            tensors.update({_PREFIX + key: t for key, t in path.peft_tensors(name, layer, _full).items()})
            saved.update(id(p) for p in path.params(layer))
            adapted.add(name)
        for name, layer in tables:  # <name>.lora_embedding_A / _B, as peft writes them
            tensors.update({_PREFIX + key: t for key, t in layer.peft_tensors(name, _full).items()})
            saved.update((id(layer.lora_A), id(layer.lora_B)))
    modules_to_save = _saved_in_full(model, tensors, saved)
    if any(p.peft_biases for p in _FAMILIES[peft_type]):
        config["bias"] = _saved_biases(model, adapted, tensors, saved)
    config = {"task_type": None, "inference_mode": True, **config, "modules_to_save": modules_to_save or None,
              "base_model_name_or_path": base_model_name_or_path}
    skipped = [pn for pn, p in model.named_parameters() if p.requires_grad and id(p) not in saved]
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
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices", "target_parameters": "target_parameters",
}


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
    if not isinstance(module, PEFTLinear) and type(module) is not nn.Linear and not is_conv1d(module):
        raise TypeError(f"{path}: the checkpoint adapts a {type(module).__name__}; fastpeft adapts nn.Linear (and "
                        "transformers Conv1D) only")
    _check_unmerged(model, path)
    return module


def _plan_layer(model, path, config, mpath: str, tensors: dict, backend, layers: dict) -> dict:
    """Everything loading one path of one layer does, checked and built off the model: the layer (the
    model's, or its replacement, shared by the paths of that layer through ``layers``), the path's
    parts, the values to copy into existing tensors, a new base weight."""
    module = _target(model, mpath)
    if is_conv1d(module) and mpath not in layers and path.name != "lora":
        raise NotImplementedError(f"{mpath}: loading a {path.label} checkpoint onto a transformers Conv1D is not "
                                  "supported (LoRA is)")
    # a later path of a layer planned already (DoRA after LoRA) reads the planned fastpeft layer
    values, options, base = path.peft_read(config, mpath, tensors, layers.get(mpath, module))
    if mpath not in layers:  # a plain nn.Linear: its replacement keeps weight, bias and bottleneck adapter (or raises)
        layers[mpath] = module if isinstance(module, PEFTLinear) else replacement(mpath, module, path.name, backend)
    layer = layers[mpath]
    own, copies = {}, []
    for name, value in values.items():
        current = getattr(layer, name)
        if current is not None and tuple(current.shape) == tuple(value.shape):
            own[name] = current  # overwritten in place: the same Parameter objects
            copies.append((current, value))
        else:
            own[name] = new_param(layer, value)
    parts = path.adopt(layer, **own, **options)
    return dict(name=mpath, path=path, layer=layer, replaced=module, parts=parts, copies=copies, base=base)


def _check_required(plans: list) -> None:
    """Each planned path's ``requires`` (DoRA needs LoRA) is on the layer already or in the checkpoint."""
    loaded = {(plan["name"], plan["path"].name) for plan in plans}
    for plan in plans:
        for needed in plan["path"].requires:
            if (plan["name"], needed) not in loaded and not lookup(needed).present(plan["layer"]):
                raise ValueError(f"{plan['name']}: the checkpoint has a {plan['path'].label} part for this layer but "
                                 f"no {lookup(needed).label} part, and the model's layer has none "
                                 f"({plan['path'].label} needs {lookup(needed).label})")


def _plan_embedding(model, lora, config, mpath: str, tensors: dict, backend) -> dict:
    """LoRA on the embedding at ``mpath`` (peft's lora_embedding_A [r, V] / _B [N, r]), checked and built
    off the model: a plain nn.Embedding gets a LoRAEmbedding over its table, a LoRAEmbedding is
    loaded into (in place when the shapes agree)."""
    try:
        module = model.get_submodule(mpath)
    except AttributeError:
        raise KeyError(f"the checkpoint has an adapter for {mpath!r}, which the model does not have") from None
    if type(module) is not nn.Embedding and not isinstance(module, LoRAEmbedding):
        raise TypeError(f"{mpath}: the checkpoint has LoRA for an embedding (lora_embedding_A / _B) there, the model "
                        f"has a {type(module).__name__}")
    if set(tensors) != {"lora_A", "lora_B"}:
        raise ValueError(f"{mpath}: the checkpoint has only {['lora_embedding_' + n[-1] for n in tensors]}; LoRA on an "
                         "embedding needs both lora_embedding_A and lora_embedding_B")
    if rewrites_base(config.get("init_lora_weights", True)):
        raise NotImplementedError(f"{mpath}: init_lora_weights={config['init_lora_weights']!r} on an embedding is not "
                                  "supported by fastpeft.load_adapter")
    if isinstance(module, LoRAEmbedding) and module.merged:
        raise RuntimeError(f"load_adapter: layer {mpath!r} is merged (its table holds its current adapter); call "
                           "fastpeft.unmerge(model) first")
    replaced = None if isinstance(module, LoRAEmbedding) else module
    if replaced is not None:
        check_replaceable(mpath, replaced)
    layer = module if replaced is None else LoRAEmbedding.build(module, backend=backend)
    values, options, _ = lora.peft_read(config, mpath, tensors, layer)  # shapes, rank, alpha_pattern, use_rslora
    own, copies = {}, []
    for name, value in values.items():
        current = getattr(layer, name)
        if current is not None and tuple(current.shape) == tuple(value.shape):
            own[name] = current
            copies.append((current, value))
        else:
            own[name] = new_param(layer, value)
    parts = layer.adopt(own["lora_A"], own["lora_B"], alpha=options["alpha"], use_rslora=options["use_rslora"],
                        dropout=options["dropout"])
    return dict(name=mpath, layer=layer, replaced=replaced, parts=parts, copies=copies)


def _plan_saved_in_full(model, config: dict, state: dict) -> tuple:
    """peft's ``modules_to_save``: the checkpoint keys ``<path>.<key>`` of modules the config lists,
    checked against the model, as [(module, [(its tensor, value)], whether it is the model's own module
    (not a peft wrapper's copy))]; returns (that list, the other keys)."""
    names = config.get("modules_to_save") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"the checkpoint's modules_to_save must be a list of module names, got {names!r}")
    if not names:
        return [], state
    owners = {}  # module path -> {key: value}
    rest = {}
    modules = dict(model.named_modules())
    for key, value in state.items():
        parts = key.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)
                      if ".".join(parts[:i]) in modules and matches(".".join(parts[:i]), names)), None)
        if owner is None:
            rest[key] = value
        else:
            owners.setdefault(owner, {})[key[len(owner) + 1:]] = value
    planned = []
    for owner, values in owners.items():
        module = modules[owner]
        target = saved_copy(module) if is_modules_to_save(module) else module
        if target is None:
            raise ValueError(f"{owner}: peft's ModulesToSaveWrapper there has no single active copy to load into")
        current = target.state_dict(keep_vars=True)
        copies = []
        for key, value in values.items():
            if key not in current:
                raise KeyError(f"the checkpoint has {owner}.{key} (modules_to_save), which the model's {owner!r} "
                               f"({type(target).__name__}) does not have")
            if tuple(current[key].shape) != tuple(value.shape):
                raise ValueError(f"{owner}.{key}: checkpoint shape {list(value.shape)} does not match the model's "
                                 f"{list(current[key].shape)}")
            copies.append((current[key], value))
        planned.append((target, copies, target is module))
    return planned, rest


def _plan_biases(model, biases: dict, adapted: set) -> list:
    copies = []
    for key, value in biases.items():
        if key.endswith(".base_layer.bias"):
            owner = key[:-len(".base_layer.bias")]
            target = model.get_submodule(owner).bias if owner in adapted else None
        else:
            owner = key.rpartition(".")[0]
            try:
                target = model.get_parameter(key)
            except AttributeError:
                target = None
        if target is None:
            raise KeyError(f"the checkpoint has bias {key!r}, which the model does not have")
        _check_unmerged(model, owner)
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{key}: checkpoint shape {list(value.shape)} does not match the model's "
                             f"{list(target.shape)}")
        copies.append((target, value))
    return copies


def load_adapter(model: nn.Module, directory, *, backend: Optional[str] = None) -> nn.Module:
    """Load a peft LoRA or IA3 checkpoint (``save_pretrained`` or :func:`save_adapter` output) into ``model``.

    Every module the checkpoint adapts is looked up by path in ``model`` (the base model peft
    wrapped: keys ``base_model.model.<path>...``).  A plain ``nn.Linear`` there is replaced by a
    fastpeft layer reusing its weight and bias (and keeping a bottleneck adapter attached to it; a
    linear that carries other hooks or submodules is refused, as ``fastpeft.inject`` refuses it);
    an existing fastpeft layer gets the adapter added or, if it already has one of the same shape,
    overwritten in place (same Parameter objects).  LoRA scales follow the config (``lora_alpha``,
    ``alpha_pattern``, ``use_rslora``; the rank is the tensors'), and its ``lora_dropout``.  Trained
    biases in the checkpoint are copied.  LoRA on an ``nn.Embedding`` (``lora_embedding_A`` / ``_B``)
    makes it a :class:`fastpeft.LoRAEmbedding` over the same table.  ``modules_to_save`` tensors are
    copied in place into the modules the config names (the trained copy of a peft
    ``ModulesToSaveWrapper`` there), which then train and are saved again by :func:`save_adapter`.

    Base-rewriting inits are handled as peft's ``from_pretrained`` handles them: for
    ``init_lora_weights="pissa"`` and ``"olora"`` the init is re-run on the layer's (original)
    weight, which then holds the residual peft's training started from, before the trained A and
    B are loaded; this needs a plain ``nn.Linear`` there (a fastpeft layer's weight may already be
    a residual: ``ValueError``).  Inits fastpeft cannot re-run exactly ("pissa_niter_*", "corda",
    "loftq", "lora_ga") raise ``NotImplementedError`` naming the init.

    Trainability mirrors :func:`fastpeft.inject`: the loaded adapters (and, per the config's
    ``bias``, the biases) train, everything else is frozen except parameters fastpeft modules
    already train (earlier fastpeft layers, bottleneck adapters, prompts).  Returns ``model``.

    Everything is checked before anything changes; when it raises, the model is exactly as it was.
    Raises ``ValueError``/``NotImplementedError`` naming the problem for other peft methods, config
    features fastpeft does not implement (trainable tokens, LoRA variants, ...), bad config values
    (``lora_dropout`` outside [0, 1), ...), shape mismatches, a replaced linear's foreign hooks;
    ``KeyError`` for checkpoint keys that match nothing in the model; ``RuntimeError`` for a merged
    fastpeft layer the checkpoint adapts (unmerge it first: loading into it would leave the old
    adapter in its weight).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    directory = _as_path(directory, "directory")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    config = json.loads(config_path.read_text())
    peft_type = config.get("peft_type")
    family = _FAMILIES.get(peft_type)
    if family is None:
        raise NotImplementedError(f"peft_type {peft_type!r} is not supported by fastpeft.load_adapter "
                                  f"({', '.join(_FAMILIES)} are)")
    read = {field for p in family for field in p.peft_fields}
    for field, feature in _UNSUPPORTED_FIELDS.items():
        if field not in read and config.get(field):
            raise NotImplementedError(f"the checkpoint uses {feature}, which fastpeft does not support")
    for path in family:
        path.peft_check_config(config)
    biased = any(p.peft_biases for p in family)
    state = {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: v for k, v in _read_checkpoint(directory).items()}
    # 1. check everything and build the changes off the model
    full_copies, state = _plan_saved_in_full(model, config, state)  # modules_to_save
    table_groups = {}  # LoRA on embeddings: module path -> {"lora_A" / "lora_B": value}
    if peft_type == "LORA":
        for key in [k for k in state if k.endswith((".lora_embedding_A", ".lora_embedding_B"))]:
            mpath, _, name = key.rpartition(".")
            table_groups.setdefault(mpath, {})[name.replace("_embedding", "")] = state.pop(key)
    groups, biases = {}, {}  # (path index in family, module path) -> {tensor name: value}
    for key, value in state.items():
        if biased and key.endswith(".bias") and not any(p.peft_split(key) for p in family):  # lora_B.bias: LoRA's
            biases[key] = value
            continue
        for i, path in enumerate(family):
            split = path.peft_split(key)
            if split is not None:
                groups.setdefault((i, split[0]), {})[split[1]] = value
                break
        else:
            family[0].peft_reject(key)
    layers: dict = {}
    plans = [_plan_layer(model, family[i], config, mpath, tensors, backend, layers)
             for (i, mpath), tensors in sorted(groups.items(), key=lambda item: item[0][0])]
    _check_required(plans)
    tables = [_plan_embedding(model, family[0], config, mpath, tensors, backend) for mpath, tensors in
              table_groups.items()]
    bias_copies = _plan_biases(model, biases, {mpath for _, mpath in groups})
    # 2. apply (nothing here can fail)
    keep = trainable_adapter_params(model)
    with torch.no_grad():
        for plan in plans:
            layer, path = plan["layer"], plan["path"]
            if model.get_submodule(plan["name"]) is not layer:  # a plain nn.Linear there: replace it
                swap_in(model, plan["name"], layer, plan["replaced"])
            if plan["base"] is not None:  # the init peft re-runs on load: the base now holds its residual
                layer.weight.copy_(plan["base"])
            for dst, src in plan["copies"]:
                dst.copy_(src)
            path.assign(layer, plan["parts"])
            keep.update(id(p) for p in path.params(layer))
        for dst, src in bias_copies:
            dst.copy_(src)
            keep.add(id(dst))
        for plan in tables:
            layer = plan["layer"]
            if plan["replaced"] is not None:
                layer.weight.requires_grad_(False)
                set_submodule(model, plan["name"], layer)
            for dst, src in plan["copies"]:
                dst.copy_(src)
            layer.assign(plan["parts"])
            keep.update((id(layer.lora_A), id(layer.lora_B)))
        for module, copies, own in full_copies:
            for dst, src in copies:
                if own:
                    remember_pretrained(dst)  # the pre-trained values, for count_parameters / delta_penalty
                dst.copy_(src)
            if own:
                save_in_full(module)
            keep.update(id(p) for p in module.parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    if biased and config.get("bias", "none") == "all":
        for pname, p in model.named_parameters():
            if pname == "bias" or pname.endswith(".bias"):
                p.requires_grad_(True)
    return model
