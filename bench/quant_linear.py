"""CPU speed of the quantized-weight products (fastpeft.quant, csrc/quant.cpp) against a dense fp32
weight and against bitsandbytes' dequantize-then-matmul.

    python bench/quant_linear.py                 # 512x2048x2048 and 1024x4096x4096 (M x K x N), a few minutes
    python bench/quant_linear.py --quick         # 64x512x512 and 256x1024x1024
    python bench/quant_linear.py --rounds 9 --threads 2 --shapes 512x2048x2048

fp32, 2 threads by default.  Per shape and pass (forward y = x W^T, grad-input dX = dY W) the
variants are timed round-robin in one loop (one warm-up round first):

    dense     torch.mm with the dense fp32 weight (at::addmm / MKL)
    nf4, int8 fastpeft.quant.quant_linear / quant_linear_grad_input (C++ panel GEMMs)
    bnb nf4   bitsandbytes.functional.dequantize_4bit + torch.mm (what peft + bnb run on CPU)

A ratio is the median over rounds of (variant time / dense time in the same round), so load from
other processes hits both sides alike.  "bnb/nf4" is how many times faster fastpeft's NF4 is.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastpeft import quant


def interleaved(variants: dict, rounds: int) -> dict:
    times = {name: [] for name in variants}
    for r in range(rounds + 1):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    return times


def bench_shape(m: int, k: int, n: int, rounds: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * k ** -0.5
    x = torch.randn(m, k, generator=gen)
    gy = torch.randn(m, n, generator=gen)
    nf4 = quant.quantize_weight(w, "nf4", blocksize=64, double_quant=True)
    int8 = quant.quantize_weight(w, "int8")
    dense = nf4.dequantize()
    rows = []
    try:
        import bitsandbytes.functional as bnbF

        q, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    except Exception:  # bitsandbytes is optional
        bnbF = None
    for name, a, dense_fn, fp_fn in (
        ("forward", x, lambda: torch.mm(x, dense.t()), quant.quant_linear),
        ("grad_input", gy, lambda: torch.mm(gy, dense), quant.quant_linear_grad_input),
    ):
        variants = {"dense": dense_fn, "nf4": lambda fn=fp_fn, a=a: fn(a, nf4, backend="cpp"),
                    "int8": lambda fn=fp_fn, a=a: fn(a, int8, backend="cpp")}
        if bnbF is not None:
            if name == "forward":
                variants["bnb nf4"] = lambda: torch.mm(x, bnbF.dequantize_4bit(q, state).t())
            else:
                variants["bnb nf4"] = lambda: torch.mm(gy, bnbF.dequantize_4bit(q, state))
        times = interleaved(variants, rounds)
        base = times["dense"]
        row = {"shape": f"{m}x{k}x{n}", "pass": name, "dense ms": 1e3 * statistics.median(base)}
        for v, ts in times.items():
            if v != "dense":
                row[v] = statistics.median(t / b for t, b in zip(ts, base))
        if "bnb nf4" in row:
            row["bnb/nf4"] = statistics.median(b / f for b, f in zip(times["bnb nf4"], times["nf4"]))
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="512x2048x2048,1024x4096x4096", help="M x K x N, comma-separated")
    parser.add_argument("--quick", action="store_true", help="small shapes (64x512x512, 256x1024x1024)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not quant.cpp_available():
        raise SystemExit("the C++ extension is not available: nothing to benchmark")
    torch.set_num_threads(args.threads)
    shapes = "64x512x512,256x1024x1024" if args.quick else args.shapes
    rows = []
    for spec in shapes.split(","):
        m, k, n = (int(v) for v in spec.lower().split("x"))
        rows += bench_shape(m, k, n, args.rounds)
    cols = ["shape", "pass", "dense ms", "nf4", "int8", "bnb nf4", "bnb/nf4"]
    cols = [c for c in cols if any(c in r for r in rows)]
    print(f"fp32, {args.threads} threads, {args.rounds} rounds; nf4/int8/bnb nf4: time / dense time "
          "(median of per-round ratios); bnb/nf4: bnb time / fastpeft nf4 time")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        cells = [r[c] if isinstance(r.get(c), str) else (f"{r[c]:.1f}" if c == "dense ms" else f"{r[c]:.2f}")
                 for c in cols]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
