"""Convert Hugging Face peft models to fastpeft: :func:`from_peft`.

:func:`from_peft` swaps the LoRA and IA3 layers of a peft model for fastpeft layers, in place,
keeping the very same Parameter objects (an optimizer built before the conversion keeps working):

    peft lora.Linear   base_layer.weight/bias, lora_A[a].weight [r, K], lora_B[a].weight [N, r],
                       scaling[a]                    ->  LoRALinear(weight, bias, lora_A, lora_B, lora_scale)
    peft ia3.Linear    ia3_l[a] [1, K] (feed-forward) ->  IA3Linear.ia3_in [K]   (same Parameter, reshaped)
                       ia3_l[a] [N, 1] (others)       ->  IA3Linear.ia3_out [N]

y is unchanged: y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ, and y = (x ⊙ s) Wᵀ + b  or
(x Wᵀ + b) ⊙ s for IA3.  The base layer may be an nn.Linear, a transformers ``Conv1D`` (GPT-2:
its [K, N] weight Parameter is kept, the layer is ``fan_in_fan_out``) or a bitsandbytes
``Linear4bit`` (NF4) / ``Linear8bitLt`` (int8) of a QLoRA model (the weight becomes a
``QuantizedWeight`` over bnb's own storage); any other nn.Linear subclass whose weight is not a
plain Parameter (another library's packed format) stays on peft's path.  Which peft layer becomes
which path, and how its tensors and settings are read, is each path's peft mapping (fastpeft.paths:
``peft_tuner``, ``from_peft_layer``); the layer is built through the path's ``adopt`` like any other.
Everything is checked before anything changes.  The peft wrapper keeps working where it can
(``disable_adapter``) and raises, naming the fastpeft way, where peft's method would silently skip
the converted layers (``save_pretrained``, ``merge_and_unload``, ...).

Reading and writing peft checkpoints (:func:`save_adapter`, :func:`load_adapter`) lives in
:mod:`fastpeft.interop.checkpoint`; both are re-exported here.  peft is an optional extra
(``pip install fastpeft[peft]``): it is imported inside these functions only.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import warnings
import weakref
from typing import Optional

import torch
import torch.nn as nn

from fastpeft.interop.checkpoint import INSTALL_HINT, load_adapter, save_adapter, unwrap_peft
from fastpeft.methods.heads import is_modules_to_save
from fastpeft.nn.embedding import LoRAEmbedding
from fastpeft.nn.inject import set_submodule
from fastpeft.nn.modules import LAYER_CLASSES, PEFTLinear, is_conv1d
from fastpeft.paths import PATHS
from fastpeft.quant.model import attach
from fastpeft.quant.weight import QuantizedWeight

__all__ = ["from_peft", "save_adapter", "load_adapter"]

# The paths from_peft converts to, by peft tuner: peft.tuners.<tuner>.Linear becomes a fastpeft layer
# with the first of them (LoRA for "lora"), and the others (paths extending its format) where present.
_TUNERS: dict = {}
for _p in PATHS:
    if _p.peft_tuner is not None:
        _TUNERS.setdefault(_p.peft_tuner, []).append(_p)


def _import_peft():
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"fastpeft.from_peft needs peft: {INSTALL_HINT}") from exc
    return BaseTunerLayer, AuxiliaryTrainingWrapper


def _peft_layer_paths() -> dict:
    """{peft's Linear layer class: [the fastpeft paths converting it]} (peft.tuners.<peft_tuner>.Linear,
    and peft's bitsandbytes twins peft.tuners.<peft_tuner>.bnb.Linear4bit / Linear8bitLt, which compute
    the same over a quantized base, when bitsandbytes is installed)."""
    kinds = {}
    for tuner, paths in _TUNERS.items():
        kinds[importlib.import_module(f"peft.tuners.{tuner}").Linear] = paths
        try:
            twins = importlib.import_module(f"peft.tuners.{tuner}.bnb")
        except ImportError:  # no bitsandbytes (or no bnb layers for this tuner)
            continue
        for cls in ("Linear4bit", "Linear8bitLt"):
            if hasattr(twins, cls):
                kinds[getattr(twins, cls)] = paths
    return kinds


def _is_bnb_linear(base) -> bool:
    """A bitsandbytes Linear4bit / Linear8bitLt (an nn.Linear subclass whose weight is packed)."""
    bnb = sys.modules.get("bitsandbytes.nn")
    return bnb is not None and isinstance(base, (bnb.Linear4bit, bnb.Linear8bitLt))


def _bnb_weight(base) -> QuantizedWeight:
    """The QuantizedWeight over a bnb layer's storage.  After its first forward a Linear8bitLt keeps
    the int8 rows as ``weight.data`` and moves CB / SCB off the parameter onto ``base.state``
    (bnb's init_8bit_state): they are read there."""
    w = base.weight
    state = getattr(base, "state", None)
    if getattr(w, "quant_state", None) is None and getattr(w, "SCB", None) is None \
            and getattr(state, "SCB", None) is not None and w.dtype == torch.int8:
        return QuantizedWeight.from_tensors("int8", w.shape, torch.float32, {"CB": w.data, "SCB": state.SCB})
    return QuantizedWeight.from_bnb(w)


def _base_kind(module, base, tuner_layer: type):
    """How a peft layer's base becomes a fastpeft layer's: ("dense" | "conv1d" | "quantized", detail:
    the QuantizedWeight for "quantized"), or (None, why it stays on peft's path)."""
    fan_in_fan_out = bool(getattr(module, "fan_in_fan_out", False))
    if isinstance(base, tuner_layer):
        return None, "nested peft layer"
    if is_conv1d(base):  # transformers Conv1D: weight [K, N]; peft forces fan_in_fan_out=True on it
        return ("conv1d", None) if fan_in_fan_out else (None, "Conv1D without fan_in_fan_out")
    if fan_in_fan_out:
        return None, "fan_in_fan_out"
    if _is_bnb_linear(base):  # QLoRA: bnb's packed storage, shared (QuantizedWeight.from_bnb)
        try:
            return "quantized", _bnb_weight(base)
        except (TypeError, ValueError) as exc:
            return None, f"bitsandbytes base fastpeft cannot read: {exc}"
    if not isinstance(base, nn.Linear):
        return None, None
    w = base.weight
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() \
            or tuple(w.shape) != (base.out_features, base.in_features):
        # another library's quantized / packed nn.Linear subclass: its weight is not W
        what = f"{w.dtype} {list(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
        return None, f"a weight that is not a dense [out_features, in_features] matrix ({what})"
    return "dense", None


# ----------------------------------------------------------------------------- from_peft
def _lora_embedding_class() -> type:
    return importlib.import_module("peft.tuners.lora").Embedding


def _embedding(name: str, module, backend: Optional[str]) -> tuple:
    """What from_peft does with one peft lora.Embedding, checked, nothing changed: ("convert", the
    LoRAEmbedding holding peft's own lora_embedding_A / _B Parameters), ("plain", its base), ("idle", why
    it stays) or ("left", why fastpeft has no kernel for it)."""
    base = module.base_layer
    if type(base) is not nn.Embedding or base.max_norm is not None or base.sparse:
        why = "max_norm" if type(base) is nn.Embedding and base.max_norm is not None else \
            "sparse gradients" if type(base) is nn.Embedding and base.sparse else type(base).__name__
        return "left", f"{name} (peft lora.Embedding on {type(base).__name__}: {why})"
    params = module.lora_embedding_A
    adapter = _active_adapter(name, module, params, "LoRA")
    if adapter is None:
        if all(len(getattr(module, n, ())) == 0 for n in module.adapter_layer_names):
            return "plain", base
        return "idle", f"{name} (no active adapter; keeps its inactive adapters {sorted(params)})"
    if module.use_dora.get(adapter, False) or adapter in module.lora_variant:
        raise NotImplementedError(f"{name}: LoRA variants on embeddings (DoRA, ...) are not supported by fastpeft")
    if module.lora_bias.get(adapter, False):
        raise NotImplementedError(f"{name}: lora_bias=True is not supported on embeddings")
    layer = LoRAEmbedding.build(base, backend=backend)
    dropout = module.lora_dropout[adapter]
    parts = layer.adopt(module.lora_embedding_A[adapter], module.lora_embedding_B[adapter],
                        alpha=float(module.lora_alpha[adapter]), use_rslora=bool(module.use_rslora.get(adapter, False)),
                        dropout=float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0,
                        scale=float(module.scaling[adapter]))
    layer.assign(parts)  # the layer is not in the model yet
    return "convert", layer


def _active_adapter(name: str, layer, params: dict, method: str) -> Optional[str]:
    """The one active adapter of a peft layer (None: no active adapter here, a plain layer).

    Raises on every state fastpeft cannot reproduce.
    """
    if layer.merged:
        raise NotImplementedError(f"{name}: the peft adapter is merged into the base weight; "
                                  "call peft_model.unmerge_adapter() before from_peft")
    active = [a for a in layer.active_adapters if a in params]
    if not active:
        return None  # peft's forward skips the adapters this layer holds: it computes its base layer
    if len(active) > 1:
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
    return adapter


def _convert(name: str, peft_layer, adapter: str, paths: list, backend: Optional[str], config, kind: str = "dense",
             qw: Optional[QuantizedWeight] = None) -> tuple:
    """The fastpeft layer for one peft layer, built off the model: (layer, [(attribute, peft's
    Parameter, fastpeft's shape)] still to attach).  Every path of the layer's tuner reads its part
    (``from_peft_layer``; None: not on this layer) and is added through its ``adopt``, with the same
    Parameter objects (requires_grad untouched); one whose peft layout differs (IA3's [1, K] /
    [N, 1]) is added as a view now and reshaped in place by ``_attach`` once every layer passed."""
    base = peft_layer.base_layer
    cls = LAYER_CLASSES.get(paths[0].name, PEFTLinear)
    if kind == "quantized":  # qw: QuantizedWeight over bnb's storage; the layer is built on a meta stand-in
        new = cls(torch.empty(qw.shape, dtype=qw.dtype, device="meta"), base.bias, backend=backend)
        attach(new, qw)
    else:  # the base's own Parameters (a Conv1D's [K, N] weight kept as it is: fan_in_fan_out)
        new = cls(base.weight, base.bias, backend=backend, fan_in_fan_out=kind == "conv1d")
    pending = []
    for path in paths:
        found = path.from_peft_layer(name, peft_layer, adapter, config)
        if found is None:
            continue
        tensors, options = found
        shapes = {a: path.layout(new, a, t) for a, t in tensors.items()}
        views = {a: t if tuple(t.shape) == shapes[a] else t.detach().view(shapes[a]) for a, t in tensors.items()}
        path.assign(new, path.adopt(new, **views, **options))  # the layer is not in the model yet
        pending += [(a, t, shapes[a]) for a, t in tensors.items() if views[a] is not t]
    return new, pending


class _OldShapeGrads:
    """Gradient fix-up for an IA3 vector reshaped while an autograd graph still expects its old shape.

    A graph that peft's layer built before ``from_peft`` (a forward whose backward has not run
    yet) delivers a [N, 1] / [1, K] gradient to the now 1-D vector, which torch cannot accumulate
    (nor a hook resize).  ``before`` (a tensor hook, run before the accumulation) gives the vector
    that old shape back for the moment and sets an existing gradient aside; ``after`` (a
    post-accumulate hook) makes it 1-D again, with the arrived gradient reshaped and the set-aside
    one added.  Gradients of the right shape pass through untouched.
    """

    def __init__(self, param: nn.Parameter):
        self.param = weakref.ref(param)
        self.pending, self.active = None, False

    def before(self, grad: torch.Tensor):
        param = self.param()
        if param is not None and grad.shape != param.shape:
            with torch.no_grad():
                self.pending, param.grad = param.grad, None
                param.data = param.data.reshape(grad.shape)
            self.active = True
        return None

    def after(self, param: torch.Tensor) -> None:
        if not self.active:
            return
        grad, pending = param.grad, self.pending
        self.pending, self.active = None, False
        with torch.no_grad():
            param.grad = None
            param.data = param.data.reshape(-1)
            if grad is not None:
                grad = grad.reshape(-1)
                param.grad = grad if pending is None else pending + grad
            else:
                param.grad = pending


def _holds_old_accumulator(param: nn.Parameter) -> bool:
    """Whether a graph built before ``param`` was reshaped still holds its gradient accumulator."""
    if not param.requires_grad:
        return False
    try:
        shape = torch.autograd.graph.get_gradient_edge(param).node._input_metadata[0].shape
    except Exception:  # pragma: no cover - a torch without these internals: assume so (the fix-up is harmless)
        return True
    return tuple(shape) != tuple(param.shape)


def _reshape_param(vec: nn.Parameter, shape: tuple) -> tuple:
    """Give peft's Parameter ``vec`` fastpeft's ``shape`` (a view of the same storage, same object);
    returns (vec, its old shape) for the optimizer state."""
    old_shape = tuple(vec.shape)
    with torch.no_grad():
        vec.data = vec.data.reshape(shape)
        if vec.grad is not None:
            vec.grad = vec.grad.reshape(shape)
    if _holds_old_accumulator(vec):
        # A live graph (a pending backward, or a finished one its loss still references) holds the
        # accumulator that expects the old shape; new graphs would reuse it and fail ("invalid
        # gradient ... expected shape compatible with [1, K]").  A dtype change is torch's only way
        # to make the Parameter drop it (set_data); the old graph keeps its own, fixed up by hooks.
        with torch.no_grad():
            data = vec.data
            vec.data = torch.empty(0, dtype=torch.float64 if data.dtype != torch.float64 else torch.float32,
                                   device=data.device)
            vec.data = data
        fix = _OldShapeGrads(vec)
        vec.register_hook(fix.before)
        vec.register_post_accumulate_grad_hook(fix.after)
    return vec, old_shape


def _attach(new: PEFTLinear, pending: list) -> list:
    """Give ``new`` peft's own Parameters where ``_convert`` put views, reshaped in place to
    fastpeft's shapes; returns [(parameter, old shape)] for the optimizer state.  Cannot fail."""
    reshaped = []
    for attr, param, shape in pending:
        reshaped.append(_reshape_param(param, shape))
        setattr(new, attr, param)
    return reshaped


def _reshape_optimizer_state(optimizer, reshaped) -> None:
    for param, old_shape in reshaped:
        state = optimizer.state.get(param)
        if not state:
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and tuple(value.shape) == old_shape:
                state[key] = value.reshape(param.shape)


# peft methods that would silently skip the converted layers, and the fastpeft way to do each.
_SAVE_HINT = ("save with fastpeft.save_adapter(model, directory) (a peft checkpoint that "
              "PeftModel.from_pretrained loads)")
_ADAPTERS_HINT = ("fastpeft layers hold one adapter each: add, load, switch or delete peft adapters before "
                  "from_peft, or load a checkpoint with fastpeft.load_adapter(model, directory)")
_GUARDED = {
    "save_pretrained": _SAVE_HINT, "push_to_hub": _SAVE_HINT,
    "merge_and_unload": "merge with fastpeft.merge(model)", "merge_adapter": "merge with fastpeft.merge(model)",
    "unmerge_adapter": "unmerge with fastpeft.unmerge(model)",
    "unload": "the converted layers are fastpeft layers; fastpeft.merge(model) folds their adapters in",
    "disable_adapter_layers": "use `with peft_model.disable_adapter():`, which covers the converted layers",
    "enable_adapter_layers": "use `with peft_model.disable_adapter():`, which covers the converted layers",
    "add_adapter": _ADAPTERS_HINT, "load_adapter": _ADAPTERS_HINT, "set_adapter": _ADAPTERS_HINT,
    "delete_adapter": _ADAPTERS_HINT, "add_weighted_adapter": _ADAPTERS_HINT,
}
# What disable_adapter takes off a fastpeft layer (and puts back): every path of the merged weight.
_ADAPTER_ATTRS = tuple(t for p in PATHS if p.changes_weight for t in p.slots)


class _ConvertedByFastpeft:
    """Stands in for a peft method that would skip the layers from_peft converted: raises, naming the fastpeft way."""

    def __init__(self, name: str, hint: str):
        self.name, self.hint = name, hint

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.name}() is peft's and does not see the layers fastpeft.from_peft converted "
                           f"(it would skip them silently); {self.hint}")


class _DisableAdapter:
    """``PeftModel.disable_adapter()`` after from_peft: a context manager covering fastpeft and peft layers."""

    def __init__(self, peft_model: nn.Module):
        self.peft_model = peft_model

    def __call__(self):
        return _adapters_disabled(self.peft_model)


@contextlib.contextmanager
def _adapters_disabled(peft_model):
    """Run the model without adapters: fastpeft layers lose their adapter paths for the duration
    (the same objects are put back), layers left on peft's path are disabled by peft's tuner.
    Trained biases stay, as in peft.  Merged fastpeft layers raise (their weight holds the adapter)."""
    BaseTunerLayer, AuxiliaryTrainingWrapper = _import_peft()
    root = unwrap_peft(peft_model)
    layers = [(n, m) for n, m in root.named_modules() if isinstance(m, (PEFTLinear, LoRAEmbedding))]
    merged = [n for n, m in layers if m.merged]
    if merged:
        raise RuntimeError(f"disable_adapter(): fastpeft layers {merged[:3]} are merged (their weights hold the "
                           "adapters); call fastpeft.unmerge(model) first")
    tuner = peft_model.base_model
    on_peft = any(isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) for m in root.modules())
    saved = [(m, {a: getattr(m, a) for a in _ADAPTER_ATTRS if getattr(m, a, None) is not None}) for _, m in layers]
    was_disabled = getattr(peft_model, "_adapters_disabled", False)
    try:
        for layer, attrs in saved:
            for a in attrs:
                setattr(layer, a, None)
        if on_peft:  # peft's own disable, past the guard from_peft put on the tuner
            type(tuner).disable_adapter_layers(tuner)
        peft_model._adapters_disabled = True
        yield
    finally:
        if on_peft:
            type(tuner).enable_adapter_layers(tuner)
        for layer, attrs in saved:
            for a, value in attrs.items():
                setattr(layer, a, value)
        peft_model._adapters_disabled = was_disabled


def _install_guards(peft_model: nn.Module, root: nn.Module) -> None:
    wrappers = [peft_model]
    tuner = peft_model._modules.get("base_model")
    if tuner is not None and tuner is not root and type(tuner).__module__.startswith("peft."):
        wrappers.append(tuner)
    for wrapper in wrappers:
        for name, hint in _GUARDED.items():
            if hasattr(type(wrapper), name):
                object.__setattr__(wrapper, name, _ConvertedByFastpeft(name, hint))
    if hasattr(type(peft_model), "disable_adapter") and "base_model" in peft_model._modules:
        object.__setattr__(peft_model, "disable_adapter", _DisableAdapter(peft_model))


def from_peft(peft_model: nn.Module, *, backend: Optional[str] = None, optimizer=None) -> nn.Module:
    """Convert a peft model's LoRA and IA3 layers into fastpeft layers, in place.

    Every ``peft.tuners.lora.Linear`` (plain LoRA or rsLoRA, any ``lora_dropout``, any ``bias``
    setting) becomes a :class:`fastpeft.LoRALinear` and every ``peft.tuners.ia3.Linear`` an
    :class:`fastpeft.IA3Linear` (feed-forward layers scale inputs: ``ia3_in``; others outputs:
    ``ia3_out``).  The new layers hold the very same Parameter objects as peft's (``lora_A.weight``
    becomes ``lora_A``, ``base_layer.weight`` becomes ``weight``, ...), with their ``requires_grad``
    flags, so an optimizer built before the conversion keeps training them; outputs are unchanged
    (in train mode the LoRA dropout mask is fastpeft's own, so only its distribution matches).

    A ``peft.tuners.lora.Embedding`` on a plain ``nn.Embedding`` becomes a :class:`fastpeft.LoRAEmbedding`
    holding peft's own ``lora_embedding_A`` [r, V] / ``lora_embedding_B`` [N, r] Parameters and scale.
    A ``modules_to_save`` wrapper (peft's ``ModulesToSaveWrapper``) stays as it is, without a warning:
    its forward runs the active trained copy, which keeps training, and :func:`save_adapter` writes
    that copy in peft's format.

    IA3 vectors keep their Parameter object but are reshaped from peft's [N, 1] / [1, K] to [N] /
    [K] (a view of the same storage).  Optimizer state already created for them (e.g. Adam
    moments after a step) must follow: pass ``optimizer=`` and it is reshaped too.  Converting
    between a forward and its backward works: the pending backward's gradients arrive in the new
    shape (and accumulate onto gradients already there).

    A layer whose active adapter it does not hold is a plain layer, as in peft's forward: with no
    adapter at all (after ``delete_adapter``) it becomes its plain base ``nn.Linear``; holding only
    inactive adapters it stays on peft's path with them (a warning names it).  Whatever is inside
    a peft layer that stays on peft's path (MultiheadAttention's inner ``out_proj`` LoRA, a
    ``modules_to_save`` copy) is left alone.

    Base layers: ``nn.Linear``; transformers ``Conv1D`` (GPT-2 / GPT-J style, weight [K, N]; peft's
    ``fan_in_fan_out``): the layer keeps that Parameter and runs the op on its transposed view, no
    copy; bitsandbytes ``Linear4bit`` (NF4) and ``Linear8bitLt`` (int8) under peft's ``lora.Linear``
    or its ``lora.bnb`` layers (a QLoRA model): the weight becomes
    ``fastpeft.QuantizedWeight.from_bnb(base.weight)``, sharing bnb's packed storage (a
    Linear8bitLt's CB / SCB are read where bnb keeps them after a forward).  ``lora_bias=True``
    (a bias on lora_B) becomes the layer's ``lora_bias`` (the same Parameter).

    Unsupported peft features raise ``NotImplementedError`` naming the feature: LoRA variants other
    than DoRA, several active adapters (or several adapters loaded on a layer), disabled or merged
    adapters.  Layers fastpeft has no kernel for (IA3 on Embedding, LoRA/IA3 on Conv layers, bnb
    FP4 bases, an NF4 weight bnb repacked for its CPU inference kernel, other quantized linears,
    other peft methods) and trainable-token wrappers stay on peft's path, with a warning naming the
    reason.  When it raises, nothing has changed.

    The peft wrapper (PeftModel / LoraModel / IA3Model) shares the converted module tree; its
    methods that would silently skip the converted layers are replaced on that object by ones
    raising ``RuntimeError`` with the fastpeft way (``save_pretrained`` / ``push_to_hub`` ->
    :func:`save_adapter`; ``merge_and_unload`` / ``merge_adapter`` / ``unmerge_adapter`` ->
    :func:`fastpeft.merge` / :func:`fastpeft.unmerge`; ``add_adapter``, ``set_adapter``,
    ``delete_adapter``, ``load_adapter``, ...).  ``with peft_model.disable_adapter():`` keeps
    working: it takes the adapter paths off the fastpeft layers for its duration (and disables
    the layers left on peft's path).  A base-rewriting init (``init_lora_weights="pissa"``, ...)
    is remembered on the converted layers, so :func:`save_adapter` writes it as peft does; the init
    is read from the wrapper's ``peft_config``, so pass the PeftModel (or tuner), not a bare model
    with injected layers, when one was used.

    Args:
        peft_model: a ``peft.PeftModel``, a tuner (``LoraModel``/``IA3Model``) or a model with peft
            layers injected (``peft.inject_adapter_in_model``).
        backend: backend of the new layers (None: the global choice).
        optimizer: optional optimizer whose state is reshaped along with the IA3 vectors.

    Returns:
        The underlying model (``peft_model.get_base_model()`` for a PeftModel) with the peft layers
        replaced.
    """
    BaseTunerLayer, AuxiliaryTrainingWrapper = _import_peft()
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"peft_model must be a torch.nn.Module (a peft model), got {type(peft_model).__name__}")
    kinds = _peft_layer_paths()
    root = unwrap_peft(peft_model)
    configs = getattr(peft_model, "peft_config", None)
    configs = configs if isinstance(configs, dict) else {}
    replacements, plain, left, idle = [], [], [], []
    owned = None  # named_modules() walks depth-first: a peft layer's submodules come right after it
    for name, module in root.named_modules():
        if owned is not None and name.startswith(owned):
            continue  # inside a peft layer (converted, or left on peft's path): that layer's business
        if isinstance(module, AuxiliaryTrainingWrapper):
            # modules_to_save: peft's wrapper stays as it is (its forward runs the active trained copy,
            # which trains; save_adapter writes it in peft's format); trainable tokens: peft's path
            if not is_modules_to_save(module):
                left.append(f"{name} ({type(module).__name__}: trainable tokens)")
            owned = f"{name}."
            continue
        if not isinstance(module, BaseTunerLayer):
            continue
        owned = f"{name}."
        if type(module) is _lora_embedding_class():  # peft lora.Embedding -> LoRAEmbedding (fastpeft.nn.embedding)
            outcome, value = _embedding(name, module, backend)
            if outcome == "convert":
                replacements.append((name, value, []))
            else:
                {"plain": plain, "idle": idle, "left": left}[outcome].append((name, value) if outcome == "plain"
                                                                              else value)
            continue
        base = getattr(module, "base_layer", None)
        kind, detail = _base_kind(module, base, BaseTunerLayer)
        paths = kinds.get(type(module)) if kind is not None else None
        if paths is None:
            left.append(f"{name} ({type(module).__module__}.{type(module).__name__} on "
                        f"{type(base).__name__}{f', {detail}' if kind is None and detail else ''})")
            continue
        params = getattr(module, paths[0].peft_adapters)
        adapter = _active_adapter(name, module, params, paths[0].label)
        if adapter is None:
            if all(len(getattr(module, n, ())) == 0 for n in module.adapter_layer_names):
                plain.append((name, base))
            else:
                idle.append(f"{name} (no active adapter; keeps its inactive adapters {sorted(params)})")
        else:
            replacements.append((name, *_convert(name, module, adapter, paths, backend, configs.get(adapter), kind,
                                                 detail if kind == "quantized" else None)))
    # Every layer passed its checks: only now is anything the user owns changed.
    reshaped = []
    for name, new, pending in replacements:
        reshaped += _attach(new, pending)
        new.train(root.get_submodule(name).training)
        set_submodule(root, name, new)
    for name, base in plain:
        set_submodule(root, name, base)
    if optimizer is not None:
        _reshape_optimizer_state(optimizer, reshaped)
    if peft_model is not root and (replacements or plain):
        _install_guards(peft_model, root)
    if left:
        warnings.warn("from_peft left these layers on peft's path (fastpeft has no kernel for them): "
                      + "; ".join(left), stacklevel=2)
    if idle:
        warnings.warn("from_peft left these layers on peft's path (they compute their plain base layer): "
                      + "; ".join(idle), stacklevel=2)
    if not replacements and not plain:
        warnings.warn("from_peft found no peft LoRA or IA3 Linear layer to convert", stacklevel=2)
    return root
