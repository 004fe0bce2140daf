"""Drop-in nn.Linear replacements that run the fused op.

Every module is a ``PEFTLinear``: the original (frozen) weight and bias, plus whichever PEFT
paths (fastpeft.paths.PATHS) it carries.  ``from_linear`` keeps the very same weight and bias
tensors (no copy) and initialises adapters like peft (A Kaiming-uniform, B zeros, IA3 ones,
sparse values zeros), so a freshly built layer computes exactly what the nn.Linear did.
Attribute names match the op's arguments: ``weight``, ``bias``, ``lora_A`` [r, K], ``lora_B``
[N, r], ``ia3_in`` [K], ``ia3_out`` [N], ``sparse_index`` (buffer), ``sparse_value``.

Transposed bases (``fan_in_fan_out``): transformers' ``Conv1D`` (GPT-2, GPT-J) stores its weight
[K, N] and computes y = x W + b.  The layer keeps that very Parameter as ``weight`` (state_dict
keys and shapes unchanged) and hands the op, and every path, its [N, K] view ``weight.t()``
(``weight_nk``): no copy, the kernels take the strides (C++ through at::addmm/mm of the transposed
operand, Triton by strides, the reference through F.linear).  merge/unmerge write that view, i.e.
the [K, N] storage, in place.

The layer knows no path by name: adding one is ``path.parts`` + ``path.assign``; forward passes
every carried path's ``op_kwargs``; merge/unmerge/delta_weight apply the paths' one formula
(fastpeft.paths.merged_rows).  Which paths take part in the op is cached on the layer and
recomputed whenever one of their attributes is set, so forward costs one short loop.
"""
from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn as nn

from fastpeft.core.ops import peft_linear
from fastpeft.core.validation import check_positive_int
from fastpeft.paths import CATEGORIES, PATHS, SLOTS, get, merged_rows, present, weight_paths

_SLOTS = frozenset(SLOTS)
_LINEAR_KEYWORDS = frozenset(k for p in PATHS for k in p.linear_keywords)
_OP_CALLS: dict = {}  # (fields, eval values) -> call(layer, x), one per combination of paths


def _op_call(key) -> Callable:
    """``call(layer, x)``: ``peft_linear(x, layer.weight, layer.bias, backend=layer.backend, <keyword>=
    layer.<attribute>, ...)`` for the (keyword, attribute) pairs ``key[0]``; keywords in ``key[1]``
    take the given value in eval mode; ``key[2]``: the weight is stored [K, N] (passed as
    ``weight.t()``, a view).  Generated once per combination of paths (as dataclasses generate
    __init__), so a forward reads each attribute once and calls no path code."""
    fields, eval_values, transposed = key
    evals = dict(eval_values)
    if not all(k.isidentifier() and a.isidentifier() for k, a in fields):
        raise ValueError(f"op fields must be identifiers, got {fields}")
    args = "".join(f", {k}=self.{a}" if k not in evals else f", {k}=(self.{a} if self.training else {evals[k]!r})"
                   for k, a in fields)
    namespace: dict = {}
    weight = "self.weight.t()" if transposed else "self.weight"
    exec(f"def call(self, x):\n    return peft_linear(x, {weight}, self.bias, backend=self.backend{args})\n",
         globals(), namespace)
    _OP_CALLS[key] = namespace["call"]
    return namespace["call"]


def is_conv1d(module) -> bool:
    """Whether ``module`` is a transformers ``Conv1D`` (weight [K, N], y = x W + b: GPT-2 style).

    transformers is not imported for this: a module of that class means it is loaded already."""
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def _check_linear(linear) -> None:
    if not isinstance(linear, nn.Linear) and not is_conv1d(linear):
        raise TypeError(f"linear must be a torch.nn.Linear (or a transformers Conv1D), got {type(linear).__name__}")


class PEFTLinear(nn.Module):
    """A linear layer with any combination of LoRA, IA3, trainable bias and a sparse delta.

    Build it with :meth:`from_linear`; ``forward(x)`` has nn.Linear's contract.  ``merge()`` folds
    the adapters into ``weight`` (and ``bias``) for inference and ``unmerge()`` takes them out.
    """

    PARAM_CATEGORIES = {"weight": "weight", "bias": "bias", **CATEGORIES}
    fan_in_fan_out = False  # the weight's layout (set per layer; the default for layers pickled before it)

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter] = None, backend: Optional[str] = None,
                 fan_in_fan_out: bool = False):
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("weight must be a 2-D tensor [out_features, in_features] ([in_features, out_features] "
                             "with fan_in_fan_out=True)")
        if not isinstance(fan_in_fan_out, bool):
            raise TypeError(f"fan_in_fan_out must be True or False, got {fan_in_fan_out!r}")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        self.fan_in_fan_out = fan_in_fan_out  # weight stored [K, N] (transformers Conv1D); the op gets weight.t()
        self.out_features, self.in_features = reversed(weight.shape) if fan_in_fan_out else weight.shape
        self.backend = backend
        for path in PATHS:  # every path absent: its tensors None, its attributes at their defaults
            for name in path.slots:
                if name in path.buffers:
                    self.register_buffer(name, None)
                else:
                    nn.Module.__setattr__(self, name, None)
            for name, value in path.attrs.items():
                setattr(self, name, value)
        self._cache_op_fields()
        self._merged = False

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in _SLOTS:  # a path was added, removed or swapped: recompute what forward passes
            self._cache_op_fields()

    def _cache_op_fields(self) -> None:
        """What forward passes to the op, from every carried path: (keyword, attribute) pairs and the
        keywords that take other values in eval mode; forward runs the call built for them."""
        carried = [p for p in PATHS if p.present(self)]
        fields = tuple(f for p in carried for f in p.op_fields(self))
        eval_values = tuple((k, v) for p in carried for k, v in p.eval_values.items())
        key = (fields, eval_values, self.__dict__.get("fan_in_fan_out", False))
        self.__dict__["_op_call"] = _OP_CALLS.get(key) or _op_call(key)

    def _apply(self, fn, recurse=True):
        # A quantized base (fastpeft.quantize) keeps its storage dtypes and is rebuilt over the moved
        # buffers: QuantizedWeight.module_apply (fastpeft/quant/weight.py) around nn.Module's _apply.
        base = self.__dict__.get("weight")
        if base is None or isinstance(base, torch.Tensor):
            return super()._apply(fn, recurse)
        return base.module_apply(self, fn, lambda f: super(PEFTLinear, self)._apply(f, recurse))

    @property
    def weight_nk(self):
        """The frozen weight as [out_features, in_features]: ``weight`` itself, or its transposed view
        ``weight.t()`` (no copy) for a fan_in_fan_out base stored [K, N].  Paths, merge and
        accounting read and write W through it."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def __getstate__(self):  # the generated call is rebuilt on unpickling (functions made by exec do not pickle)
        state = self.__dict__.copy()
        state.pop("_op_call", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._cache_op_fields()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, *, r: int = 0, alpha: Optional[float] = None, dropout: float = 0.0,
                    use_rslora: bool = False, ia3: Optional[str] = None, train_bias: bool = False,
                    density: Optional[float] = None, selection: str = "magnitude", block: Optional[int] = None,
                    seed: int = 0, backend: Optional[str] = None, **options) -> PEFTLinear:
        """Wrap ``linear`` (its weight and bias are reused, and frozen) with the chosen paths.

        ``linear`` is an nn.Linear or a transformers ``Conv1D`` (kept [K, N]: ``fan_in_fan_out``).

        r, alpha, dropout, use_rslora: LoRA of rank r (r = 0: none), scale alpha/r or alpha/sqrt(r).
        ia3: None, "in", "out" or "both".  train_bias: BitFit (a zero bias is added if the layer has none).
        density, selection, block, seed: a sparse delta over that fraction of W's entries.
        options: keywords of other paths (each path's ``linear_keywords``).
        Every path is validated and built before anything changes: when it raises, ``linear`` is
        as it was.
        """
        _check_linear(linear)
        unknown = sorted(set(options) - _LINEAR_KEYWORDS)
        if unknown:
            raise TypeError(f"from_linear() got unexpected keyword arguments {unknown}; the paths take "
                            f"{sorted(_LINEAR_KEYWORDS)}")
        kw = dict(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, ia3=ia3, train_bias=train_bias,
                  density=density, selection=selection, block=block, seed=seed, **options)
        layer = cls(linear.weight, linear.bias, backend=backend, fan_in_fan_out=is_conv1d(linear))
        chosen = [(p, opts) for p in PATHS if (opts := p.linear_options(kw)) is not None]
        built = [(p, p.parts(layer, **opts)) for p, opts in chosen]
        # linear's own tensors change (frozen) only once every path was built
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        for path, parts in built:
            path.assign(layer, parts)
        return layer

    def add_path(self, name: str, **options) -> PEFTLinear:
        """Add the PEFT path ``name`` ("lora", "ia3", "bitfit", "sparse") with its options; returns self.

        Everything is validated and built first: when it raises, the layer is as it was.
        """
        path = get(name)
        path.assign(self, path.parts(self, **options))
        return self

    def add_lora(self, r: int, alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False) -> PEFTLinear:
        """Add a LoRA path: lora_A Kaiming-uniform [r, K], lora_B zeros [N, r]."""
        return self.add_path("lora", r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)

    def add_ia3(self, position: str = "out") -> PEFTLinear:
        """Add IA3 scale vectors (ones) on the input ("in"), the output ("out") or both."""
        return self.add_path("ia3", position=position)

    def train_bias(self) -> PEFTLinear:
        """BitFit: make the bias trainable (adding a zero bias when the layer has none)."""
        return self.add_path("bitfit")

    def add_sparse(self, density: float = 0.01, selection: str = "magnitude", block: Optional[int] = None,
                   seed: int = 0, index: Optional[torch.Tensor] = None) -> PEFTLinear:
        """Add a trainable sparse delta on a fixed set of W's entries (values start at zero).

        On the meta device the index is a meta tensor of the selection's size (select_sparse_indices),
        ready for ``to_empty`` + ``load_state_dict``.
        """
        return self.add_path("sparse", density=density, selection=selection, block=block, seed=seed, index=index)

    # ----------------------------------------------------------------- forward
    @property
    def merged(self) -> bool:
        return self._merged

    @property
    def paths(self) -> list:
        """The PEFT path objects this layer carries (fastpeft.paths), in merge order."""
        return present(self)

    @property
    def methods(self) -> list[str]:
        return [name for path in PATHS for name in path.method_names(self)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged:
            return peft_linear(x, self.weight_nk, self.bias, backend=self.backend)
        return self._op_call(self, x)

    # ----------------------------------------------------------------- merge
    def _rows(self) -> slice:
        return slice(0, self.out_features)

    def _check_dense_base(self, what: str) -> None:
        if not isinstance(self.weight, torch.Tensor):  # a QuantizedWeight (fastpeft.quantize)
            raise RuntimeError(f"{what}: this layer's base is quantized ({self.weight.format}); merging would "
                               "dequantize, merge and re-quantize, changing the base by the quantization error "
                               "each time, so it is not supported (dequantize the model first)")

    def delta_weight(self) -> torch.Tensor:
        """Effective W' - W in fp32 (dense [N, K]): what merge() adds to the weight."""
        if self._merged:
            raise RuntimeError("delta_weight() needs the unmerged weight; call unmerge() first")
        with torch.no_grad():
            w = self.weight_nk  # a quantized base: its dequantized values (read only; ΔW is [N, K] anyway)
            w = (w if isinstance(w, torch.Tensor) else w.dequantize()).float()
            return merged_rows(self, w.clone(), self._rows(), inplace=True) - w

    def merge(self) -> None:
        """Fold every adapter path into weight (and bias) in place; forward then costs a plain linear.

        The weight tensor is written wherever it is shared: ``fastpeft.merge(model)`` refuses layers
        whose weight is tied to another module (e.g. the input embeddings); this method does not look.
        """
        if self._merged:
            warnings.warn("layer is already merged; merge() did nothing", stacklevel=2)
            return
        self._check_dense_base("merge()")
        shifted = [p.label for p in weight_paths(self) if p.bias_shift(self) is not None]
        if shifted and self.bias is None:
            raise RuntimeError(f"merge(): the {shifted[0]} bias (lora_bias) has no base bias to fold into (this layer "
                               "has none); peft cannot merge it either: keep the layer unmerged")
        with torch.no_grad():
            w = self.weight_nk  # [N, K] (a view of the [K, N] storage for fan_in_fan_out)
            w.copy_(merged_rows(self, w.float(), self._rows(), inplace=True))
            for path in weight_paths(self):
                scale, shift = path.bias_scale(self), path.bias_shift(self)
                if scale is not None and self.bias is not None:
                    self.bias.copy_(self.bias.float() * scale.float())
                if shift is not None:
                    self.bias.copy_(self.bias.float() + shift.float())
        self._merged = True

    def unmerge(self) -> None:
        """Undo merge(): W is restored to fp32 rounding (warns when an IA3 scale is near zero)."""
        if not self._merged:
            warnings.warn("layer is not merged; unmerge() did nothing", stacklevel=2)
            return
        with torch.no_grad():
            w = self.weight_nk.float()
            for path in reversed(weight_paths(self)):
                w = path.invert(self, w)
                scale, shift = path.bias_scale(self), path.bias_shift(self)
                if shift is not None and self.bias is not None:
                    self.bias.copy_(self.bias.float() - shift.float())
                if scale is not None and self.bias is not None:
                    self.bias.copy_(self.bias.float() / scale.float())
            self.weight_nk.copy_(w)
        self._merged = False

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                 f"method={'+'.join(self.methods) or 'frozen'}"] + ["fan_in_fan_out=True"] * self.fan_in_fan_out
        for path in present(self):
            parts += path.extra_repr(self)
        parts += [f"backend={self.backend or 'auto'}", f"merged={self._merged}"]
        return ", ".join(parts)


class LoRALinear(PEFTLinear):
    """nn.Linear + LoRA: y = x W^T + b + scale * (dropout(x) A^T) B^T."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False, *, backend: Optional[str] = None,
                    **options) -> LoRALinear:
        """LoRA of rank r, scale alpha/r (alpha/sqrt(r) with use_rslora); use_dora: DoRA on top (a trainable
        magnitude per output row, ``dora_magnitude``, initialised to ‖W‖_row); ``options``: keywords of
        paths that extend LoRA (see PEFTLinear.from_linear)."""
        check_positive_int("r", r)
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora must be True or False, got {use_dora!r}")
        return super().from_linear(linear, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                   backend=backend, use_dora=use_dora, **options)


class IA3Linear(PEFTLinear):
    """nn.Linear with IA3 scaling of its inputs ("in", feed-forward layers) or outputs ("out")."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, position: str = "out", *, backend: Optional[str] = None) -> IA3Linear:
        return super().from_linear(linear, ia3=position, backend=backend)


class BitFitLinear(PEFTLinear):
    """nn.Linear whose only trainable part is its bias."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, backend: Optional[str] = None) -> BitFitLinear:
        return super().from_linear(linear, train_bias=True, backend=backend)


class SparseLinear(PEFTLinear):
    """nn.Linear plus a trainable sparse delta on a fixed fraction of W's entries."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, density: float = 0.01, selection: str = "magnitude",
                    block: Optional[int] = None, seed: int = 0, *, backend: Optional[str] = None) -> SparseLinear:
        return super().from_linear(linear, density=density, selection=selection, block=block, seed=seed,
                                   backend=backend)


# The drop-in class of each path (model surgery builds these; several paths share PEFTLinear's code).
LAYER_CLASSES = {"lora": LoRALinear, "ia3": IA3Linear, "bitfit": BitFitLinear, "sparse": SparseLinear}
