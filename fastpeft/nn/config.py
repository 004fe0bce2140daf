"""peft-style configs: one dataclass per method, ``target_modules`` as names or a regex.

``target_modules`` matches a module's qualified name like peft does: a string is a regular
expression that must match the whole name; a list matches a name equal to an entry or ending
in "." + entry ("query" matches "encoder.layer.0.attention.self.query").
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

from fastpeft.core.validation import check_positive_int

TargetModules = Optional[Union[str, list[str]]]
LORA_BIAS = ("none", "all", "lora_only")


def matches(name: str, targets: TargetModules) -> bool:
    """Whether qualified module name ``name`` is selected by ``targets`` (None selects everything)."""
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _check_targets(targets: TargetModules, what: str = "target_modules") -> None:
    if targets is None or isinstance(targets, str):
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as exc:
                raise ValueError(f"{what} is not a valid regular expression: {exc}") from None
        return
    if not isinstance(targets, (list, tuple, set)) or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"{what} must be a str (regex), a list of module names, or None")


@dataclass
class LoRAConfig:
    """LoRA on matching nn.Linear layers: scale alpha/r (alpha/sqrt(r) with use_rslora).

    bias: "none" (biases frozen), "all" (every bias in the model trains), "lora_only" (biases of
    the adapted layers train).  modules_to_save: extra module names kept trainable (e.g. a head).
    target_modules None adapts every nn.Linear except one whose weight is tied to another module
    (an output layer sharing the input embeddings), as peft's "all-linear" leaves the output layer
    out; the same default holds for every config (see fastpeft.nn.inject).
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: TargetModules = None
    use_rslora: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    backend: Optional[str] = None

    def __post_init__(self):
        check_positive_int("r", self.r)
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.bias not in LORA_BIAS:
            raise ValueError(f"bias must be one of {', '.join(LORA_BIAS)}, got {self.bias!r}")
        _check_targets(self.target_modules)


@dataclass
class IA3Config:
    """IA3: layers in ``feedforward_modules`` scale their inputs, the other targets their outputs."""

    target_modules: TargetModules = None
    feedforward_modules: TargetModules = None
    modules_to_save: Optional[list[str]] = None
    backend: Optional[str] = None

    def __post_init__(self):
        _check_targets(self.target_modules)
        _check_targets(self.feedforward_modules, "feedforward_modules")


@dataclass
class BitFitConfig:
    """BitFit: train biases only.  target_modules None: every bias in the model (LayerNorm too)."""

    target_modules: TargetModules = None
    modules_to_save: Optional[list[str]] = None
    backend: Optional[str] = None

    def __post_init__(self):
        _check_targets(self.target_modules)


@dataclass
class SparseConfig:
    """Sparse fine-tuning of a fixed fraction ``density`` of each target weight's entries.

    selection: "random", "magnitude" (largest |W|) or "gradient" (largest accumulated squared
    gradient; pass the per-layer indices from fastpeft.select_sparse_by_gradient as ``indices``,
    which reads this config's targets, density and block, not its selection).  ``indices``, when
    given, is used whatever the selection.
    block: b for b x b block-structured masks.  seed: makes random selection deterministic.
    """

    density: float = 0.01
    selection: str = "magnitude"
    block: Optional[int] = None
    target_modules: TargetModules = None
    seed: int = 0
    indices: Optional[dict] = field(default=None, repr=False)
    modules_to_save: Optional[list[str]] = None
    backend: Optional[str] = None

    def __post_init__(self):
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) or not 0 < self.density <= 1:
            raise ValueError(f"density must be a float in (0, 1], got {self.density!r}")
        if self.block is not None and (isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1):
            raise ValueError(f"block must be a positive int or None, got {self.block!r}")
        _check_targets(self.target_modules)
