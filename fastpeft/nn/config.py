"""peft-style configs: one dataclass per method, ``target_modules`` as names or a regex.

Each config names its PEFT path (``path``: a fastpeft.paths name) and says what ``inject`` adds to
each target layer: ``layer_paths(name, layer)`` -> [(path name, options of path.parts)].

``target_modules`` matches a module's qualified name like peft does: a string is a regular
expression that must match the whole name; a list matches a name equal to an entry or ending
in "." + entry ("query" matches "encoder.layer.0.attention.self.query").
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

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


def check_targets(targets: TargetModules, what: str = "target_modules") -> None:
    """TypeError/ValueError unless ``targets`` is None, a valid regex, or a list of module names."""
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
    the adapted layers train).  use_dora: DoRA on top of LoRA (a trainable magnitude per output row,
    fastpeft.paths.dora).  modules_to_save: extra module names kept trainable (e.g. a head).
    lora_bias: a trainable bias on lora_B (peft's ``lora_bias``): y += s·lora_bias, zeros at init;
    merge folds it into the base bias (a layer without a bias cannot be merged, as in peft).
    fan_in_fan_out: the targets' weight layout, as peft's flag; None (the default) detects it per
    layer: transformers ``Conv1D`` layers (GPT-2, weight [K, N]) are transposed, nn.Linear is not.
    A value that contradicts a target's type is corrected with a warning, as peft does.
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
    use_dora: bool = False
    lora_bias: bool = False
    fan_in_fan_out: Optional[bool] = None
    path: ClassVar[str] = "lora"

    def __post_init__(self):
        check_positive_int("r", self.r)
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.bias not in LORA_BIAS:
            raise ValueError(f"bias must be one of {', '.join(LORA_BIAS)}, got {self.bias!r}")
        check_targets(self.target_modules)
        if not isinstance(self.use_dora, bool):
            raise TypeError(f"use_dora must be True or False, got {self.use_dora!r}")
        if not isinstance(self.lora_bias, bool):
            raise TypeError(f"lora_bias must be True or False, got {self.lora_bias!r}")
        if self.lora_bias and self.use_dora:
            raise ValueError("lora_bias=True cannot be combined with use_dora=True (peft refuses it too)")
        if self.fan_in_fan_out is not None and not isinstance(self.fan_in_fan_out, bool):
            raise TypeError(f"fan_in_fan_out must be True, False or None (detect), got {self.fan_in_fan_out!r}")

    @property
    def trains_all_biases(self) -> bool:
        """Whether every bias of the model trains (not only those of the targets)."""
        return self.bias == "all"

    def layer_paths(self, name: str, layer) -> list[tuple[str, dict]]:
        """LoRA on every target; with bias="lora_only" also BitFit on targets that have a bias."""
        lora = ("lora", dict(r=self.r, alpha=self.alpha, dropout=self.dropout, use_rslora=self.use_rslora,
                             lora_bias=self.lora_bias))
        dora = [("dora", {"with_lora": True})] * self.use_dora  # DoRA: a magnitude per row, on LoRA
        return [lora] + dora + [("bitfit", {})] * (self.bias == "lora_only" and layer.bias is not None)


@dataclass
class IA3Config:
    """IA3: layers in ``feedforward_modules`` scale their inputs, the other targets their outputs."""

    target_modules: TargetModules = None
    feedforward_modules: TargetModules = None
    modules_to_save: Optional[list[str]] = None
    backend: Optional[str] = None
    path: ClassVar[str] = "ia3"
    trains_all_biases: ClassVar[bool] = False

    def __post_init__(self):
        check_targets(self.target_modules)
        check_targets(self.feedforward_modules, "feedforward_modules")

    def layer_paths(self, name: str, layer) -> list[tuple[str, dict]]:
        ff = self.feedforward_modules is not None and matches(name, self.feedforward_modules)
        return [("ia3", {"position": "in" if ff else "out"})]


@dataclass
class BitFitConfig:
    """BitFit: train biases only.  target_modules None: every bias in the model (LayerNorm too)."""

    target_modules: TargetModules = None
    modules_to_save: Optional[list[str]] = None
    backend: Optional[str] = None
    path: ClassVar[str] = "bitfit"

    def __post_init__(self):
        check_targets(self.target_modules)

    @property
    def trains_all_biases(self) -> bool:
        return self.target_modules is None

    def layer_paths(self, name: str, layer) -> list[tuple[str, dict]]:
        return [("bitfit", {})]


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
    path: ClassVar[str] = "sparse"
    trains_all_biases: ClassVar[bool] = False

    def __post_init__(self):
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) or not 0 < self.density <= 1:
            raise ValueError(f"density must be a float in (0, 1], got {self.density!r}")
        bad_block = isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1
        if self.block is not None and bad_block:
            raise ValueError(f"block must be a positive int or None, got {self.block!r}")
        check_targets(self.target_modules)

    def layer_paths(self, name: str, layer) -> list[tuple[str, dict]]:
        index = None
        if self.indices is not None:
            if name not in self.indices:
                raise ValueError(f"SparseConfig.indices has no entry for it (it has {sorted(self.indices)[:8]})")
            index = self.indices[name]
        elif self.selection == "gradient":
            raise ValueError("selection='gradient' needs the per-layer indices: pass SparseConfig(indices="
                             "fastpeft.select_sparse_by_gradient(model, batches, config, loss_fn=...))")
        return [("sparse", dict(density=self.density, selection=self.selection, block=self.block, seed=self.seed,
                                index=index))]
