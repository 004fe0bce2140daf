"""CPU ratios for DoRA (issue 14) and a quantized frozen base (issue 15), in bench/cpu_ratios.py's harness.

    python bench/dora_qlora.py --dora                # 512x1024x1024 and 2048^3, r = 16, p = 0 and 0.05
    python bench/dora_qlora.py --qlora               # 512x2048x2048 and 1024x4096x4096, r = 16, p = 0.05
    python bench/dora_qlora.py --qdora              # DoRA over NF4 / int8 vs over the fp32 base, same shapes
    python bench/dora_qlora.py --dora --qlora --quick

fp32, 2 threads, forward+backward (x, the adapters and the magnitude train; W frozen).  Every variant
of a row is timed in the same loop, interleaved; a ratio is the median over rounds of (variant /
reference variant in the same round).  "saved MiB" is what autograd keeps for backward (parameters
excluded); "peak MiB" is a training step's peak above its inputs (fastpeft.profile_memory).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_ratios import MiB, interleaved, peft_layer, run_step, saved_bytes  # noqa: E402

import fastpeft  # noqa: E402


def _peak(fn, x, params) -> float:
    prof = fastpeft.profile_memory(fn, x, exclude=params)
    return prof["peak_bytes"] / MiB


def dora_rows(shape, r, p, reps):
    from peft import LoraConfig

    m, k, n = shape
    torch.manual_seed(0)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"], use_dora=True)
    layer = peft_layer(nn.Linear(k, n), cfg)
    layer.base_layer.requires_grad_(False)
    w, b = layer.base_layer.weight, layer.base_layer.bias
    a_, b_ = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    mag = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        b_.normal_(0, 0.02)
    scale = layer.scaling["default"]
    x = torch.randn(m, k, requires_grad=True)
    grad_y = torch.randn(m, n)
    layer.train()

    def lora(t):
        return fastpeft.peft_linear(t, w, b, lora_A=a_, lora_B=b_, lora_scale=scale, lora_dropout=p)

    def dora(t):
        return fastpeft.peft_linear(t, w, b, lora_A=a_, lora_B=b_, lora_scale=scale, lora_dropout=p,
                                    dora_magnitude=mag)

    variants = {"lora": run_step(lora, x, grad_y, True), "dora": run_step(dora, x, grad_y, True),
                "peft": run_step(layer, x, grad_y, True)}
    med = interleaved(variants, reps, base="lora")  # "X/base" keys are ratios to fastpeft LoRA
    params = [w, b, a_, b_, mag]
    return {"shape": f"{m}x{k}x{n}", "r": r, "p": p, "dora/lora": med["dora/base"],
            "peft/dora": med["peft/base"] / med["dora/base"], "peft/lora": med["peft/base"],
            "lora_ms": med["lora"] * 1e3,
            "saved_lora": saved_bytes(lambda: lora(x), params) / MiB,
            "saved_dora": saved_bytes(lambda: dora(x), params) / MiB,
            "saved_peft": saved_bytes(lambda: layer(x), params) / MiB}


def print_dora(rows):
    header = (f"{'shape':>15} {'r':>3} {'p':>5} {'dora/lora':>9} {'peft/dora':>9} {'peftDoRA/lora':>13} "
              f"{'lora ms':>8} {'saved lora':>10} {'saved dora':>10} {'saved peft':>10}")
    print("DoRA forward+backward, fastpeft DoRA vs fastpeft LoRA and vs peft's DoRA layer (MiB saved for backward)")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['shape']:>15} {row['r']:>3} {row['p']:5.2f} {row['dora/lora']:9.3f} {row['peft/dora']:9.3f} "
              f"{row['peft/lora']:13.3f} {row['lora_ms']:8.2f} {row['saved_lora']:10.2f} {row['saved_dora']:10.2f} "
              f"{row['saved_peft']:10.2f}", flush=True)


def _quant_problem(shape, r):
    """The frozen layer (fp32, NF4, int8 copies of W), LoRA factors, x and grad_y of one shape (seed 0)."""
    m, k, n = shape
    torch.manual_seed(0)
    linear = nn.Linear(k, n).requires_grad_(False)
    w, b = linear.weight, linear.bias
    a_ = nn.Parameter(torch.randn(r, k) * k ** -0.5)
    b_ = nn.Parameter(torch.randn(n, r) * 0.02)
    nf4, int8 = fastpeft.quantize_weight(w, "nf4"), fastpeft.quantize_weight(w, "int8")
    return m, k, n, linear, w, b, a_, b_, nf4, int8, torch.randn(m, k, requires_grad=True), torch.randn(m, n)


def qlora_rows(shape, r, p, reps, with_bnb=True):
    from peft import LoraConfig

    m, k, n, linear, w, b, a_, b_, nf4, int8, x, grad_y = _quant_problem(shape, r)
    scale = 2.0

    def ours(weight):
        return lambda t: fastpeft.peft_linear(t, weight, b, lora_A=a_, lora_B=b_, lora_scale=scale, lora_dropout=p)

    variants = {"fp32": run_step(ours(w), x, grad_y, True), "nf4": run_step(ours(nf4), x, grad_y, True),
                "int8": run_step(ours(int8), x, grad_y, True)}
    peft4 = None
    if with_bnb:
        try:
            import bitsandbytes as bnb

            base = bnb.nn.Linear4bit(k, n, bias=True, quant_type="nf4", compress_statistics=True,
                                     compute_dtype=torch.float32)
            base.weight = bnb.nn.Params4bit(w.detach().clone(), requires_grad=False, quant_type="nf4",
                                            compress_statistics=True)
            base.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
            base = base.to("cpu")
            peft4 = peft_layer(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"]))
            peft4.train()
            variants["peft+bnb"] = run_step(peft4, x, grad_y, True)
        except Exception as exc:  # bitsandbytes is an optional extra
            print(f"(peft + bitsandbytes row skipped: {type(exc).__name__}: {exc})", file=sys.stderr)
    med = interleaved(variants, reps, base="fp32")  # "X/base" keys are ratios to the fp32 base
    row = {"shape": f"{m}x{k}x{n}", "r": r, "p": p, "nf4/fp32": med["nf4/base"], "int8/fp32": med["int8/base"],
           "bnb/nf4": med["peft+bnb/base"] / med["nf4/base"] if peft4 is not None else None,
           "fp32_ms": med["fp32"] * 1e3,
           "bytes_nf4": nf4.nbytes / (n * k), "bytes_int8": int8.nbytes / (n * k)}
    return row


def print_qlora(rows):
    header = (f"{'shape':>15} {'r':>3} {'p':>5} {'nf4/fp32':>8} {'int8/fp32':>9} {'peft+bnb/nf4':>12} "
              f"{'fp32 ms':>8} {'B/w nf4':>7} {'B/w int8':>8}")
    print("Quantized base + LoRA forward+backward vs the fp32 base + LoRA (fastpeft), and peft LoRA on bnb Linear4bit")
    print(header)
    print("-" * len(header))
    for row in rows:
        bnb = "-" if row["bnb/nf4"] is None else f"{row['bnb/nf4']:.3f}"
        print(f"{row['shape']:>15} {row['r']:>3} {row['p']:5.2f} {row['nf4/fp32']:8.3f} {row['int8/fp32']:9.3f} "
              f"{bnb:>12} {row['fp32_ms']:8.2f} {row['bytes_nf4']:7.3f} {row['bytes_int8']:8.3f}", flush=True)


def _touch(t):
    """Bump a tensor's version (as an optimizer step does), so DoRA's cached row norm is recomputed."""
    with torch.no_grad():
        t.mul_(1.0)


def _bnb4(w, b):
    """bitsandbytes Linear4bit (NF4, double quant, fp32 compute) over w, b; raises if bnb is missing."""
    import bitsandbytes as bnb

    n, k = w.shape
    base = bnb.nn.Linear4bit(k, n, bias=True, quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32)
    base.weight = bnb.nn.Params4bit(w.detach().clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    base.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
    return base.to("cpu")


def qdora_rows(shape, r, p, reps, with_bnb=True):
    """DoRA over a quantized base vs DoRA over the fp32 base (fastpeft), fwd+bwd, the norm recomputed per step."""
    from peft import LoraConfig

    m, k, n, linear, w, b, a_, b_, nf4, int8, x, grad_y = _quant_problem(shape, r)
    mag = nn.Parameter(nf4.dequantize().norm(dim=1))

    def ours(weight, dora=True):
        extra = {"dora_magnitude": mag} if dora else {}

        def f(t):
            _touch(b_)  # as after an optimizer step: the row norm is recomputed (‖W‖²_row stays cached)
            return fastpeft.peft_linear(t, weight, b, lora_A=a_, lora_B=b_, lora_scale=2.0, lora_dropout=p, **extra)
        return f

    variants = {"fp32 dora": run_step(ours(w), x, grad_y, True), "nf4 dora": run_step(ours(nf4), x, grad_y, True),
                "int8 dora": run_step(ours(int8), x, grad_y, True),
                "nf4 lora": run_step(ours(nf4, False), x, grad_y, True)}
    if with_bnb:
        try:
            layer = peft_layer(_bnb4(w, b), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"],
                                                       use_dora=True))
            layer.train()
            variants["peft+bnb dora"] = run_step(layer, x, grad_y, True)
        except Exception as exc:  # bitsandbytes is an optional extra
            print(f"(peft DoRA on bitsandbytes skipped: {type(exc).__name__}: {exc})", file=sys.stderr)
    med = interleaved(variants, reps, base="fp32 dora")
    return {"shape": f"{m}x{k}x{n}", "r": r, "p": p, "nf4/fp32": med["nf4 dora/base"],
            "int8/fp32": med["int8 dora/base"], "dora/lora nf4": med["nf4 dora/base"] / med["nf4 lora/base"],
            "bnb/nf4": (med["peft+bnb dora/base"] / med["nf4 dora/base"]) if "peft+bnb dora" in variants else None,
            "fp32_ms": med["fp32 dora"] * 1e3, "nf4_ms": med["nf4 dora"] * 1e3}


def print_qdora(rows):
    header = (f"{'shape':>15} {'r':>3} {'p':>5} {'nf4/fp32':>8} {'int8/fp32':>9} {'dora/lora(nf4)':>14} "
              f"{'peftbnb/nf4':>11} {'fp32 ms':>8} {'nf4 ms':>8}")
    print("DoRA over a quantized base vs DoRA over the fp32 base (fastpeft), fwd+bwd, norm recomputed per step")
    print(header)
    print("-" * len(header))
    for row in rows:
        bnb = "-" if row["bnb/nf4"] is None else f"{row['bnb/nf4']:.3f}"
        print(f"{row['shape']:>15} {row['r']:>3} {row['p']:5.2f} {row['nf4/fp32']:8.3f} {row['int8/fp32']:9.3f} "
              f"{row['dora/lora nf4']:14.3f} {bnb:>11} {row['fp32_ms']:8.2f} {row['nf4_ms']:8.2f}", flush=True)


def peak_rows(m=256, k=4096, n=4096, r=16, p=0.05):
    """A training step's peak memory above its inputs at M = 256, K = N = 4096."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(n, k) * k ** -0.5, requires_grad=False)
    b = nn.Parameter(torch.zeros(n), requires_grad=False)
    a_ = nn.Parameter(torch.randn(r, k) * k ** -0.5)
    b_ = nn.Parameter(torch.randn(n, r) * 0.02)
    mag = nn.Parameter(w.detach().norm(dim=1))
    x = torch.randn(m, k, requires_grad=True)
    nf4 = fastpeft.quantize_weight(w, "nf4")
    params = [w, b, a_, b_, mag]
    kw = dict(lora_A=a_, lora_B=b_, lora_scale=2.0, lora_dropout=p)
    rows = {"fp32 base + LoRA": _peak(lambda t: fastpeft.peft_linear(t, w, b, **kw), x, params),
            "fp32 base + DoRA": _peak(lambda t: fastpeft.peft_linear(t, w, b, dora_magnitude=mag, **kw), x, params),
            "NF4 base + LoRA": _peak(lambda t: fastpeft.peft_linear(t, nf4, b, **kw), x,
                                     params + list(nf4.tensors().values()))}
    from fastpeft.quant.dora import row_sq_norms

    row_sq_norms(nf4)  # cached on the QuantizedWeight (computed once per frozen base, like the fp32 base's)

    def nf4_dora(t):
        _touch(b_)  # the norm's W Aᵀ is recomputed in the step, as after an optimizer step
        return fastpeft.peft_linear(t, nf4, b, dora_magnitude=mag, **kw)

    rows["NF4 base + DoRA"] = _peak(nf4_dora, x, params + list(nf4.tensors().values()))
    try:
        from peft import LoraConfig

        for name, cfg in (("peft LoRA", LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"])),
                          ("peft DoRA", LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"],
                                                   use_dora=True))):
            lin = nn.Linear(k, n)
            lin.weight.data, lin.bias.data = w.data, b.data
            layer = peft_layer(lin, cfg)
            layer.base_layer.requires_grad_(False)
            layer.train()
            rows[name] = _peak(layer, x, [])
        for name, dora in (("peft+bnb LoRA", False), ("peft+bnb DoRA", True)):
            try:
                layer = peft_layer(_bnb4(w, b), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p,
                                                           target_modules=["0"], use_dora=dora))
            except Exception as exc:  # bitsandbytes is an optional extra
                print(f"({name} skipped: {type(exc).__name__}: {exc})", file=sys.stderr)
                continue
            layer.train()
            rows[name] = _peak(layer, x, [])
    except ImportError:
        pass
    print(f"peak MiB of one forward+backward above the inputs, M={m}, K={k}, N={n}, r={r}, dropout {p}")
    for name, mib in rows.items():
        print(f"  {name:<20} {mib:8.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dora", action="store_true")
    parser.add_argument("--qlora", action="store_true")
    parser.add_argument("--qdora", action="store_true", help="DoRA over NF4 / int8 vs DoRA over the fp32 base")
    parser.add_argument("--peak", action="store_true", help="the M=256, K=N=4096 step-peak table")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, wall clock; medians of "
          "interleaved rounds", flush=True)
    if args.dora:
        shapes = [((128, 256, 256), 10)] if args.quick else [((512, 1024, 1024), 20), ((2048, 2048, 2048), 5)]
        print_dora(dora_rows(s, 16, p, args.reps or reps) for s, reps in shapes for p in (0.0, 0.05))
    if args.qlora:
        shapes = [((128, 256, 256), 10)] if args.quick else [((512, 2048, 2048), 10), ((1024, 4096, 4096), 3)]
        print_qlora(qlora_rows(s, 16, 0.05, args.reps or reps) for s, reps in shapes)
    if args.qdora:
        shapes = [((128, 256, 256), 10)] if args.quick else [((512, 2048, 2048), 10), ((1024, 4096, 4096), 3)]
        print_qdora(qdora_rows(s, 16, 0.05, args.reps or reps) for s, reps in shapes)
    if args.peak:
        peak_rows()


if __name__ == "__main__":
    main()
