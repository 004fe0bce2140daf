"""``fastpeft bench``: every PEFT method, on every backend, over real model layer shapes, in one table.

For each layer shape (from MiniLM, a 1B-class and a 7B-class model; attention and MLP) and each
method (frozen base, LoRA, LoRA+dropout, IA3 on inputs, IA3 on outputs, BitFit, sparse, all of
them combined) the bench builds one layer per available backend, plus peft's layer for the same
method when peft is installed, and measures side by side:

- forward and forward+backward time: warm-up first, then ``repeat`` samples per case, the cases
  of one shape interleaved (rotating order each round) so drift hits them all alike, medians;
  each sample times ``number`` calls (the same for every case of the shape) so short calls are
  not lost in timer noise.  The forward is a training forward (grad enabled, x requires grad).
- ratios to the frozen ``nn.Linear`` of the same shape in the same run, and to peft's layer;
- saved-for-backward MiB and the step's peak memory (``fastpeft.profile_memory``);
- trainable parameters by category (the categories of ``fastpeft.count_parameters``);
- the largest relative error ||out - ref|| / ||ref|| over the output and every gradient, against
  ``fastpeft.reference.peft_linear`` evaluated in float64 on the same inputs and dropout seed.

Adapters are initialised randomly (not peft's zero B / unit IA3 / zero sparse values) so every
path contributes to the output and the error check means something; timing does not depend on
the values.  On CUDA the default dtype is bfloat16 (adapters stay float32, as in peft).

After the layer table, a model-level table (``fastpeft.tools.model_bench``): a training step of
whole models (forward, backward, AdamW) for every method against peft and against the same model
with nothing trainable; ``--size`` chooses its model sizes too (small: one small decoder), ``--model
SIZES`` others, ``--model-only`` / ``--no-model`` one table alone.  ``--json`` writes both tables'
rows (``result["model"]``); ``--plot FILE`` draws the layer plot at FILE and the model-level plot
at FILE-model.png (at FILE with ``--model-only``).

The command line is wired by ``fastpeft.tools.cli``: ``add_arguments(parser)`` and ``run(args)``.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from fastpeft.core.backends import available_backends, resolve, unavailable_reason
from fastpeft.core.ops import peft_linear
from fastpeft.paths import CATEGORIES, DISPLAY_ORDER, CaseSettings, Path, bench_cases
from fastpeft.reference import peft_linear as reference_peft_linear
from fastpeft.tools.equivalence import rel_err, tolerance
from fastpeft.tools.layer_rows import format_layer_rows, run_layer_rows
from fastpeft.tools.machine import default_device, load_average, machine_info, versions
from fastpeft.tools.model_bench import MODEL_METHODS, MODEL_SIZES, format_model_table, run_model_bench, write_model_plot
from fastpeft.tools.model_zoo import SIZES as SIZES_OF_MODELS
from fastpeft.tools.model_zoo import missing_requirement
from fastpeft.tools.profiling import profile_memory

__all__ = ["SHAPES", "PRESETS", "METHODS", "add_arguments", "run", "run_bench", "machine_info",
           "format_table", "write_plot", "make_case", "LayerCase", "default_backends"]


# ----------------------------------------------------------------------------------------------
# What is measured
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerShape:
    key: str
    label: str
    k: int  # in_features
    n: int  # out_features


SHAPES = {s.key: s for s in (
    LayerShape("minilm.attn", "MiniLM-L6 attention q/k/v", 384, 384),
    LayerShape("minilm.mlp", "MiniLM-L6 MLP up (intermediate)", 384, 1536),
    LayerShape("1b.attn", "Llama-3.2-1B attention q_proj", 2048, 2048),
    LayerShape("1b.mlp", "Llama-3.2-1B MLP up_proj", 2048, 8192),
    LayerShape("7b.attn", "Llama-2-7B attention q_proj", 4096, 4096),
    LayerShape("7b.mlp", "Llama-2-7B MLP up_proj", 4096, 11008),
)}


@dataclass(frozen=True)
class Preset:
    tokens: int  # M, rows of x (batch x sequence)
    shapes: tuple
    repeat: int
    note: str
    models: tuple = ()  # model-level sizes (fastpeft.tools.model_zoo.SIZES)


PRESETS = {
    "tiny": Preset(16, ("minilm.attn",), 2, "one small shape and the tiny decoder, for tests and smoke runs",
                   ("tiny",)),
    "small": Preset(64, ("minilm.attn", "minilm.mlp", "1b.attn", "1b.mlp", "7b.attn"), 5,
                    "the default: MiniLM, 1B and 7B attention shapes at M=64 tokens and a training step of a small "
                    "decoder (hidden 256; under 3 minutes on 2 CPU cores)", ("small",)),
    "medium": Preset(512, ("minilm.attn", "minilm.mlp", "1b.attn", "1b.mlp", "7b.attn", "7b.mlp"), 5,
                     "every shape at M=512 tokens; decoders of hidden 512, 1024 and 2048", ("512", "1024", "2048")),
    "large": Preset(2048, ("minilm.attn", "minilm.mlp", "1b.attn", "1b.mlp", "7b.attn", "7b.mlp"), 7,
                    "every shape at M=2048 tokens (a GPU-sized run); the three decoders and MiniLM",
                    ("512", "1024", "2048", "minilm")),
}
FULL_MODEL_SIZES = "512,1024,2048,minilm"  # bare --model

_CASES = bench_cases()  # {case: its path}: every path alone, its cases in DISPLAY_ORDER
METHODS = ("base", *_CASES, "combined")
METHOD_LABELS = {"base": "frozen base", **{case: p.bench_cases[case] for case, p in _CASES.items()},
                 "combined": "combined"}
# Pseudo-backends: the plain frozen nn.Linear every ratio is relative to, and peft's layers.
TORCH, PEFT = "torch", "peft"

_CATEGORIES = ("weight", "bias", "adapter", "prompt", "scaling", "sparse")


# ----------------------------------------------------------------------------------------------
# Layers under test
# ----------------------------------------------------------------------------------------------

class _FusedLayer(nn.Module):
    """One frozen linear layer with the paths of one method, computed by ``fastpeft.peft_linear``
    on a chosen backend.  Its tensors are attributes named after the op's arguments (as in
    fastpeft's modules): trainable ones Parameters, the sparse index a buffer."""

    PARAM_CATEGORIES = {"weight": "weight", "bias": "bias", **CATEGORIES}

    def __init__(self, weight, bias, backend, args: dict):
        super().__init__()
        self.weight, self.bias = weight, bias
        for name, value in args.items():
            if isinstance(value, nn.Parameter):
                setattr(self, name, value)
            elif isinstance(value, torch.Tensor):
                self.register_buffer(name, value)
        self.args = dict(args)  # the same tensor objects: the call reads them without attribute lookups
        self.backend = backend
        self.dropout_seed = None  # None: a fresh mask per call, as in training

    def forward(self, x):
        return peft_linear(x, self.weight, self.bias, dropout_seed=self.dropout_seed, backend=self.backend,
                           **self.args)


class _OneLayer(nn.Module):
    """The one-layer model peft.get_peft_model wraps."""

    def __init__(self, linear):
        super().__init__()
        self.lin = linear

    def forward(self, x):
        return self.lin(x)


@dataclass
class _Case:
    method: str
    backend: str
    module: nn.Module
    # canonical op-argument name -> the Parameter whose .grad is that argument's gradient
    grads: dict
    set_seed: Optional[Callable[[Optional[int]], None]] = None
    comparable: bool = True  # False when its math differs from ours (peft's own dropout mask)
    fwd: list = field(default_factory=list)
    fwd_bwd: list = field(default_factory=list)


def _param(t: torch.Tensor, trainable: bool = True) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=trainable)


def _case_values(weight: torch.Tensor, settings: CaseSettings, gen: torch.Generator) -> dict:
    """{case: op keywords with random values} for every path case of one shape, shared by every
    backend and by peft; "combined" joins each path's ``combined_case``."""
    values = {case: path.random_args(case, weight, settings, gen) for case, path in _CASES.items()}
    values["base"] = {}
    values["combined"] = {k: v for p in DISPLAY_ORDER if p.combined_case for k, v in values[p.combined_case].items()}
    return values


def _method_kwargs(method: str, values: dict) -> dict:
    """Arguments of peft_linear for one method: fresh trainable Parameters for the paths' parameters."""
    if method not in values:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return {k: _param(v) if isinstance(v, torch.Tensor) and k in _TRAINED else v for k, v in values[method].items()}


_TRAINED = set(CATEGORIES) | {"bias"}  # op arguments that train (the sparse index does not)


def _fused_case(method, backend, weight, frozen_bias, values) -> _Case:
    kw = _method_kwargs(method, values)
    bias = kw.pop("bias", frozen_bias)
    layer = _FusedLayer(weight, bias, backend, kw)
    grads = {name: p for name, p in layer.named_parameters() if p.requires_grad}

    def set_seed(seed):
        layer.dropout_seed = seed

    return _Case(method, backend, layer, grads, set_seed)


def _torch_case(method, weight, frozen_bias, values) -> Optional[_Case]:
    """Plain nn.Linear, for the methods it can compute: frozen (the baseline of every ratio) or with a
    trainable bias (BitFit); None for the others."""
    args = values.get(method, {})
    if set(args) - {"bias"}:
        return None
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=True, device=weight.device, dtype=weight.dtype)
    lin.weight = weight
    lin.bias = _param(args["bias"]) if "bias" in args else frozen_bias
    grads = {"bias": lin.bias} if "bias" in args else {}
    return _Case(method, TORCH, lin, grads)


def _peft_case(method, weight, frozen_bias, values, settings: CaseSettings) -> Optional[_Case]:
    """peft's layer for the method (None when peft has no such layer or is not installed)."""
    path = _CASES.get(method)
    if path is None or not _peft_available():
        return None
    import peft

    def wrap(config):
        n, k = weight.shape
        lin = nn.Linear(k, n, bias=True, device=weight.device, dtype=weight.dtype)
        lin.weight, lin.bias = weight, frozen_bias
        return peft.get_peft_model(_OneLayer(lin), config).base_model.model.lin

    twin = path.peft_twin(method, weight, values[method], settings, wrap, "lin")
    if twin is None:
        return None
    layer, grads, comparable = twin
    return _Case(method, PEFT, layer, grads, comparable=comparable)


def _shape_data(k, n, m, settings: CaseSettings, dtype, device, seed):
    """The frozen weight and bias, case values, x [m, k] (requires grad) and dy [m, n] of one shape."""
    gen = torch.Generator().manual_seed(seed)
    weight = nn.Parameter((torch.randn(n, k, generator=gen) / math.sqrt(k)).to(device=device, dtype=dtype),
                          requires_grad=False)
    frozen_bias = nn.Parameter((torch.randn(n, generator=gen) * 0.1).to(device=device, dtype=dtype),
                               requires_grad=False)
    values = _case_values(weight, settings, gen)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    gy = torch.randn(m, n, generator=gen).to(device=device, dtype=dtype)
    return weight, frozen_bias, values, x, gy


@dataclass
class LayerCase:
    """One layer under test with its inputs, for external harnesses (bench/ pytest-benchmark suites).

    ``fwd()`` runs a training forward; ``fwd_bwd()`` forward + backward with every gradient.
    """
    method: str
    backend: str
    module: nn.Module
    x: torch.Tensor
    gy: torch.Tensor
    _case: _Case

    def fwd(self) -> None:
        _run_fwd(self._case, self.x)

    def fwd_bwd(self) -> None:
        _run_fwd_bwd(self._case, self.x, self.gy)


def make_case(method: str, backend: str, k: int, n: int, *, tokens: int, r: int = 16, alpha: Optional[float] = None,
              density: float = 0.01, block: Optional[int] = None, dropout: float = 0.1,
              dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> Optional[LayerCase]:
    """Build the layer the bench measures for ``method`` on ``backend`` (a fastpeft backend,
    "torch" for plain nn.Linear (methods base and bitfit), or "peft"), with random x [tokens, k] and
    output gradient.  Returns None when that backend has no layer for the method."""
    alpha = float(2 * r if alpha is None else alpha)
    settings = CaseSettings(r=r, alpha=alpha, dropout=dropout, density=density, block=block)
    weight, frozen_bias, values, x, gy = _shape_data(k, n, tokens, settings, dtype, torch.device(device), seed)
    if method not in values:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if backend == TORCH:
        case = _torch_case(method, weight, frozen_bias, values)
    elif backend == PEFT:
        case = _peft_case(method, weight, frozen_bias, values, settings)
    else:
        case = _fused_case(method, backend, weight, frozen_bias, values)
    if case is None:
        return None
    return LayerCase(method, backend, case.module, x, gy, case)


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear_grads(case: _Case, x: torch.Tensor) -> None:
    x.grad = None
    for p in case.grads.values():
        p.grad = None


def _run_fwd(case: _Case, x: torch.Tensor) -> None:
    case.module(x)


def _run_fwd_bwd(case: _Case, x: torch.Tensor, gy: torch.Tensor) -> None:
    _clear_grads(case, x)
    case.module(x).backward(gy)


def _time(fn: Callable[[], None], number: int, device: torch.device) -> float:
    """Seconds per call of ``number`` back-to-back calls."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(number):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / number


def _check_outputs(case: _Case, x: torch.Tensor, gy: torch.Tensor, seed: int) -> dict:
    _clear_grads(case, x)
    if case.set_seed is not None:
        case.set_seed(seed)
    y = case.module(x)
    y.backward(gy)
    out = {"y": y.detach(), "x": x.grad}
    for name, p in case.grads.items():
        out[name] = p.grad.reshape(-1)  # peft keeps IA3 scales as [1, K] / [N, 1]
    if case.set_seed is not None:
        case.set_seed(None)
    _clear_grads(case, x)
    return out


def _reference(case: _Case, x: torch.Tensor, gy: torch.Tensor, seed: int) -> dict:
    """Output and every gradient of the case's math, in float64, with fastpeft.reference."""
    layer = case.module

    def leaf(t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t  # scalars and the sparse index
        return t.detach().double().requires_grad_(t.requires_grad)

    leaves = {name: leaf(t) for name, t in (("weight", layer.weight), ("bias", layer.bias), *layer.args.items())}
    x64 = x.detach().double().requires_grad_(True)
    y = reference_peft_linear(x64, dropout_seed=seed, **leaves)
    y.backward(gy.double())
    out = {"y": y.detach(), "x": x64.grad}
    for name in case.grads:
        out[name] = leaves[name].grad.reshape(-1)
    return out


def _trainable(module: nn.Module) -> dict:
    """Trainable parameters by count_parameters' categories (PARAM_CATEGORIES of each module
    class, else: names ending in "bias" are biases, peft's adapters by the path whose ``peft_names``
    they hold (lora_*, ia3_*, shira_*), anything else a weight)."""
    counts = dict.fromkeys(_CATEGORIES, 0)
    for mod_name, mod in module.named_modules():
        cats = getattr(type(mod), "PARAM_CATEGORIES", {})
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = f"{mod_name}.{name}" if mod_name else name
            peft_path = next((q for q in DISPLAY_ORDER if any(s in full for s in q.peft_names)), None)
            if name in cats:
                cat = cats[name]
            elif peft_path is not None:
                cat = peft_path.category
            elif name.endswith("bias"):
                cat = "bias"
            else:
                cat = "weight"
            counts[cat] += p.numel()
    return counts


class _Progress:
    """A progress bar on stderr: redrawn in place on a terminal; elsewhere (logs, CI) one line at
    most every few seconds."""

    def __init__(self, total: int, enabled: bool, every_s: float = 3.0):
        self.total, self.done, self.enabled = max(1, total), 0, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.start = self._last = time.perf_counter()
        self.every_s = every_s

    def step(self, label: str, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if not self.enabled:
            return
        now = time.perf_counter()
        frac = self.done / self.total
        line = f"[{'#' * int(frac * 24):<24}] {100 * frac:5.1f}%  {now - self.start:6.1f}s  {label}"
        if self.tty:
            sys.stderr.write("\r" + line[:110].ljust(110))
        elif now - self._last >= self.every_s or self.done == self.total:
            sys.stderr.write(line + "\n")
            self._last = now
        else:
            return
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _bench_shape(shape: LayerShape, m: int, r: int, alpha: float, methods, backends, use_peft: bool,
                 dtype: torch.dtype, device: torch.device, repeat: int, warmup: int, min_sample_s: float,
                 density: float, dropout: float, seed: int, progress: _Progress) -> list[dict]:
    n, k = shape.n, shape.k
    settings = CaseSettings(r=r, alpha=alpha, dropout=dropout, density=density)
    weight, frozen_bias, values, x, gy = _shape_data(k, n, m, settings, dtype, device, seed)

    cases = [_torch_case("base", weight, frozen_bias, values)]
    for method in methods:
        torch_case = _torch_case(method, weight, frozen_bias, values) if method != "base" else None
        if torch_case is not None:
            cases.append(torch_case)
        for backend in backends:
            cases.append(_fused_case(method, backend, weight, frozen_bias, values))
        if use_peft:
            case = _peft_case(method, weight, frozen_bias, values, settings)
            if case is not None:
                cases.append(case)
    tag = f"{shape.key} M={m}"

    # Warm-up (also the first touch of lazily built kernels), then size each case's samples so
    # one lasts about min_sample_s: short calls are repeated, long ones timed one by one.
    numbers = {}
    for case in cases:
        for _ in range(warmup):
            _run_fwd(case, x)
            _run_fwd_bwd(case, x, gy)
        t_case = _time(lambda c=case: _run_fwd_bwd(c, x, gy), 1, device)
        numbers[id(case)] = max(1, min(1000, math.ceil(min_sample_s / max(t_case, 1e-7))))
        progress.step(f"{tag} warm-up {case.method}/{case.backend}")

    was_gc = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for rep in range(repeat):
            shift = rep % len(cases)
            for case in cases[shift:] + cases[:shift]:
                number = numbers[id(case)]
                case.fwd.append(_time(lambda c=case: _run_fwd(c, x), number, device))
                case.fwd_bwd.append(_time(lambda c=case: _run_fwd_bwd(c, x, gy), number, device))
            progress.step(f"{tag} timing round {rep + 1}/{repeat}", len(cases))
    finally:
        if was_gc:
            gc.enable()

    # Errors against float64 (one reference per method) and memory, case by case.
    check_seed = 1234
    refs: dict = {}
    rows = []
    for case in cases:
        err = None
        if case.comparable:
            out = _check_outputs(case, x, gy, check_seed)
            if case.method not in refs:
                ref_case = next((c for c in cases if c.method == case.method and isinstance(c.module, _FusedLayer)),
                                None)
                refs[case.method] = _reference(ref_case, x, gy, check_seed) if ref_case is not None else None
            ref = refs[case.method]
            if ref is None:  # torch base without a fused case of the same method
                ref = _reference(_fused_case(case.method, "reference", weight, frozen_bias, values), x, gy, check_seed)
                refs[case.method] = ref
            err = max(rel_err(out[name], ref[name]) for name in out)
        _clear_grads(case, x)
        mem = profile_memory(case.module, x)
        _clear_grads(case, x)
        trainable = _trainable(case.module)
        rows.append(dict(
            method=case.method, backend=case.backend, dtype=str(dtype).replace("torch.", ""),
            shape=dict(name=shape.key, label=shape.label, M=m, K=k, N=n, r=r),
            fwd_ms=1e3 * statistics.median(case.fwd), fwd_bwd_ms=1e3 * statistics.median(case.fwd_bwd),
            fwd_ms_samples=[1e3 * t for t in case.fwd], fwd_bwd_ms_samples=[1e3 * t for t in case.fwd_bwd],
            calls_per_sample=numbers[id(case)], saved_mib=mem["saved_bytes"] / 2**20,
            peak_mib=mem["peak_bytes"] / 2**20,
            peak_source=mem["peak_source"], trainable=trainable, trainable_total=sum(trainable.values()),
            max_rel_err=err, tolerance=tolerance(dtype, device) if case.backend not in (TORCH, PEFT) else None))
        progress.step(f"{tag} errors+memory {case.method}/{case.backend}")

    base_row = rows[0]
    peft_rows = {row["method"]: row for row in rows if row["backend"] == PEFT}
    for row in rows:
        row["ratio_fwd"] = row["fwd_ms"] / base_row["fwd_ms"]
        row["ratio_fwd_bwd"] = row["fwd_bwd_ms"] / base_row["fwd_bwd_ms"]
        p = peft_rows.get(row["method"])
        row["ratio_vs_peft"] = row["fwd_bwd_ms"] / p["fwd_bwd_ms"] if p is not None else None
        row["ratio_vs_peft_fwd"] = row["fwd_ms"] / p["fwd_ms"] if p is not None else None
    return rows


def _cases_per_shape(methods, backends, use_peft) -> int:
    peft_ok = use_peft and _peft_available()
    paths = [_CASES[m] for m in methods if m in _CASES]
    on_torch = sum(set(p.tensors) <= {"bias"} for p in paths)  # plain nn.Linear computes them (BitFit)
    on_peft = sum(type(p).peft_twin is not Path.peft_twin for p in paths) if peft_ok else 0
    return 1 + len(methods) * len(backends) + on_torch + on_peft


def _peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def run_bench(*, shapes, tokens: int, r: int = 16, alpha: Optional[float] = None, methods=METHODS,
              backends=None, use_peft: bool = True, dtype: Optional[torch.dtype] = None, device=None,
              repeat: int = 5, warmup: int = 1, min_sample_ms: float = 10.0, density: float = 0.01,
              dropout: float = 0.1, seed: int = 0, progress: bool = True) -> dict:
    """Run the layer bench and return ``{"machine", "versions", "settings", "rows"}`` (see module doc)."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    alpha = float(2 * r if alpha is None else alpha)
    backends = list(backends) if backends is not None else default_backends(device)
    use_peft = use_peft and _peft_available()
    shapes = [SHAPES[s] if isinstance(s, str) else s for s in shapes]
    load_before = load_average()
    per_shape = _cases_per_shape(methods, backends, use_peft)
    bar = _Progress(len(shapes) * per_shape * (2 + repeat), progress)
    rows = []
    try:
        for shape in shapes:
            rows += _bench_shape(shape, tokens, r, alpha, methods, backends, use_peft, dtype, device, repeat,
                                 warmup, min_sample_ms / 1e3, density, dropout, seed, bar)
            gc.collect()  # the shape's layers and tensors, before the next shape is built
    finally:
        bar.close()
    settings = dict(tokens=tokens, r=r, alpha=alpha, lora_dropout=dropout, sparse_density=density, repeat=repeat,
                    warmup=warmup, min_sample_ms=min_sample_ms, device=str(device),
                    dtype=str(dtype).replace("torch.", ""),
                    backends=backends, peft=use_peft, seed=seed,
                    timing="median of `repeat` samples, cases interleaved (rotating order); forward = training "
                           "forward (grad enabled, x requires grad); forward+backward = y.backward(dy) with "
                           "gradients for x and every trainable parameter",
                    ratio_vs_peft="forward+backward time / peft's layer for the same method, same run",
                    max_rel_err="max over output and gradients of ||out-ref||/||ref||, ref = "
                                "fastpeft.reference.peft_linear in float64, same inputs and dropout seed")
    machine = machine_info(device)
    machine["load_average_before"], machine["load_average_after"] = load_before, machine.pop("load_average")
    return dict(machine=machine, versions=versions(), settings=settings, rows=rows)


def default_backends(device: torch.device) -> list[str]:
    """fastpeft backends that run natively on ``device`` (triton on CPU is the interpreter: skipped)."""
    out = []
    for name in available_backends():
        if device.type == "cpu" and name == "triton":
            continue
        try:
            resolve(name, device)
        except (RuntimeError, TypeError):  # cannot run on this device
            continue
        out.append(name)
    return out


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def _fmt_count(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e4:
        return f"{n / 1e3:.1f}K"
    return str(n)


def _fmt_opt(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _fmt_err(row) -> str:
    if row["max_rel_err"] is None:
        return "n/a"
    s = f"{row['max_rel_err']:.1e}"
    tol = row.get("tolerance")
    return s + (" FAIL" if tol is not None and row["max_rel_err"] > tol else "")


def format_table(result: dict) -> str:
    """The human-readable report: the machine, then one block per shape."""
    mach, ver, st = result["machine"], result["versions"], result["settings"]
    lines = [
        f"machine: {mach['cpu']}, {mach['cores']} cores, torch threads {mach['torch_threads']}"
        + (f"; GPU {mach['gpu']} (cc {mach['compute_capability']})" if "gpu" in mach else ""),
        "versions: " + ", ".join(f"{k} {v}" for k, v in ver.items() if v is not None),
        f"settings: device {st['device']}, dtype {st['dtype']}, M={st['tokens']} tokens, r={st['r']}, "
        f"alpha={st['alpha']:g}, dropout {st['lora_dropout']}, sparse density {st['sparse_density']}, "
        f"median of {st['repeat']} interleaved samples, backends {', '.join(st['backends']) or '-'}"
        + (", peft" if st["peft"] else ", no peft (--no-peft or not installed)"),
    ]
    loads = [mach.get(k) for k in ("load_average_before", "load_average_after")]
    if any(v is not None for v in loads):
        before, after = loads
        spare = 0.5 * (mach["cores"] or 1)  # the bench's own threads count in the load while it runs
        busy = (before or 0) > spare or (after or 0) - mach["torch_threads"] > spare
        lines.append(f"load average before/after: {' / '.join('-' if v is None else f'{v:.2f}' for v in loads)}"
                     + (" -- WARNING: other work was running on these cores; timings and ratios are unreliable, "
                        "memory and error columns are not affected" if busy else ""))
    lines += [
        "ratios: time / frozen nn.Linear (torch) of the same shape in this run; x peft: forward+backward time / "
        "peft's layer; err: max ||out-ref||/||ref|| vs float64 over output and gradients",
    ]
    header = (f"{'method':<13} {'backend':<9} {'fwd ms':>8} {'f+b ms':>8} {'x fwd':>6} {'x f+b':>6} {'x peft':>6} "
              f"{'saved MiB':>9} {'peak MiB':>9} {'err':>12} {'trainable':>9}  kind")
    shapes_seen: list = []
    for row in result["rows"]:
        key = row["shape"]["name"]
        if key not in shapes_seen:
            shapes_seen.append(key)
            s = row["shape"]
            lines += ["", f"{s['label']}: M={s['M']} K={s['K']} N={s['N']} r={s['r']}", header, "-" * len(header)]
        kinds = "+".join(k for k, v in row["trainable"].items() if v) or "-"
        lines.append(f"{METHOD_LABELS.get(row['method'], row['method']):<13} {row['backend']:<9} "
                     f"{row['fwd_ms']:>8.3f} {row['fwd_bwd_ms']:>8.3f} {row['ratio_fwd']:>6.2f} "
                     f"{row['ratio_fwd_bwd']:>6.2f} {_fmt_opt(row['ratio_vs_peft'], '6.2f'):>6} "
                     f"{row['saved_mib']:>9.3f} {row['peak_mib']:>9.3f} {_fmt_err(row):>12} "
                     f"{_fmt_count(row['trainable_total']):>9}  {kinds}")
    return "\n".join(lines)


def write_plot(result: dict, path: str, backend: Optional[str] = None) -> str:
    """PNG with four panels, per method against layer size (the shapes in order of K x N):
    forward and forward+backward time over the frozen nn.Linear (log axis, 1 = no overhead),
    saved-for-backward MiB and peak MiB of a step (log axes).  One fastpeft backend (solid lines,
    by default the last measured of reference/cpp/triton, i.e. the compiled one) and peft (dashed).
    Returns the backend plotted."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib, an optional extra: pip install 'fastpeft[plot]' "
                           "(or pip install matplotlib)") from exc
    rows = result["rows"]
    fused = [b for b in result["settings"]["backends"] if any(r["backend"] == b for r in rows)]
    backend = backend or (fused[-1] if fused else TORCH)
    shapes = sorted({r["shape"]["name"]: r["shape"] for r in rows}.values(), key=lambda s: (s["K"] * s["N"], s["K"]))
    pos = {s["name"]: i for i, s in enumerate(shapes)}  # categorical: 1B MLP and 7B attention have equal K x N
    labels = [f"{s['label'].split(' ')[0]} {s['name'].split('.')[-1]}\n{s['K']}x{s['N']}" for s in shapes]
    floor = 1e-3  # MiB: "saves nothing" (the frozen layer keeps an 8-byte dropout seed) drawn at the bottom

    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))
    axes = axes.ravel()
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    colors = {m: plt.cm.tab10(i) for i, m in enumerate(methods)}
    panels = ((axes[0], "ratio_fwd", "forward time / frozen nn.Linear (log)"),
              (axes[1], "ratio_fwd_bwd", "forward+backward time / frozen nn.Linear (log)"),
              (axes[2], "saved_mib", f"saved for backward, MiB (log; < {floor:g} drawn at {floor:g})"),
              (axes[3], "peak_mib", "peak memory of forward+backward above inputs and weights, MiB (log)"))
    for ax, metric, title in panels:
        for m in methods:
            for bk, style in ((backend, "-o"), (PEFT, "--x")):
                pts = [(pos[r["shape"]["name"]], max(r[metric], floor) if metric.endswith("_mib") else r[metric])
                       for r in rows if r["method"] == m and r["backend"] == bk]
                if pts:
                    ax.plot(*zip(*sorted(pts)), style, color=colors[m],
                            label=f"{METHOD_LABELS[m]} ({bk})" if bk == PEFT else METHOD_LABELS[m])
        ax.set_yscale("log")
        if not metric.endswith("_mib"):
            ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[2].legend(fontsize=7, loc="upper left", ncol=2)
    st, mach = result["settings"], result["machine"]
    fig.suptitle(f"fastpeft bench: backend {backend} (solid) vs peft (dashed), {st['dtype']} on {st['device']}, "
                 f"M={st['tokens']}, r={st['r']} | {mach['cpu']}, {mach['torch_threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return backend


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _csv(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``fastpeft bench`` options to ``parser``."""
    presets = "; ".join(f"{k}: {v.note}" for k, v in PRESETS.items())
    parser.add_argument("--size", "--sizes", dest="size", default="small", choices=sorted(PRESETS),
                        help=f"preset of shapes and tokens (default small). {presets}")
    parser.add_argument("--shapes", type=_csv, default=None, metavar="LIST",
                        help=f"comma-separated layer shapes instead of the preset's: {', '.join(SHAPES)}")
    parser.add_argument("--tokens", "-M", type=int, default=None, metavar="M",
                        help="rows of x (batch x sequence) instead of the preset's")
    parser.add_argument("--rank", "-r", type=int, default=16, help="LoRA rank (default 16; alpha = 2r)")
    parser.add_argument("--methods", type=_csv, default=list(METHODS), metavar="LIST",
                        help=f"comma-separated methods (default all): {', '.join(METHODS)}")
    parser.add_argument("--backends", type=_csv, default=None, metavar="LIST",
                        help="comma-separated fastpeft backends (default: every available one that runs natively "
                             "on the device; triton on CPU only runs in the interpreter and is skipped)")
    parser.add_argument("--no-peft", action="store_true", help="do not measure peft's layers")
    parser.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                        help="dtype of x and the weight (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default cuda when available)")
    parser.add_argument("--repeat", type=int, default=None, help="timed samples per case (median reported)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="warm-up calls per case before the calibration call (default 1)")
    parser.add_argument("--min-sample-ms", type=float, default=10.0,
                        help="each timed sample repeats the call until it lasts about this long (default 10)")
    parser.add_argument("--density", type=float, default=0.01, help="sparse density (default 0.01)")
    parser.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout of lora_dropout/combined")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before measuring")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data")
    parser.add_argument("--model", nargs="?", const=FULL_MODEL_SIZES, default=None, type=_csv, metavar="SIZES",
                        help="model sizes of the model-level table (a training step of whole models, every method, "
                             f"against peft and the floor): {', '.join(MODEL_SIZES)}; bare --model: "
                             f"{FULL_MODEL_SIZES}; default: the --size preset's")
    parser.add_argument("--model-only", action="store_true", help="run only the model-level table")
    parser.add_argument("--no-model", action="store_true", help="skip the model-level table")
    parser.add_argument("--model-methods", type=_csv, default=list(MODEL_METHODS), metavar="LIST",
                        help=f"methods of the model-level table (default all): {', '.join(MODEL_METHODS)}")
    parser.add_argument("--model-steps", type=int, default=5, help="timed model-level steps (default 5)")
    parser.add_argument("--model-warmup", type=int, default=2, help="model-level warm-up steps (default 2)")
    parser.add_argument("--model-batch", type=int, default=None, help="model-level batch instead of each size's")
    parser.add_argument("--model-seq", type=int, default=None, help="model-level sequence instead of each size's")
    parser.add_argument("--no-ranks", action="store_true",
                        help="model-level table without the rank of each layer's ΔW (an SVD per layer)")
    parser.add_argument("--json", metavar="FILE", default=None, help="write every row as JSON to FILE")
    parser.add_argument("--plot", metavar="FILE", default=None,
                        help="write a PNG (speed ratio and memory per method against size); needs matplotlib")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    """Run ``fastpeft bench`` with parsed ``args``; print the table; return the exit code."""
    try:
        with warnings.catch_warnings():
            # peft's SHiRA builds a torch.sparse tensor every call and torch warns each time
            warnings.filterwarnings("ignore", message="Sparse invariant checks")
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            return _run(args)
    except (ValueError, RuntimeError, TypeError) as exc:
        print(f"fastpeft bench: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    preset = PRESETS[args.size]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    shapes = args.shapes or list(preset.shapes)
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        raise ValueError(f"unknown shape(s) {', '.join(bad)}; choose from {', '.join(SHAPES)}")
    if args.plot:  # fail before measuring, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("--plot needs matplotlib, an optional extra: pip install 'fastpeft[plot]'") from exc
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available to torch on this machine")
    dtype = _DTYPES[args.dtype] if args.dtype else None
    if args.backends is not None:
        for name in args.backends:
            reason = unavailable_reason(name)
            if reason is not None:
                raise RuntimeError(f"backend {name!r} is not available: {reason}")
    tokens = args.tokens if args.tokens is not None else preset.tokens
    repeat = args.repeat if args.repeat is not None else preset.repeat
    if tokens < 1 or repeat < 1 or args.rank < 1 or args.warmup < 0:
        raise ValueError("--tokens, --repeat and --rank must be positive and --warmup not negative")
    model_sizes = [] if args.no_model else (args.model if args.model is not None else list(preset.models))
    if args.model is None and not args.model_only:  # the preset's table: skipped, not refused, without its packages
        skipped = [why for why in (missing_requirement(SIZES_OF_MODELS[k]) for k in model_sizes) if why]
        if skipped:
            print(f"fastpeft bench: no model-level table ({skipped[0]})", file=sys.stderr)
            model_sizes = []
    if args.model_only and not model_sizes:
        raise ValueError("--model-only with --no-model (or an empty --model list) leaves nothing to run")
    bad = [m for m in model_sizes if m not in MODEL_SIZES]
    if bad:
        raise ValueError(f"unknown model size(s) {', '.join(bad)} in --model; choose from {', '.join(MODEL_SIZES)}")
    bad = [m for m in args.model_methods if m not in MODEL_METHODS]
    if bad:
        raise ValueError(f"unknown model method(s) {', '.join(bad)} in --model-methods; choose from "
                         f"{', '.join(MODEL_METHODS)}")
    overrides = (args.model_batch, args.model_seq)
    if args.model_steps < 1 or args.model_warmup < 0 or any(v is not None and v < 1 for v in overrides):
        raise ValueError("--model-steps, --model-batch and --model-seq must be positive and --model-warmup not "
                         "negative")
    if not 0.0 < args.density <= 1.0:
        raise ValueError(f"--density must be in (0, 1], got {args.density}")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")

    result: dict = {}
    status = 0
    if not args.model_only:
        result = run_bench(shapes=shapes, tokens=tokens, r=args.rank, methods=args.methods, backends=args.backends,
                           use_peft=not args.no_peft, dtype=dtype, device=device, repeat=repeat,
                           warmup=args.warmup, min_sample_ms=args.min_sample_ms, density=args.density,
                           dropout=args.dropout, seed=args.seed, progress=not args.no_progress)
        print(format_table(result))
        failed = [r for r in result["rows"] if r.get("tolerance") is not None and r["max_rel_err"] is not None
                  and not r["max_rel_err"] <= r["tolerance"]]
        if failed:
            print(f"\n{len(failed)} case(s) exceed the error tolerance (marked FAIL)", file=sys.stderr)
            status = 1
        if result["settings"]["peft"] and device.type == "cpu" and importlib.util.find_spec("transformers"):
            # GPT-2 Conv1D and embedding LoRA against peft's layers (CPU kernels; no bf16 twin on a GPU yet)
            result["other_layers"] = run_layer_rows("tiny" if args.size == "tiny" else "default", r=args.rank,
                                                    seed=args.seed)
            print()
            print(format_layer_rows(result["other_layers"]))
    else:
        result = dict(machine=machine_info(device), versions=versions(), settings={}, rows=[])
    if model_sizes:
        model_backend = args.backends[-1] if args.backends else None  # the last (compiled) one, as the plot
        model = run_model_bench(sizes=model_sizes, methods=args.model_methods, backend=model_backend, device=device,
                                dtype=dtype, steps=args.model_steps, warmup=args.model_warmup, seed=args.seed,
                                ranks=not args.no_ranks, batch=args.model_batch, seq=args.model_seq,
                                progress=not args.no_progress)
        result["model"] = model
        print()
        print(format_model_table(model))
        if not model["ok"]:
            print("\nmodel-level: a loss at step 0 differs from peft's beyond the tolerance (marked FAIL)",
                  file=sys.stderr)
            status = 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"\nwrote {args.json}")
    if args.plot:
        _plots(result, args.plot)
    return status


def _plots(result: dict, path: str) -> None:
    """The layer plot at ``path`` and the model-level plot beside it (at ``path`` with --model-only)."""
    model_path = path
    if result.get("rows"):
        backend = write_plot(result, path)
        print(f"wrote {path} (backend {backend} vs peft: time ratios and memory per method against layer size)")
        stem, dot, ext = path.rpartition(".")
        model_path = f"{stem}-model.{ext}" if dot else f"{path}-model"
    if result.get("model", {}).get("rows"):
        write_model_plot(result["model"], model_path)
        print(f"wrote {model_path} (model-level: speed-up and peak memory saved against peft per method and size)")
