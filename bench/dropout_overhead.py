"""What LoRA dropout costs on the cpp backend: one layer's fwd+bwd at p = 0 and p = 0.1, interleaved.

    python bench/dropout_overhead.py [--shape 512x1024x1024] [--ranks 8,16,64] [--rounds 25]

The mask is regenerated from (seed, offset) in the forward's x·Aᵀ and the backward's dA loop
(csrc/dropout_mask.h), so p > 0 should cost only that hash: drop/p0 near 1.  Columns: medians of
interleaved rounds of the frozen F.linear (base), LoRA at p = 0 and at p = 0.1, and their ratios.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastpeft


def row(m: int, k: int, n: int, r: int, rounds: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).requires_grad_()
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    a = (torch.randn(r, k, generator=gen) / k ** 0.5).requires_grad_()
    b = (torch.randn(n, r, generator=gen) / r ** 0.5).requires_grad_()
    g = torch.randn(m, n, generator=gen)

    def lora(p):
        fastpeft.peft_linear(x, w, lora_A=a, lora_B=b, lora_scale=2.0, lora_dropout=p, backend="cpp").backward(g)

    cases = {"base": lambda: torch.nn.functional.linear(x, w).backward(g), "p0": lambda: lora(0.0),
             "p0.1": lambda: lora(0.1)}
    for f in cases.values():
        f()
    times: dict = {name: [] for name in cases}
    for _ in range(rounds):
        for name, f in cases.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="512x1024x1024", help="MxKxN")
    ap.add_argument("--ranks", default="8,16,64")
    ap.add_argument("--rounds", type=int, default=25)
    args = ap.parse_args(argv)
    m, k, n = (int(v) for v in args.shape.split("x"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, M={m} K={k} N={n}, "
          f"medians of {args.rounds} interleaved rounds")
    print(f"{'r':>4} {'base ms':>9} {'p0 ms':>9} {'p0.1 ms':>9} {'p0/base':>8} {'drop/base':>9} {'drop/p0':>8}")
    for r in (int(v) for v in args.ranks.split(",")):
        t = row(m, k, n, r, args.rounds)
        print(f"{r:>4} {t['base']:>9.2f} {t['p0']:>9.2f} {t['p0.1']:>9.2f} {t['p0'] / t['base']:>8.3f} "
              f"{t['p0.1'] / t['base']:>9.3f} {t['p0.1'] / t['p0']:>8.3f}")


if __name__ == "__main__":
    main()
