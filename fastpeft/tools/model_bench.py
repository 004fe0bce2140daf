"""Model-level bench: a training step of whole models, every method, against peft and the floor.

For each model size (``fastpeft.tools.model_zoo.SIZES``: Llama-architecture decoders with random
weights, and the real MiniLM) and each method (``model_zoo.METHODS``) the bench builds the
fastpeft model and peft's twin with the same adapter values, plus one *floor* per size, and times

    step = zero_grad; loss = model(batch); loss.backward(); AdamW.step()

for all of them interleaved (rotating order each round), ``warmup`` steps first, then the
median of ``steps`` timed steps.  The floor is the same frozen model with nothing trainable:
its step is the forward on the input embeddings, which require grad, and the backward to them
(every layer's input gradient, no weight gradient, no optimizer).  A method needs no input
gradient where nothing before a layer trains (LoRA's first-layer q/k/v/gate/up on frozen
embeddings), so with few layers its step can come in under the floor.  Columns per row:

- step ms, tokens/s (real tokens of the batch per second), x floor and x peft: the median over
  rounds of (step / the floor's step) and (fastpeft's step / its twin's step) in the same round
  (< 1 is faster; fastpeft and its twin run back to back in every round);
- peak MiB: the peak memory growth of one more step (forward, backward and optimizer step,
  gradients set to None before it; ``fastpeft.profile_memory``), saved MiB: what autograd keeps
  for backward; mem saved: 1 - fastpeft's peak / the twin's;
- trainable / changed / rank: ``fastpeft.count_parameters`` of the fastpeft model after the
  timed steps (changed: entries of the pre-trained model that differ; rank: the largest rank
  of a layer's ΔW);
- loss diff: |loss - twin's loss| / |twin's loss| at step 0, both models in eval mode (p = 0),
  before any step.  Above the tolerance (fp32 1e-5, half precision 1e-2) it is marked FAIL.

``fastpeft bench`` calls ``run_model_bench``, prints ``format_model_table`` and draws
``write_model_plot``.
"""
from __future__ import annotations

import gc
import statistics
import sys
import time
import warnings
from dataclasses import replace
from typing import Optional

import torch
from torch import nn

from fastpeft.core.backends import resolve
from fastpeft.nn.accounting import count_parameters
from fastpeft.tools.machine import load_average
from fastpeft.tools.model_zoo import (
    METHOD_LABELS,
    METHODS,
    SIZES,
    Runner,
    build_base,
    build_floor,
    build_pair,
    missing_requirement,
)
from fastpeft.tools.profiling import profile_memory

__all__ = ["MODEL_METHODS", "MODEL_SIZES", "run_model_bench", "format_model_table", "write_model_plot"]

MODEL_METHODS = METHODS
MODEL_SIZES = tuple(SIZES)
FLOOR = "floor"


class _Trainer(nn.Module):
    """A runner and its AdamW optimizer (none for the floor); ``step()`` is one training step."""

    def __init__(self, method: str, impl: str, runner: Runner, lr: float):
        super().__init__()
        self.method, self.impl, self.runner = method, impl, runner
        params = [p for p in runner.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=lr) if params else None
        self.times: list = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)

    def step(self) -> float:
        loss = self.runner()
        loss.backward()
        if self.opt is not None:
            self.opt.step()
        return loss.detach()


def _tolerance(dtype) -> float:
    return 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5


def _eval_loss(runner: Runner) -> float:
    was = runner.training
    runner.eval()
    try:
        with torch.no_grad():
            return float(runner())
    finally:
        runner.train(was)


def _params(model: nn.Module, ranks: bool) -> dict:
    report = count_parameters(model, ranks=ranks)
    known = [r for r in report.ranks.values() if r is not None]
    return dict(by_category={k: dict(v) for k, v in report.items()},
                trainable=sum(v["trainable"] for v in report.values()),
                changed=sum(v["changed"] for v in report.values()),
                rank=max(known) if known else None, ranked_layers=len(report.ranks))


def _paired_ratio(row: dict, other: dict) -> float:
    """Median over rounds of (row's step / other's step in the same round): load that drifts between
    rounds cancels (a pair of fastpeft and its twin runs back to back in every round)."""
    return statistics.median(a / b for a, b in zip(row["step_ms_samples"], other["step_ms_samples"]))


def _bench_size(size, methods, backend, dtype, device, steps, warmup, lr, seed, ranks, log) -> list[dict]:
    base = build_base(size, dtype=dtype, device=device, seed=seed)
    trainers = [_Trainer(FLOOR, FLOOR, build_floor(base), lr)]
    checks, missing = {}, {}
    for method in methods:
        ours, twin, impl = build_pair(method, base, backend=backend, seed=seed)
        trainers.append(_Trainer(method, "fastpeft", ours, lr))
        if twin is None:
            missing[method] = impl
            continue
        checks[method] = (_eval_loss(ours), _eval_loss(twin))
        trainers.append(_Trainer(method, impl, twin, lr))
        log(f"{size.key}: built {method} (+{impl})")
    for t in trainers:
        t.runner.train()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    losses = {id(t): [] for t in trainers}
    for i in range(warmup + steps):
        shift = i % len(trainers)
        for t in trainers[shift:] + trainers[:shift]:
            t.zero_grad()
            sync()
            start = time.perf_counter()
            loss = t.step()
            sync()
            if i >= warmup:
                t.times.append(time.perf_counter() - start)
            losses[id(t)].append(float(loss))
        log(f"{size.key}: step {i + 1}/{warmup + steps} ({'warm-up' if i < warmup else 'timed'})")

    rows = []
    for t in trainers:
        t.zero_grad()
        mem = profile_memory(t.step, backward=False)
        t.zero_grad()
        fastpeft_row = t.impl == "fastpeft"
        row = dict(size=size.key, model=size.label, method=t.method, impl=t.impl, tokens=base.tokens,
                   step_ms=1e3 * statistics.median(t.times), step_ms_samples=[1e3 * s for s in t.times],
                   peak_mib=mem["peak_bytes"] / 2**20, saved_mib=mem["saved_bytes"] / 2**20,
                   trainable=sum(p.numel() for p in t.runner.parameters() if p.requires_grad),
                   params=_params(t.runner.model, ranks) if fastpeft_row else None,
                   losses=losses[id(t)], loss0=None, loss0_rel_diff=None, twin=None)
        if fastpeft_row:
            row["twin"] = None if t.method in missing else next(
                u.impl for u in trainers if u.method == t.method and u is not t)
            row["no_twin"] = missing.get(t.method)
        if t.method in checks:
            ours_loss, twin_loss = checks[t.method]
            row["loss0"] = ours_loss if fastpeft_row else twin_loss
            if fastpeft_row:
                row["loss0_rel_diff"] = abs(ours_loss - twin_loss) / max(abs(twin_loss), 1e-30)
        rows.append(row)
        log(f"{size.key}: memory {t.method}/{t.impl}")
    floor = rows[0]
    for row in rows:
        row["tokens_per_s"] = row["tokens"] / (row["step_ms"] / 1e3)
        row["ratio_vs_floor"] = _paired_ratio(row, floor)
        twin = next((r for r in rows if r["method"] == row["method"] and r["impl"] == row.get("twin")), None)
        row["ratio_vs_peft"] = _paired_ratio(row, twin) if twin is not None else None
        row["mem_saved_vs_peft"] = (1.0 - row["peak_mib"] / twin["peak_mib"]
                                    if twin is not None and twin["peak_mib"] > 0 else None)
    del trainers, base
    gc.collect()
    return rows


def run_model_bench(*, sizes=("small",), methods=MODEL_METHODS, backend: Optional[str] = None, device=None,
                    dtype: Optional[torch.dtype] = None, steps: int = 3, warmup: int = 2, lr: float = 1e-4,
                    seed: int = 0, ranks: bool = True, batch: Optional[int] = None, seq: Optional[int] = None,
                    progress: bool = True) -> dict:
    """Time a training step of every method on every size (see the module docstring).

    batch, seq: instead of each size's batch and sequence length.  ranks: also the rank of each
    layer's ΔW (count_parameters' SVDs).

    Returns ``{"settings", "rows", "ok"}``: one row per (size, method, impl) with impl "floor",
    "fastpeft", "peft" or "torch" (BitFit's plain-PyTorch twin); ``ok`` is False when a loss at
    step 0 differs from the twin's by more than the tolerance.
    """
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise ValueError(f"unknown model size(s) {', '.join(unknown)}; choose from {', '.join(SIZES)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown model method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    if min(steps, warmup + 1) < 1:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    missing = [why for why in (missing_requirement(SIZES[k]) for k in sizes) if why]
    if missing:
        raise RuntimeError(missing[0])
    for name, v in (("batch", batch), ("seq", seq)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int or None, got {v!r}")
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    used_backend = backend or resolve(None, device, dtype).name
    load_before = load_average()
    t0 = time.perf_counter()

    def log(msg):
        if progress:
            sys.stderr.write(f"[model {time.perf_counter() - t0:6.1f}s] {msg}\n")
            sys.stderr.flush()

    rows = []
    with warnings.catch_warnings():
        # transformers deprecates the past_key_values keyword that prefix tuning (peft's and ours) passes
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Sparse invariant checks")  # peft's SHiRA, every call
        for key in sizes:
            size = replace(SIZES[key], batch=batch or SIZES[key].batch, seq=seq or SIZES[key].seq)
            rows += _bench_size(size, list(methods), backend, dtype, device, steps, warmup, lr, seed, ranks, log)
    tol = _tolerance(dtype)
    ok = all(r["loss0_rel_diff"] is None or r["loss0_rel_diff"] <= tol for r in rows)
    from fastpeft.tools import model_zoo as zoo

    settings = dict(sizes=list(sizes), methods=list(methods), steps=steps, warmup=warmup, optimizer=f"AdamW lr={lr}",
                    device=str(device), dtype=str(dtype).replace("torch.", ""), backend=used_backend,
                    loss_tolerance=tol, load_average=[load_before, load_average()], seed=seed,
                    lora=dict(r=zoo.R, alpha=zoo.ALPHA, dropout_of_lora_dropout_and_qlora=zoo.DROPOUT),
                    sparse_density=zoo.DENSITY, adapter_bottleneck=zoo.BOTTLENECK, virtual_tokens=zoo.VIRTUAL,
                    floor="the same frozen model, nothing trainable: forward on the input embeddings (which require "
                          "grad) and backward to them; no optimizer",
                    step="zero_grad, forward, loss.backward(), AdamW step; median of the timed steps, all models of a "
                         "size interleaved in rotating order",
                    ratios="median over rounds of the ratio of two models' steps in the same round",
                    peak_mib="peak memory growth of one more step (gradients set to None before it)",
                    loss0_rel_diff="|loss - twin's| / |twin's| at step 0, eval mode (p = 0), same adapter values")
    return dict(settings=settings, rows=rows, ok=ok)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _count(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e4 else str(n)


def format_model_table(result: dict) -> str:
    """The model-level rows as one table per size."""
    st = result["settings"]
    lines = [f"Model-level training step ({st['step']}); {st['dtype']} on {st['device']}, backend {st['backend']}, "
             f"{st['optimizer']}, median of {st['steps']} steps after {st['warmup']} warm-up.",
             f"floor: {st['floor']}. x floor / x peft: medians of per-round step time ratios (< 1: faster); "
             f"mem saved: 1 - peak / twin's peak; loss diff: step 0, p = 0, tolerance {st['loss_tolerance']:g} "
             "(relative)."]
    loads = st.get("load_average") or []
    if any(v is not None for v in loads):
        lines.append("load average before/after: " + " / ".join(_fmt(v, ".2f") for v in loads))
    header = (f"{'method':<10} {'impl':<9} {'step ms':>9} {'tok/s':>8} {'x floor':>7} {'x peft':>7} {'peak MiB':>9} "
              f"{'mem saved':>9} {'trainable':>9} {'changed':>8} {'rank':>5} {'loss diff':>10}")
    seen = []
    for r in result["rows"]:
        if r["size"] not in seen:
            seen.append(r["size"])
            lines += ["", f"{r['model']}", header, "-" * len(header)]
        diff = _fmt(r["loss0_rel_diff"], ".1e")
        if r["loss0_rel_diff"] is not None and not r["loss0_rel_diff"] <= st["loss_tolerance"]:
            diff += " FAIL"
        elif r["impl"] == "fastpeft" and r.get("no_twin"):
            diff = "no twin"
        p = r["params"] or {}
        saved = _fmt(None if r["mem_saved_vs_peft"] is None else 100 * r["mem_saved_vs_peft"], ".0f")
        lines.append(f"{METHOD_LABELS.get(r['method'], r['method']):<10} {r['impl']:<9} {r['step_ms']:>9.1f} "
                     f"{r['tokens_per_s']:>8.0f} {r['ratio_vs_floor']:>7.3f} {_fmt(r['ratio_vs_peft'], '.3f'):>7} "
                     f"{r['peak_mib']:>9.1f} {saved + ('%' if saved != '-' else ''):>9} {_count(r['trainable']):>9} "
                     f"{_count(p.get('changed')):>8} {_fmt(p.get('rank'), 'd'):>5} {diff:>10}")
    missing = sorted({f"{r['method']}: {r['no_twin']}" for r in result["rows"] if r.get("no_twin")})
    if missing:
        lines += ["", "no twin: " + "; ".join(missing)]
    return "\n".join(lines)


def write_model_plot(result: dict, path: str) -> None:
    """PNG, two panels: speed-up against peft (twin's step / fastpeft's step) and memory saved
    against peft (1 - peak / twin's peak), one bar per model size for every method with a twin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["impl"] == "fastpeft" and r["ratio_vs_peft"] is not None]
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    width = 0.8 / max(1, len(sizes))
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, key, title in ((axes[0], "speedup", "speed-up vs peft (peft step / fastpeft step)"),
                           (axes[1], "mem", "peak memory saved vs peft (1 - fastpeft / peft)")):
        for j, size in enumerate(sizes):
            vals = []
            for m in methods:
                r = next((r for r in rows if r["size"] == size and r["method"] == m), None)
                v = None if r is None else (1.0 / r["ratio_vs_peft"] if key == "speedup" else r["mem_saved_vs_peft"])
                vals.append(float("nan") if v is None else v)
            ax.bar([i + (j - (len(sizes) - 1) / 2) * width for i in range(len(methods))], vals, width,
                   label=f"{size}")
        ax.axhline(1.0 if key == "speedup" else 0.0, color="gray", lw=0.8)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([METHOD_LABELS[m] for m in methods], fontsize=8, rotation=20)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(title="model size", fontsize=7)
    st = result["settings"]
    fig.suptitle(f"fastpeft model-level training step vs peft: {st['dtype']} on {st['device']}, backend "
                 f"{st['backend']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
