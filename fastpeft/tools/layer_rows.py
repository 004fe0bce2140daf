"""Bench rows for the layers outside the linear shape table, each against peft's layer.

- GPT-2 ``Conv1D`` (transformers; W stored [K, N], y = x W + b): fastpeft's LoRA layer on the
  transposed view of the user's weight (no copy), with and without ``lora_bias``, against peft's
  ``lora.Linear`` with ``fan_in_fan_out=True``; plus fastpeft on a contiguous ``nn.Linear`` of the
  same shape (what the transposed layout costs).
- LoRA on ``nn.Embedding``:  y = E[ids] + s·A[:, ids]ᵀ Bᵀ  (fastpeft.LoRAEmbedding, fused gather +
  rank-r product) against peft's ``lora.Embedding``.

Every layer of a row holds the same frozen tensors and adapter values (the adapters away from
their zero init, as after training).  Each round times one forward (no grad) and one
forward+backward (adapters and, for Conv1D, x need grad) of every layer, interleaved; the table
reports medians, the ratio to peft's layer, and each layer's worst relative error against a
float64 computation (output and every gradient).  ``fastpeft bench`` prints it after the layer
table; ``run_layer_rows`` returns the rows (dicts) for its JSON.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn as nn

from fastpeft.tools.equivalence import rel_err

__all__ = ["LAYER_ROW_SIZES", "run_layer_rows", "format_layer_rows"]

# preset -> (Conv1D K, N, tokens), (embedding V, N, ids)
LAYER_ROW_SIZES = {"tiny": ((64, 96, 32), (500, 64, 64)),
                   "default": ((768, 3072, 512), (32000, 2048, 2048))}


def _time(layers: dict, make_input, grad_y, rounds: int) -> dict:
    """{name: (fwd ms, fwd+bwd ms)}: medians over ``rounds`` interleaved rounds (one warm-up round)."""
    def fwd_bwd(layer, params):
        for p in params:
            p.grad = None
        layer(make_input(True)).backward(grad_y)

    def one_round():
        out = []
        for layer, params in layers.values():
            t0 = time.perf_counter()
            with torch.no_grad():
                layer(make_input(False))
            t1 = time.perf_counter()
            fwd_bwd(layer, params)
            out.append((t1 - t0, time.perf_counter() - t1))
        return out

    one_round()
    samples = [one_round() for _ in range(rounds)]
    return {name: tuple(statistics.median(s[i][j] for s in samples) * 1e3 for j in range(2))
            for i, name in enumerate(layers)}


def _errors(layers: dict, make_input, grad_y, reference) -> dict:
    """{name: worst rel_err of the output and the gradients} against ``reference`` (float64)."""
    y64, g64 = reference()
    errors = {}
    for name, (layer, params) in layers.items():
        for p in params:
            p.grad = None
        x = make_input(True)
        y = layer(x)
        y.backward(grad_y)
        grads = [x.grad] if x.is_floating_point() else []
        errors[name] = max([rel_err(y, y64)] + [rel_err(g, r) for g, r in zip(grads + [p.grad for p in params], g64)])
    return errors


def _rows(kind: str, shape: str, timed: dict, errors: dict, twin: str, ours: list) -> list:
    rows = []
    for name, (fwd, fwd_bwd) in timed.items():
        vs = timed[twin]
        rows.append({"layer": kind, "shape": shape, "impl": name, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd,
                     "ratio_vs_peft": fwd_bwd / vs[1] if name in ours else None, "max_rel_err": errors[name]})
    return rows


def conv1d_rows(k: int, n: int, tokens: int, r: int, rounds: int, seed: int = 0) -> list:
    import peft
    from transformers.pytorch_utils import Conv1D

    from fastpeft.nn.modules import LoRALinear

    gen = torch.Generator().manual_seed(seed)
    conv = Conv1D(n, k)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(k, n, generator=gen) / k ** 0.5)
        conv.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    conv.requires_grad_(False)
    lin = nn.Linear(k, n).requires_grad_(False)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = copy.deepcopy(conv)

        def forward(self, x):
            return self.c(x)

    a = torch.randn(r, k, generator=gen) / k ** 0.5
    b = torch.randn(n, r, generator=gen) * 0.02
    beta = torch.randn(n, generator=gen) * 0.1
    layers, s = {}, 2.0
    for with_bias in (False, True):
        tag = " + lora_bias" if with_bias else ""
        ours = LoRALinear.from_linear(copy.deepcopy(conv), r=r, alpha=s * r, lora_bias=with_bias)
        config = peft.LoraConfig(r=r, lora_alpha=s * r, target_modules=["c"], fan_in_fan_out=True,
                                 lora_bias=with_bias)
        theirs = peft.get_peft_model(One(), config).base_model.model.c
        peft_a, peft_b = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
        with torch.no_grad():
            for dst in (ours.lora_A, peft_a):
                dst.copy_(a)
            for dst in (ours.lora_B, peft_b):
                dst.copy_(b)
            if with_bias:
                ours.lora_bias.copy_(beta)
                theirs.lora_B["default"].bias.copy_(beta)
        extra = [ours.lora_bias] if with_bias else []
        layers[f"fastpeft Conv1D{tag}"] = (ours, [ours.lora_A, ours.lora_B] + extra)
        peft_extra = [theirs.lora_B["default"].bias] if with_bias else []
        layers[f"peft Conv1D{tag}"] = (theirs, [peft_a, peft_b] + peft_extra)
    plain = LoRALinear.from_linear(lin, r=r, alpha=s * r)
    with torch.no_grad():
        plain.lora_A.copy_(a)
        plain.lora_B.copy_(b)
    layers["fastpeft nn.Linear"] = (plain, [plain.lora_A, plain.lora_B])
    x = torch.randn(tokens, k, generator=gen)
    grad_y = torch.randn(tokens, n, generator=gen)

    def make_input(grad):
        return x.clone().requires_grad_(grad)

    timed = _time(layers, make_input, grad_y, rounds)
    errors = {}
    for with_bias in (False, True):
        def reference(with_bias=with_bias):
            x64 = x.double().requires_grad_()
            a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
            beta64 = beta.double().requires_grad_()
            y = x64 @ conv.weight.double() + conv.bias.double() + s * (x64 @ a64.t()) @ b64.t()
            leaves = [x64, a64, b64] + ([beta64] if with_bias else [])
            if with_bias:
                y = y + s * beta64
            return y, torch.autograd.grad(y, leaves, grad_y.double())
        tag = " + lora_bias" if with_bias else ""
        names = [f"fastpeft Conv1D{tag}", f"peft Conv1D{tag}"] + ([] if with_bias else ["fastpeft nn.Linear"])
        errors.update(_errors({nm: layers[nm] for nm in names}, make_input, grad_y, reference))
    shape = f"K={k} N={n} M={tokens} r={r}"
    return (_rows("GPT-2 Conv1D", shape, {nm: timed[nm] for nm in list(timed)[:2] + ["fastpeft nn.Linear"]},
                  errors, "peft Conv1D", ["fastpeft Conv1D", "fastpeft nn.Linear"])
            + _rows("GPT-2 Conv1D + lora_bias", shape, {nm: timed[nm] for nm in list(timed)[2:4]}, errors,
                    "peft Conv1D + lora_bias", ["fastpeft Conv1D + lora_bias"]))


def embedding_rows(vocab: int, dim: int, tokens: int, r: int, rounds: int, seed: int = 0) -> list:
    import peft

    from fastpeft.nn.embedding import LoRAEmbedding

    gen = torch.Generator().manual_seed(seed)
    base = nn.Embedding(vocab, dim)
    with torch.no_grad():
        base.weight.copy_(torch.randn(vocab, dim, generator=gen))
    base.requires_grad_(False)
    theirs = peft.get_peft_model(nn.ModuleDict({"emb": base}), peft.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["emb"])).base_model.model["emb"]
    a, b = theirs.lora_embedding_A["default"], theirs.lora_embedding_B["default"]
    with torch.no_grad():
        a.copy_(torch.randn(a.shape, generator=gen) * 0.1)
    ours = LoRAEmbedding(base.weight)
    ours.assign(ours.adopt(nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone()), alpha=2 * r))
    layers = {"fastpeft": (ours, [ours.lora_A, ours.lora_B]), "peft": (theirs, [a, b])}
    ids = torch.randint(0, vocab, (tokens,), generator=gen)
    grad_y = torch.randn(tokens, dim, generator=gen)

    def reference():
        a64, b64 = ours.lora_A.detach().double().requires_grad_(), ours.lora_B.detach().double().requires_grad_()
        y = base.weight[ids].double() + ours.lora_scale * a64[:, ids].t() @ b64.t()
        return y, torch.autograd.grad(y, [a64, b64], grad_y.double())

    timed = _time(layers, lambda grad: ids, grad_y, rounds)
    errors = _errors(layers, lambda grad: ids, grad_y, reference)
    return _rows("Embedding", f"{vocab}x{dim}, {tokens} ids, r={r}", timed, errors, "peft", ["fastpeft"])


def run_layer_rows(preset: str = "default", r: int = 16, rounds: int = 11, seed: int = 0) -> list:
    """The Conv1D and embedding rows at the sizes of ``preset`` (``LAYER_ROW_SIZES``); needs peft and
    transformers."""
    (k, n, m), (vocab, dim, ids) = LAYER_ROW_SIZES[preset]
    return conv1d_rows(k, n, m, r, rounds, seed) + embedding_rows(vocab, dim, ids, r, rounds, seed)


def format_layer_rows(rows: list) -> str:
    lines = ["Other layers: LoRA fwd / fwd+bwd against peft's layer (medians of interleaved rounds; "
             "x peft: fwd+bwd time / peft's; err: worst rel err vs float64 over output and gradients)"]
    header = f"{'layer':<26} {'impl':<28} {'fwd ms':>8} {'f+b ms':>8} {'x peft':>7} {'err':>9}"
    shape = None
    for row in rows:
        if (row["layer"], row["shape"]) != shape:
            shape = (row["layer"], row["shape"])
            lines += ["", f"{row['layer']}: {row['shape']}", header, "-" * len(header)]
        ratio = "-" if row["ratio_vs_peft"] is None else f"{row['ratio_vs_peft']:.2f}"
        lines.append(f"{row['layer']:<26} {row['impl']:<28} {row['fwd_ms']:>8.3f} {row['fwd_bwd_ms']:>8.3f} "
                     f"{ratio:>7} {row['max_rel_err']:>9.1e}")
    return "\n".join(lines)
