"""LoRA on an embedding table: fastpeft.LoRAEmbedding against peft's lora.Embedding layer, fwd+bwd.

    python bench/embedding_lora.py [--vocab 32000] [--dim 2048] [--tokens 2048] [--r 16] [--rounds 15] [--threads T]

Both layers hold the same table and factors (lora_A with nonzero values, as after training); each
round times one fwd (no grad) and one fwd+bwd of each, interleaved, and the table reports medians and
their ratio (peft / fastpeft), with the error of both against float64.  ``bench_row`` is the function
a bench table calls (one dict per row).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn


def _layers(V, N, r, dtype, seed=0):
    import peft

    from fastpeft.nn.embedding import LoRAEmbedding

    gen = torch.Generator().manual_seed(seed)
    base = nn.Embedding(V, N, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(V, N, generator=gen))
    wrapped = peft.get_peft_model(nn.ModuleDict({"emb": base}), peft.LoraConfig(r=r, lora_alpha=2 * r,
                                                                                  target_modules=["emb"]))
    theirs = wrapped.base_model.model["emb"]
    A, B = theirs.lora_embedding_A["default"], theirs.lora_embedding_B["default"]
    with torch.no_grad():
        A.copy_(torch.randn(A.shape, generator=gen) * 0.1)
    ours = LoRAEmbedding(base.weight, backend="cpp")
    ours.assign(ours.adopt(nn.Parameter(A.detach().clone()), nn.Parameter(B.detach().clone()), alpha=2 * r))
    return ours, theirs


def _median_ms(fn, rounds):
    return [statistics.median(t) * 1e3 for t in zip(*(fn() for _ in range(rounds)))]


def bench_row(vocab: int = 32000, dim: int = 2048, tokens: int = 2048, r: int = 16, dtype=torch.float32,
              rounds: int = 15, seed: int = 0) -> dict:
    """One row: fwd and fwd+bwd medians (ms) of fastpeft's and peft's layer, their ratios, and each
    one's relative error against float64 (output and both factor gradients, the worst)."""
    from fastpeft.tools.equivalence import rel_err

    ours, theirs = _layers(vocab, dim, r, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (tokens,), generator=gen)
    gy = torch.randn(tokens, dim, generator=gen).to(dtype)
    layers = {"fastpeft": (ours, [ours.lora_A, ours.lora_B]),
              "peft": (theirs, [theirs.lora_embedding_A["default"], theirs.lora_embedding_B["default"]])}

    def fwd_bwd(layer, params):
        for p in params:
            p.grad = None
        layer(ids).backward(gy)

    def one_round():
        times = []
        for layer, params in layers.values():  # interleaved: fastpeft, peft, fastpeft, peft ...
            t0 = time.perf_counter()
            with torch.no_grad():
                layer(ids)
            t1 = time.perf_counter()
            fwd_bwd(layer, params)
            times += [t1 - t0, time.perf_counter() - t1]
        return times

    one_round()  # warm-up (the C++ extension is loaded, caches filled)
    f_ours, fb_ours, f_peft, fb_peft = _median_ms(one_round, rounds)
    # errors against float64, on the same ids
    E64, A64, B64 = (t.detach().double() for t in (ours.weight, ours.lora_A, ours.lora_B))
    A64.requires_grad_(True), B64.requires_grad_(True)
    y64 = E64[ids] + ours.lora_scale * A64[:, ids].t() @ B64.t()
    y64.backward(gy.double())
    errors = {}
    for name, (layer, params) in layers.items():
        fwd_bwd(layer, params)
        y = layer(ids)
        errors[name] = max(rel_err(y, y64), rel_err(params[0].grad, A64.grad), rel_err(params[1].grad, B64.grad))
    return {"layer": f"Embedding {vocab}x{dim}", "tokens": tokens, "r": r, "dtype": str(dtype).replace("torch.", ""),
            "fastpeft_fwd_ms": f_ours, "peft_fwd_ms": f_peft, "fwd_speedup": f_peft / f_ours,
            "fastpeft_fwd_bwd_ms": fb_ours, "peft_fwd_bwd_ms": fb_peft, "fwd_bwd_speedup": fb_peft / fb_ours,
            "fastpeft_err": errors["fastpeft"], "peft_err": errors["peft"], "threads": torch.get_num_threads()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    row = bench_row(args.vocab, args.dim, args.tokens, args.r, getattr(torch, args.dtype), args.rounds)
    print(f"{row['layer']}, {row['tokens']} ids, r={row['r']}, {row['dtype']}, {row['threads']} threads "
          f"(medians of {args.rounds} interleaved rounds)")
    print(f"{'':10}{'fwd ms':>10}{'fwd+bwd ms':>12}{'max rel err':>13}")
    for who in ("fastpeft", "peft"):
        print(f"{who:10}{row[who + '_fwd_ms']:>10.2f}{row[who + '_fwd_bwd_ms']:>12.2f}{row[who + '_err']:>13.2e}")
    print(f"{'speedup':10}{row['fwd_speedup']:>9.2f}x{row['fwd_bwd_speedup']:>11.2f}x")


if __name__ == "__main__":
    main()
