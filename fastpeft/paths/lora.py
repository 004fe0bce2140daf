"""LoRA: a trainable low-rank update of the frozen weight.

    y += s · (dropout_p(x) Aᵀ) Bᵀ        A = lora_A [r, K], B = lora_B [N, r]
    merged: W' = W + s·B·A              s = alpha / r   (alpha / √r with rsLoRA)

    lora_bias β [N] (optional, peft's ``lora_bias=True``: lora_B with a bias):
    y += s·β  (peft: lora_B(lora_A(x))·s);  merged: b' = b + s·β (needs a base bias, as in peft)

The op gets β as ``lora_bias`` and folds it into its bias (one [N] add; gradient s·Σ grad_y).
A transposed base (``fan_in_fan_out``: transformers' Conv1D, weight stored [K, N]) changes
nothing here: the layer hands every path the [N, K] view of its weight.

Init as peft's: A Kaiming-uniform (a = √5, nn.Linear's), B zeros, so a new layer computes the
frozen one.  Dropout acts on the LoRA branch only, in training; the op gets p = 0 in eval.
Closed forms when it is a layer's only weight path: ‖s·BA‖²_F = s²·Σ (AAᵀ) ⊙ (BᵀB) from two
r×r Gram matrices, and rank(BA) = rank(R_B R_Aᵀ) from the QR factors of B and Aᵀ (r×r).

peft mapping (peft 0.21): ``lora.Linear`` with ``lora_A[a].weight`` [r, K], ``lora_B[a].weight``
[N, r], ``scaling[a]``, ``lora_dropout[a]``; checkpoint keys ``<path>.lora_A.weight`` /
``<path>.lora_B.weight``; config ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``,
``rank_pattern`` / ``alpha_pattern`` (per-layer rank and alpha), ``bias`` (trained biases, see
fastpeft.interop.checkpoint) and ``init_lora_weights``.  Inits that rewrite the base weight
("pissa", "olora", "corda", "loftq", "lora_ga") leave W holding a residual W − s·B₀A₀: the layer
remembers the init (``_peft_init``) so a checkpoint names it as peft does, and loading re-runs the
deterministic ones ("pissa", "olora") on the original base.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from collections import Counter
from typing import Optional

import torch
import torch.nn as nn

from fastpeft.core.validation import check_positive_int
from fastpeft.paths.base import ROW_CHUNK, Path, check_unmerged, finite_rank, new_param, random_tensor

# peft 0.21 (LoraLayer.update_layer): these inits write a residual into the base weight.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_INIT_SUBCONFIGS = ("loftq_config", "corda_config", "lora_ga_config")


def rewrites_base(init) -> bool:
    """Whether peft's ``init_lora_weights`` value rewrites the base weight."""
    return isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS)


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
RERUNNABLE_INITS = {"pissa": _pissa_residual, "olora": _olora_residual}


def _check_dropout(dropout) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return float(dropout)


def _features(module) -> tuple[int, int]:
    """(N, K) of a layer a checkpoint adapts: an nn.Linear / fastpeft layer, or a transformers Conv1D
    (no in/out_features: its weight is [K, N])."""
    if hasattr(module, "out_features"):
        return module.out_features, module.in_features
    k, n = module.weight.shape
    return n, k


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _pattern_value(patterns: dict, name: str, default):
    # peft matches pattern keys with re.match(rf"(.*\.)?({key})$", module_name).
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _number(config: dict, field: str, default, low=None, high=None) -> float:
    value = config.get(field, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"the checkpoint's {field} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value >= high):
        raise ValueError(f"the checkpoint's {field} must be in [{low}, {high}), got {value!r}")
    return float(value)


class LoRAPath(Path):
    name = "lora"
    label = "LoRA"
    tensors = ("lora_A", "lora_B", "lora_bias")
    categories = {"lora_A": "adapter", "lora_B": "adapter", "lora_bias": "adapter"}
    category = "adapter"
    attrs = {"r": 0, "lora_alpha": 0.0, "lora_scale": 0.0, "lora_dropout": 0.0, "use_rslora": False,
             "_peft_init": None}
    bench_cases = {"lora": "LoRA", "lora_dropout": "LoRA+dropout"}
    combined_case = "lora_dropout"
    peft_type = "LORA"
    peft_tuner = "lora"
    peft_adapters = "lora_A"
    peft_fields = ("r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern", "bias",
                   "init_lora_weights", "lora_bias", "fan_in_fan_out")
    peft_biases = True  # peft's LoRA config carries trained biases ("bias": "lora_only" / "all")
    peft_names = ("lora_",)

    # ------------------------------------------------------------------ on a layer
    def present(self, layer) -> bool:
        return layer.lora_A is not None

    linear_keywords = ("r", "alpha", "dropout", "use_rslora", "lora_bias")
    example = {"r": 3, "alpha": 6, "dropout": 0.1}

    def linear_options(self, kw: dict) -> Optional[dict]:
        if not kw["r"]:
            return None
        alpha = kw["alpha"] if kw["alpha"] is not None else kw["r"]
        lora_bias = kw.get("lora_bias", False)
        if not isinstance(lora_bias, bool):
            raise TypeError(f"lora_bias must be True or False, got {lora_bias!r}")
        if lora_bias and kw.get("use_dora"):
            raise ValueError("lora_bias=True cannot be combined with use_dora=True (peft refuses it too)")
        return dict(r=kw["r"], alpha=alpha, dropout=kw["dropout"], use_rslora=kw["use_rslora"], lora_bias=lora_bias)

    def check(self, layer, r: int, alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False,
              lora_bias: bool = False) -> None:
        check_unmerged(layer, "add LoRA")
        if layer.lora_A is not None:
            raise ValueError("this layer already has a LoRA path")
        check_positive_int("r", r)
        _check_dropout(dropout)
        if not isinstance(lora_bias, bool):
            raise TypeError(f"lora_bias must be True or False, got {lora_bias!r}")
        return None  # the init is random: drawn by parts, once every layer passed its checks

    def parts(self, layer, r: int, alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False,
              lora_bias: bool = False) -> dict:
        self.check(layer, r, alpha, dropout, use_rslora, lora_bias)
        a = torch.empty(r, layer.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # peft's (and nn.Linear's) init for lora_A
        b = torch.zeros(layer.out_features, r)
        beta = new_param(layer, torch.zeros(layer.out_features)) if lora_bias else None  # peft: zeros
        return self.adopt(layer, lora_A=new_param(layer, a), lora_B=new_param(layer, b), alpha=alpha, dropout=dropout,
                          use_rslora=use_rslora, lora_bias=beta)

    def adopt(self, layer, lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: float, dropout: float = 0.0,
              use_rslora: bool = False, scale: Optional[float] = None, peft_init: Optional[dict] = None,
              lora_bias: Optional[torch.Tensor] = None) -> dict:
        """The LoRA parts with these factors; ``scale`` (default alpha/r or alpha/√r) as peft's live
        value; ``peft_init``: the base-rewriting init record (see the module docstring);
        ``lora_bias``: lora_B's bias [N] (None: none)."""
        check_unmerged(layer, "add LoRA")
        r = int(lora_A.shape[0]) if lora_A.dim() == 2 else 0
        if lora_A.dim() != 2 or r == 0 or tuple(lora_A.shape) != (r, layer.in_features):
            raise ValueError(f"lora_A must be [r, {layer.in_features}] with r > 0, got {list(lora_A.shape)}")
        if tuple(lora_B.shape) != (layer.out_features, r):
            raise ValueError(f"lora_B must be [{layer.out_features}, {r}], got {list(lora_B.shape)}")
        if lora_bias is not None:
            if not isinstance(lora_bias, torch.Tensor) or not lora_bias.is_floating_point():
                raise TypeError(f"lora_bias must be a floating-point tensor, got {type(lora_bias).__name__}")
            if tuple(lora_bias.shape) != (layer.out_features,):
                raise ValueError(f"lora_bias must be [{layer.out_features}], got {list(lora_bias.shape)}")
            if getattr(layer, "dora_magnitude", None) is not None:
                raise ValueError("lora_bias cannot be combined with DoRA on one layer (peft refuses it too)")
        dropout = _check_dropout(dropout)
        if scale is None:
            scale = float(alpha) / (math.sqrt(r) if use_rslora else r)
        return {"lora_A": lora_A, "lora_B": lora_B, "lora_bias": lora_bias, "r": r, "lora_alpha": float(alpha),
                "lora_dropout": dropout, "use_rslora": bool(use_rslora), "lora_scale": float(scale),
                "_peft_init": peft_init}


    def op_fields(self, layer):
        fields = (("lora_A", "lora_A"), ("lora_B", "lora_B"), ("lora_scale", "lora_scale"),
                  ("lora_dropout", "lora_dropout"))
        return fields + ((("lora_bias", "lora_bias"),) if layer.lora_bias is not None else ())

    eval_values = {"lora_dropout": 0.0}  # dropout only in training

    def extra_repr(self, layer) -> list[str]:
        out = [f"r={layer.r}", f"scale={layer.lora_scale:g}", f"dropout={layer.lora_dropout:g}"]
        return out + ["rslora=True"] * bool(layer.use_rslora) + ["lora_bias=True"] * (layer.lora_bias is not None)

    # ------------------------------------------------------------------ the merged weight: W + s·B·A
    def apply(self, layer, w, rows, inplace=False):
        a, b = layer.lora_A.to(w.dtype), layer.lora_B[rows].to(w.dtype)
        if inplace:
            return w.addmm_(b, a, alpha=layer.lora_scale)
        return w + layer.lora_scale * (b @ a)

    def invert(self, layer, w, bound=None):
        a, b = layer.lora_A.detach().to(w.dtype), layer.lora_B.detach().to(w.dtype)
        if bound is None:
            return w.addmm_(b, a, alpha=-layer.lora_scale)
        low = layer.lora_scale * (b @ a)
        bound.err = bound.err + low.abs()
        return w - low

    def bias_shift(self, layer):
        return None if layer.lora_bias is None else layer.lora_scale * layer.lora_bias.detach()

    # ------------------------------------------------------------------ accounting and penalty
    def changed(self, layer, pre) -> int:
        a, b = layer.lora_A.detach().float(), layer.lora_B.detach().float()
        return sum(int(torch.count_nonzero(layer.lora_scale * (b[i:i + ROW_CHUNK] @ a)))
                   for i in range(0, b.shape[0], ROW_CHUNK))

    def max_changed(self, layer) -> int:
        return layer.out_features * layer.in_features

    def rank_alone(self, layer) -> Optional[int]:
        # rank(B A) = rank(R_B R_A^T) with B = Q_B R_B and A^T = Q_A R_A: an r x r problem.
        a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            return None
        return finite_rank(torch.linalg.qr(b).R @ torch.linalg.qr(a.t()).R.t())

    def penalty_alone(self, layer, kind, dtype):
        if kind != "l2":
            return NotImplemented  # no closed form for ‖s·BA‖₁: formed in row chunks
        # ‖s·BA‖²_F = s²·tr(AᵀBᵀBA) = s²·tr((AAᵀ)(BᵀB)) = s²·Σ_ij (AAᵀ)_ij (BᵀB)_ij
        a, b = layer.lora_A.to(dtype), layer.lora_B.to(dtype)
        return layer.lora_scale ** 2 * ((a @ a.t()) * (b.t() @ b)).sum()

    # ------------------------------------------------------------------ cases
    def random_args(self, case, weight, settings, gen) -> dict:
        n, k = weight.shape
        r = settings.r
        return {"lora_A": random_tensor(weight, gen, r, k, scale=1 / math.sqrt(k)),
                "lora_B": random_tensor(weight, gen, n, r, scale=1 / math.sqrt(r)),
                "lora_scale": settings.alpha / r, "lora_dropout": settings.dropout if case == "lora_dropout" else 0.0}

    def peft_twin(self, case, weight, args, settings, wrap, target):
        import peft

        layer = wrap(peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=args["lora_dropout"],
                                     target_modules=[target]))
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(args["lora_A"])
            layer.lora_B["default"].weight.copy_(args["lora_B"])
        grads = {"lora_A": layer.lora_A["default"].weight, "lora_B": layer.lora_B["default"].weight}
        return layer, grads, args["lora_dropout"] == 0  # with dropout, peft draws its own mask

    # ------------------------------------------------------------------ peft mapping
    def peft_tensors(self, name, layer, prepare=lambda t: t) -> dict:
        out = {f"{name}.lora_A.weight": prepare(layer.lora_A), f"{name}.lora_B.weight": prepare(layer.lora_B)}
        if layer.lora_bias is not None:
            out[f"{name}.lora_B.bias"] = prepare(layer.lora_bias)
        return out

    def peft_config(self, layers) -> dict:
        """LoRA's config fields (``bias`` is added by save_adapter); per-layer ranks and alphas that
        reproduce each layer's live scale exactly go to rank_pattern / alpha_pattern."""
        ranks = {name: int(layer.r) for name, layer in layers}
        use_rslora = {bool(layer.use_rslora) for _, layer in layers} == {True}
        # plain Python numbers only (a scale set as a numpy or tensor value must not break json)
        alphas = {name: float(layer.lora_scale) * (math.sqrt(ranks[name]) if use_rslora else ranks[name])
                  for name, layer in layers}
        dropouts = [float(layer.lora_dropout) for _, layer in layers]
        if len(set(dropouts)) > 1:
            warnings.warn(f"LoRA layers use different dropout rates {sorted(set(dropouts))}; peft's config holds one: "
                          f"saving the most common (dropout only matters for further training)", stacklevel=3)
        r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
        config = {
            "peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": _most_common(dropouts),
            "use_rslora": use_rslora, "target_modules": [name for name, _ in layers],
            "rank_pattern": {re.escape(n): v for n, v in ranks.items() if v != r},  # an escaped full name: that module
            "alpha_pattern": {re.escape(n): v for n, v in alphas.items() if v != alpha},
            # peft sets fan_in_fan_out for Conv1D targets itself (with a warning when it is False)
            "fan_in_fan_out": any(getattr(layer, "fan_in_fan_out", False) for _, layer in layers),
            "init_lora_weights": True, "use_dora": False,
            "lora_bias": any(layer.lora_bias is not None for _, layer in layers),
            "layers_to_transform": None, "layers_pattern": None,
        }
        init = self._shared_init(layers)
        if init is not None:
            config.update(init)
            if init["init_lora_weights"].lower() not in RERUNNABLE_INITS:
                name = init["init_lora_weights"]
                warnings.warn(f"save_adapter: init_lora_weights={name!r} rewrote the base weights; "
                              "the checkpoint names it as peft does, but fastpeft.load_adapter cannot re-run it: peft "
                              "recommends converting such adapters to plain LoRA (save_pretrained("
                              "path_initial_model_for_weight_conversion=...))", stacklevel=3)
        return config

    @staticmethod
    def _shared_init(layers) -> Optional[dict]:
        """The base-rewriting init the layers share (None: the plain init); raise when they differ."""
        records = {json.dumps(m._peft_init, sort_keys=True, default=str): (n, m._peft_init) for n, m in layers}
        if len(records) > 1:
            found = ", ".join(f"{n!r}: init_lora_weights={(rec or {}).get('init_lora_weights', True)!r}"
                              for n, rec in records.values())
            raise ValueError(f"peft's config holds one init_lora_weights, these layers differ ({found}); a base-"
                             "rewriting init cannot be written for some layers only: convert the adapter to plain "
                             "LoRA with peft (save_pretrained(path_initial_model_for_weight_conversion=...)) before "
                             "from_peft")
        return next(iter(records.values()))[1]

    def peft_check_config(self, config: dict) -> None:
        """Raise, before any tensor is read, for config values fastpeft cannot load."""
        init = config.get("init_lora_weights", True)
        if rewrites_base(init) and init.lower() not in RERUNNABLE_INITS:
            raise NotImplementedError(
                f"the checkpoint was trained from init_lora_weights={init!r}, which rewrote the base weights; fastpeft "
                f"re-runs only {sorted(RERUNNABLE_INITS)} on load. Convert the adapter to plain LoRA with peft "
                "(save_pretrained(path_initial_model_for_weight_conversion=...)) and load that")
        if not isinstance(config.get("use_rslora", False), bool):
            raise ValueError(f"the checkpoint's use_rslora must be true or false, got {config.get('use_rslora')!r}")
        _number(config, "lora_dropout", 0.0, 0.0, 1.0)

    def peft_split(self, key: str) -> Optional[tuple[str, str]]:
        for suffix in (".lora_A.weight", ".lora_B.weight"):
            if key.endswith(suffix):
                return key[:-len(suffix)], suffix[1:7]
        if key.endswith(".lora_B.bias"):  # lora_bias=True
            return key[:-len(".lora_B.bias")], "lora_bias"
        return None

    def peft_reject(self, key: str) -> None:
        if "lora_embedding" in key:
            raise NotImplementedError(f"checkpoint key {key!r}: LoRA on embeddings is not supported")
        raise ValueError(f"checkpoint key {key!r} is not a LoRA tensor fastpeft understands")

    def peft_read(self, config: dict, path: str, tensors: dict, module) -> tuple[dict, dict, Optional[torch.Tensor]]:
        """One layer of a checkpoint: ({attribute: values}, adopt options, new base weight or None).

        ``module`` is the model's layer at ``path`` (a fastpeft layer or a plain nn.Linear)."""
        if not {"lora_A", "lora_B"} <= set(tensors):
            raise ValueError(f"{path}: the checkpoint has {sorted(tensors)} but LoRA needs both lora_A and lora_B")
        if "lora_bias" in tensors and config.get("lora_bias", False) is not True:
            raise ValueError(f"{path}.lora_B.bias: the checkpoint has a bias on lora_B but its config says "
                             f"lora_bias={config.get('lora_bias', False)!r} (peft would ignore the tensor)")
        A, B = tensors["lora_A"], tensors["lora_B"]
        if A.dim() != 2 or A.shape[0] == 0:
            raise ValueError(f"{path}.lora_A: expected a [r, in_features] tensor with r > 0, got {list(A.shape)}")
        r = int(A.shape[0])
        n, k = _features(module)
        checked = [("lora_A", A, (r, k)), ("lora_B", B, (n, r))]
        if "lora_bias" in tensors:
            checked.append(("lora_B.bias", tensors["lora_bias"], (n,)))
        for what, t, shape in checked:
            if tuple(t.shape) != shape:
                raise ValueError(f"{path}.{what}: checkpoint shape {list(t.shape)} does not match the model's "
                                 f"{list(shape)}")
        existing = getattr(module, "lora_A", None)
        if existing is not None and module.r != r:
            raise ValueError(f"{path}: the model's LoRA has rank {module.r}, the checkpoint's {r}")
        alpha = _number({"lora_alpha": _pattern_value(config.get("alpha_pattern") or {}, path,
                                                      config.get("lora_alpha", 8))}, "lora_alpha", 8)
        use_rslora = config.get("use_rslora", False)
        options = dict(alpha=alpha, dropout=_number(config, "lora_dropout", 0.0, 0.0, 1.0), use_rslora=use_rslora)
        init = config.get("init_lora_weights", True)
        base = None
        if rewrites_base(init):  # the init peft re-runs on load: the base then holds its residual
            if getattr(module, "fan_in_fan_out", False) or not hasattr(module, "out_features"):
                raise NotImplementedError(f"init_lora_weights={init!r} on {path!r}, a transposed (Conv1D) base: "
                                          "fastpeft re-runs base-rewriting inits on nn.Linear bases only")
            if type(module) is not nn.Linear:
                raise ValueError(f"init_lora_weights={init!r} rewrites the base weight of {path!r}, which is already "
                                 "a fastpeft layer (its weight may be a residual already): load into the original "
                                 "model, with a plain nn.Linear there")
            base = RERUNNABLE_INITS[init.lower()](module.weight, r, alpha / (math.sqrt(r) if use_rslora else r))
            options["peft_init"] = {"init_lora_weights": init}
        elif existing is not None:
            options["peft_init"] = module._peft_init
        values = {"lora_A": A, "lora_B": B}
        if "lora_bias" in tensors:  # missing with lora_bias=True: peft's zero init, i.e. no bias term
            values["lora_bias"] = tensors["lora_bias"]
        return values, options, base

    def from_peft_layer(self, name, layer, adapter, config) -> tuple[dict, dict]:
        dora = layer.use_dora.get(adapter, False)  # read by the DoRA path (fastpeft.paths.dora)
        if dora != (adapter in getattr(layer, "lora_magnitude_vector", {})):
            raise NotImplementedError(f"{name}: use_dora={dora} but the layer {'lacks' if dora else 'has'} a DoRA "
                                      "magnitude vector")
        variant = layer.lora_variant.get(adapter)
        if variant is not None and not (dora and type(variant).__name__ == "DoraLinearVariant"):
            raise NotImplementedError(f"{name}: the LoRA variant {type(layer.lora_variant[adapter]).__name__} "
                                      "is not supported by fastpeft (plain LoRA and rsLoRA are)")
        lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
        if bool(layer.lora_bias.get(adapter, False)) != (getattr(lora_B, "bias", None) is not None):
            raise NotImplementedError(f"{name}: lora_bias={layer.lora_bias.get(adapter, False)} but lora_B "
                                      f"{'has no' if layer.lora_bias.get(adapter, False) else 'has a'} bias")
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
        options = dict(alpha=float(layer.lora_alpha[adapter]), dropout=p,
                       use_rslora=bool(layer.use_rslora.get(adapter, False)),
                       scale=float(layer.scaling[adapter]),  # peft's live value (set_scale may have changed it)
                       peft_init=self._init_record(config))  # the base holds the init's residual: save must say so
        tensors = {"lora_A": lora_A.weight, "lora_B": lora_B.weight}
        if lora_B.bias is not None:  # lora_bias=True: y += scaling · lora_B.bias
            tensors["lora_bias"] = lora_B.bias
        return tensors, options

    @staticmethod
    def _init_record(config) -> Optional[dict]:
        """The config fields of a base-rewriting init (to write into a checkpoint again), or None."""
        init = getattr(config, "init_lora_weights", True)
        if not rewrites_base(init):
            return None
        record = {"init_lora_weights": init}
        for key in _INIT_SUBCONFIGS:
            value = getattr(config, key, None)
            if value:
                record[key] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return record


LORA = LoRAPath()
