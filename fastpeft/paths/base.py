"""The seam every PEFT path plugs into (CONTRIBUTING.md, "Adding a PEFT path").

A path is one way the fused op adapts a frozen linear layer.  Its object (one per path, listed
in ``fastpeft.paths.PATHS`` in merge order) is all fastpeft knows about it:

- tensors: layer attributes named after the op's arguments (``tensors``; ``buffers`` of them are
  not trained), their ``count_parameters`` categories, and plain attributes (``attrs``, with
  their values while the path is absent);
- adding it to a PEFTLinear: ``check`` (raise what adding would raise, draw nothing), ``parts``
  (validate and build {attribute: value} off the layer, peft's init), ``adopt`` (the same from
  existing Parameter objects, for from_peft / load_adapter) and ``assign`` (set them; cannot
  fail), so model surgery validates every layer before it changes any;
- ``op_kwargs``: what the layer passes to ``fastpeft.peft_linear`` (called on every forward);
- ``apply(layer, w, rows)``: its part of the merged weight, ONE formula used by merge,
  delta_weight, count_parameters and delta_penalty.  Applied in PATHS order to rows of W:

      W' = diag(ia3_out) (W + S) diag(ia3_in) + s·B·A          b' = b ⊙ ia3_out

  out of place and differentiable in the adapters (or in place, for merge), in the dtype of
  ``w`` (fp32, or fp64); ``invert`` undoes it (in place for unmerge, or out of place in float64
  with a rounding bound for accounting); ``bias_scale`` is its factor on the bias;
- accounting: ``changed`` (entries of the pre-trained W it changes), ``max_changed`` (a bound
  when there are no values: meta device), and closed forms used when it is the layer's only
  weight path: ``rank_alone`` (rank of ΔW) and ``penalty_alone`` (‖ΔW‖² or ‖ΔW‖₁); either
  returns NotImplemented when it has none and ΔW is formed densely in row chunks;
- its peft mapping (``peft_type``, ``peft_tuner``, ``peft_fields`` and the ``peft_*`` methods:
  checkpoint key names and config fields) and its benchmark cases (``bench_cases``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

KINDS = ("l2", "l1")
ROW_CHUNK = 1024  # rows of an [N, K] product formed at a time when counting
_REGISTRY: dict[str, Path] = {}


def lookup(name: str) -> Path:
    """The registered path called ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown PEFT path {name!r}; expected one of {', '.join(_REGISTRY)}") from None


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """peft keeps adapters in fp32 when the base layer is half precision ("autocast_adapter_dtype")."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def new_param(layer, tensor: torch.Tensor) -> nn.Parameter:
    """A trainable Parameter holding ``tensor`` on the layer's device, in its adapter dtype."""
    return nn.Parameter(tensor.to(device=layer.weight.device, dtype=adapter_dtype(layer.weight)))


def check_unmerged(layer, what: str) -> None:
    if layer.merged:
        raise RuntimeError(f"cannot {what} while the layer is merged; call unmerge() first")


def check_addable(layer, path: Path, what: str) -> None:
    """Raise when ``path`` cannot be added to ``layer``: merged, or a path already on the layer
    excludes it (or it excludes that path; ``Path.excludes``, e.g. DoRA with IA3 or a sparse delta)."""
    check_unmerged(layer, what)
    clash = [p.label for p in _REGISTRY.values()
             if p is not path and p.present(layer) and (path.name in p.excludes or p.name in path.excludes)]
    if clash:
        raise ValueError(f"cannot {what}: the layer has {' / '.join(clash)}, which cannot be combined with "
                         f"{path.label} on one layer")


def measure(t: torch.Tensor, kind: str) -> torch.Tensor:
    """Σ t² ("l2") or Σ |t| ("l1")."""
    return t.square().sum() if kind == "l2" else t.abs().sum()


def finite_rank(matrix: torch.Tensor) -> Optional[int]:
    """rank of ``matrix`` (0 for all zeros), None when it has non-finite entries."""
    if not bool(torch.isfinite(matrix).all()):
        return None
    if not bool(matrix.any()):
        return 0
    return int(torch.linalg.matrix_rank(matrix))


class Rounding:
    """Bookkeeping of an out-of-place float64 inverse of a merged weight (``Path.invert``).

    ``err`` bounds, per entry, the magnitude of everything the merged weight was rounded with
    (so 8·eps·err bounds its rounding error); ``known`` is False where the inverse cannot recover
    the pre-trained entry (a zero IA3 scale erased it), None while everything is known.
    """

    def __init__(self, merged: torch.Tensor):
        self.err = merged.abs()
        self.known: Optional[torch.Tensor] = None

    def forget(self, known: torch.Tensor) -> None:
        """Mark the entries where ``known`` is False as not recoverable."""
        self.known = known if self.known is None else self.known & known


@dataclass(frozen=True)
class CaseSettings:
    """Sizes and rates of a random case of the paths (the benchmark, ``fastpeft check``)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.1
    density: float = 0.01
    block: Optional[int] = None


def random_tensor(weight: torch.Tensor, gen: Optional[torch.Generator], *shape: int, scale: float = 1.0,
                  shift: float = 0.0) -> torch.Tensor:
    """shift + scale·N(0, 1) of ``shape``, drawn on the CPU from ``gen``, on the weight's device in
    its adapter dtype (fp32 for a half-precision weight, as peft keeps adapters)."""
    t = torch.randn(*shape, generator=gen) * scale + shift
    return t.to(device=weight.device, dtype=adapter_dtype(weight))


class Path:
    """One PEFT path (see the module docstring); subclasses are singletons, registered by name."""

    name: str = ""
    label: str = ""                         # in messages: "LoRA", "IA3", "sparse delta"
    tensors: tuple[str, ...] = ()           # op arguments it owns = layer attribute names
    slots: Optional[tuple[str, ...]] = None  # of those, the attributes it adds (None: all tensors)
    buffers: tuple[str, ...] = ()           # of those, registered as buffers
    categories: dict[str, str] = {}         # parameter -> count_parameters category
    category: Optional[str] = None          # category its changed entries count in
    attrs: dict[str, object] = {}           # plain attributes -> value while absent
    changes_weight: bool = True             # part of the merged weight
    excludes: tuple[str, ...] = ()          # paths it is never combined with on one layer
    requires: tuple[str, ...] = ()          # paths a layer must have for it (DoRA: LoRA)
    bench_cases: dict[str, str] = {}        # benchmark case -> label (cases measuring it alone)
    combined_case: Optional[str] = None     # its case inside the benchmark's "combined" row
    peft_type: Optional[str] = None         # adapter_config.json peft_type (None: no peft format)
    peft_tuner: Optional[str] = None        # peft.tuners.<tuner>.Linear is the peft layer it converts
    peft_adapters: Optional[str] = None     # attribute of peft's layer holding {adapter: tensors}
    peft_fields: tuple[str, ...] = ()       # config fields it reads on load
    peft_biases: bool = False               # its peft config carries trained biases (LoRA's "bias")
    peft_names: tuple[str, ...] = ()        # substrings of peft's parameter names for it ("lora_")

    def __init__(self):
        if self.slots is None:
            self.slots = self.tensors
        _REGISTRY[self.name] = self

    def __repr__(self) -> str:
        return f"<fastpeft path {self.name!r}>"

    def __reduce__(self):  # copies and pickles of a layer refer to the one registered object
        return lookup, (self.name,)

    # ------------------------------------------------------------------ on a layer
    def present(self, layer) -> bool:
        """Whether ``layer`` carries this path."""
        return any(getattr(layer, t) is not None for t in self.tensors)

    def method_names(self, layer) -> list[str]:
        """Its names in ``PEFTLinear.methods``."""
        return [self.name] if self.present(layer) else []

    linear_keywords: tuple[str, ...] = ()  # its keywords of PEFTLinear.from_linear
    example: dict = {}  # from_linear keywords of a small example of it (tests/test_paths.py)

    def linear_options(self, kw: dict) -> Optional[dict]:
        """Its ``parts`` options from ``PEFTLinear.from_linear``'s keywords; None when not asked for."""
        return None

    def check(self, layer, **options) -> Optional[dict]:
        """Raise what ``parts`` would raise without drawing anything random; return the parts when
        building them draws nothing (None: call ``parts`` later)."""
        return self.parts(layer, **options)

    def parts(self, layer, **options) -> dict:
        """Validate and build what adding the path sets on ``layer`` ({attribute: value}); the
        layer is not changed."""
        raise NotImplementedError

    def adopt(self, layer, **tensors) -> dict:
        """``parts`` from existing tensors (Parameter objects kept as they are)."""
        raise NotImplementedError(f"the {self.label} path cannot adopt existing tensors")

    def assign(self, layer, parts: dict) -> None:
        """Set ``parts`` on ``layer`` (Parameters, buffers and plain attributes); cannot fail."""
        for name, value in parts.items():
            setattr(layer, name, value)

    def layout(self, layer, tensor: str, value) -> tuple:
        """The shape fastpeft gives ``value``, a tensor in peft's layout, as attribute ``tensor``."""
        return tuple(value.shape)

    def op_fields(self, layer) -> tuple[tuple[str, str], ...]:
        """(keyword of ``fastpeft.peft_linear``, layer attribute) pairs it passes; the layer caches
        them, so forward reads the attributes without calling the path."""
        return tuple((t, t) for t in self.tensors)

    eval_values: dict = {}  # keywords that take these values in eval mode (LoRA: no dropout)

    def op_kwargs(self, layer, kw: dict) -> None:
        """Put its arguments of ``fastpeft.peft_linear`` into ``kw`` (unmerged layer)."""
        for key, attr in self.op_fields(layer):
            kw[key] = getattr(layer, attr)
        if not layer.training:
            kw.update(self.eval_values)

    def extra_repr(self, layer) -> list[str]:
        return []

    # ------------------------------------------------------------------ the merged weight
    def apply(self, layer, w: torch.Tensor, rows: slice, inplace: bool = False) -> torch.Tensor:
        """Rows ``rows`` (a slice with start and stop) of the weight so far -> with this path."""
        return w

    def invert(self, layer, w: torch.Tensor, bound: Optional[Rounding] = None) -> torch.Tensor:
        """Undo ``apply`` on the whole weight: in place (unmerge) when ``bound`` is None, else out
        of place in float64, recording in ``bound`` what the inverse adds to the rounding."""
        return w

    def bias_scale(self, layer) -> Optional[torch.Tensor]:
        """Its factor on the bias when merged (b' = b ⊙ scale), or None."""
        return None

    def bias_shift(self, layer) -> Optional[torch.Tensor]:
        """Its term added to the bias when merged, after its ``bias_scale`` (b' = b ⊙ scale + shift),
        or None (LoRA's s·lora_bias); merge needs the layer to have a bias then."""
        return None

    # ------------------------------------------------------------------ accounting and penalty
    def changed(self, layer, pre) -> int:
        """Entries of the pre-trained W this path changes.  ``pre()`` gives count_parameters' view of
        the pre-trained layer (fastpeft.nn.accounting._Unmerged: weight, w_tol, w_known), built on
        first use."""
        return 0

    def max_changed(self, layer) -> int:
        """An upper bound of ``changed`` that reads no values (meta device)."""
        return 0

    def rank_alone(self, layer):
        """rank(ΔW) in closed form when this is the layer's only weight path (None: non-finite)."""
        return NotImplemented

    def penalty_alone(self, layer, kind: str, dtype: torch.dtype):
        """‖ΔW‖² ("l2") or ‖ΔW‖₁ ("l1") in closed form when this is the layer's only weight path."""
        return NotImplemented

    def penalty_extra(self, layer, kind: str) -> tuple[list, list]:
        """Penalty terms outside ΔW and the parameters they cover: ([terms], [params])."""
        return [], []

    def params(self, layer) -> list[torch.Tensor]:
        """Its Parameters on ``layer`` (the tensors with a category)."""
        return [getattr(layer, t) for t in self.categories if getattr(layer, t) is not None]

    def penalised(self, layer) -> list[torch.Tensor]:
        """The parameters whose distance from the pre-trained model ΔW's penalty covers."""
        return self.params(layer)

    # ------------------------------------------------------------------ cases (benchmark, fastpeft check)
    def random_args(self, case: str, weight: torch.Tensor, settings: CaseSettings,
                    gen: Optional[torch.Generator]) -> dict:
        """Random op keywords of benchmark case ``case`` (one of ``bench_cases``) for ``weight``,
        away from the identity init so every path contributes to the output."""
        raise NotImplementedError

    def peft_twin(self, case: str, weight: torch.Tensor, args: dict, settings: CaseSettings, wrap, target: str):
        """peft's layer over ``weight`` computing ``case`` with the values ``args``, or None when peft has none:
        (layer, {op argument: peft's Parameter holding it}, comparable: whether its math is ours
        exactly).  ``wrap(config)`` returns peft's layer for a peft config targeting module ``target``."""
        return None

    # ------------------------------------------------------------------ peft mapping (see each path)
    def peft_tensors(self, name: str, layer, prepare=lambda t: t) -> dict:
        """Save: {checkpoint key (module path included, peft's prefix not): prepare(its tensor) in
        peft's layout} of one layer."""
        raise NotImplementedError

    def peft_config(self, layers: list) -> dict:
        """Save: the adapter_config.json fields for ``layers`` [(name, layer)]."""
        raise NotImplementedError

    def peft_check_config(self, config: dict) -> None:
        """Load: raise, before any tensor is read, for config values fastpeft cannot load."""
        return None

    def peft_split(self, key: str) -> Optional[tuple[str, str]]:
        """Load: (module path, tensor name) of a checkpoint key this path reads, else None."""
        return None

    def peft_reject(self, key: str) -> None:
        """Load: raise for a checkpoint key no path of its peft_type reads."""
        raise ValueError(f"checkpoint key {key!r} is not a {self.label} tensor fastpeft understands")

    def peft_read(self, config: dict, path: str, tensors: dict, module) -> tuple[dict, dict, Optional[torch.Tensor]]:
        """Load one layer: its ``tensors`` {name from peft_split: value} and the config ->
        ({attribute: values}, adopt options, new base weight or None); ``module`` is the model's
        layer at ``path`` (a fastpeft layer or a plain nn.Linear)."""
        raise NotImplementedError

    def from_peft_layer(self, name: str, peft_layer, adapter: str, config) -> Optional[tuple[dict, dict]]:
        """A live peft layer of its ``peft_tuner``: ({attribute: peft's Parameter}, adopt options), or
        None when the layer does not use this path; raises NotImplementedError for what fastpeft
        cannot reproduce.  ``config``: the adapter's peft config (None for injected layers)."""
        raise NotImplementedError
