"""One prepared GPU run for the Triton backend: numerics on CUDA, then speed and memory.

    python bench/gpu_bench.py                 # everything (mostly JIT compiles): aim < 8 min on one H200
    python bench/gpu_bench.py --quick         # one shape, r=16 (smoke run)
    python bench/gpu_bench.py --help

1. Numerics: fastpeft.peft_linear(backend="triton") against fastpeft.reference.peft_linear in
   float64 on the GPU, forward and every gradient, for every path combination, DoRA and LoRA over
   an NF4 base (reference on the dequantized weight), fp32 and bf16
   (and bf16 activations with fp32 adapters), odd shapes.  Any failure makes the exit status 1.
2. Timing at bf16, M=8192 tokens, (K, N) = (4096, 4096) and the 7B MLP (4096, 11008), r in {16, 64}:
   the frozen matmul alone (cuBLAS, torch.matmul), a plain torch LoRA layer, peft's LoRA and DoRA
   layers (if peft imports) and the fused Triton op (LoRA, DoRA, LoRA over an NF4 base); forward
   (no grad) and forward+backward (x and the
   adapters need grad, W frozen).  Medians of triton.testing.do_bench, the variants interleaved
   round by round, inputs rotated between calls so no call finds its activations in L2; peak
   memory of one training step (torch.cuda.max_memory_allocated above the resident inputs).
Results go to stdout as tables and, as JSON, to --json or $OUT/gpu_bench.json when $OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

SHAPES = {"4096x4096": (4096, 4096), "mlp-4096x11008": (4096, 11008)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tokens", type=int, default=8192, help="M, the number of rows of x (default 8192)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {', '.join(SHAPES)}")
    p.add_argument("--ranks", default="16,64", help="LoRA ranks (default 16,64)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout in the timed runs (default 0)")
    p.add_argument("--quick", action="store_true", help="one shape, r=16, one round")
    p.add_argument("--skip-check", action="store_true", help="skip the numerics check")
    p.add_argument("--skip-timing", action="store_true", help="only check numerics")
    p.add_argument("--no-peft", action="store_true", help="do not time peft's layer even if importable")
    p.add_argument("--peft-adapters", action="store_true",
                   help="also time the fused op on peft's own (fp32) adapters (more JIT compiles)")
    p.add_argument("--json", default=None, help="write results here (default $OUT/gpu_bench.json if $OUT is set)")
    args = p.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    try:
        args.ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    except ValueError:
        p.error(f"--ranks must be comma-separated integers, got {args.ranks!r}")
    if not args.ranks or min(args.ranks) < 1:
        p.error("--ranks needs at least one rank >= 1")
    if args.tokens < 1 or args.rounds < 1:
        p.error("--tokens and --rounds must be >= 1")
    if not 0.0 <= args.dropout < 1.0:
        p.error("--dropout must be in [0, 1)")
    if args.quick:
        args.shapes, args.ranks, args.rounds = args.shapes[:1], args.ranks[:1], 1
    return args


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def require_gpu():
    """Import torch/fastpeft and make sure the Triton backend runs compiled kernels on a GPU."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("gpu_bench: TRITON_INTERPRET is set; unset it to benchmark compiled kernels")
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device visible to torch (torch.cuda.is_available() is False); "
                 "this script needs a GPU")
    import fastpeft

    if "triton" not in fastpeft.available_backends():
        from fastpeft.core.backends import unavailable_reason

        sys.exit(f"gpu_bench: the triton backend is unavailable: {unavailable_reason('triton')}")
    return torch, fastpeft


# ----------------------------------------------------------------------------------------------
# 1. numerics

def check_numerics(torch, fastpeft, dev="cuda", m_lead=(5, 61), k=333, n=257, r=16):
    """Every path combination, fp32/bf16/fp16 and bf16 with fp32 adapters, vs float64 (M = 305:
    nothing a multiple of a block).  Returns (all ok, rows)."""
    from fastpeft import reference

    # Each path alone is covered on CPU by tests/test_triton.py; here every path at once in each
    # dtype, plus the LoRA-only path that is timed below (every new variant costs a JIT compile).
    combos = {"all": ("bias", "lora", "dropout", "ia3_in", "ia3_out", "sparse", "weight"), "lora": ("lora",),
              "dora": ("bias", "lora", "dropout", "dora"), "nf4+lora": ("bias", "lora", "dropout", "nf4")}
    cases = [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32), (torch.float16, None)]
    tol = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
    rows, ok = [], True
    gen = torch.Generator(device=dev).manual_seed(0)
    for dtype, adt in cases:
        for name, paths in combos.items():
            if name == "lora" and (adt is not None or dtype != torch.bfloat16):
                continue
            if name == "nf4+lora" and (adt is not None or dtype == torch.float16):
                continue
            ad = adt or dtype

            def rnd(*shape, dt=dtype, scale=1.0, offset=0.0):
                return (torch.randn(*shape, generator=gen, device=dev) * scale + offset).to(dt)

            leaves = {"x": rnd(*m_lead, k).requires_grad_(), "weight": rnd(n, k, scale=k ** -0.5)}
            leaves["weight"].requires_grad_("weight" in paths)
            kw = {}
            if "bias" in paths:
                leaves["bias"] = rnd(n, dt=ad).requires_grad_()
            if "lora" in paths:
                leaves["lora_A"] = rnd(r, k, dt=ad, scale=k ** -0.5).requires_grad_()
                leaves["lora_B"] = rnd(n, r, dt=ad, scale=0.5).requires_grad_()
                kw.update(lora_scale=2.0, lora_dropout=0.1 if "dropout" in paths else 0.0, dropout_seed=1234)
            if "dora" in paths:  # m = ‖W‖_row times a factor near 1
                m = leaves["weight"].double().norm(dim=1) * (1 + 0.2 * torch.randn(n, generator=gen, device=dev))
                leaves["dora_magnitude"] = m.to(ad).requires_grad_()
            if "ia3_in" in paths:
                leaves["ia3_in"] = rnd(k, dt=ad, scale=0.3, offset=1.0).requires_grad_()
            if "ia3_out" in paths:
                leaves["ia3_out"] = rnd(n, dt=ad, scale=0.3, offset=1.0).requires_grad_()
            if "sparse" in paths:
                idx = torch.randperm(n * k, device=dev, generator=gen)[: n * k // 50].sort().values
                kw["sparse_index"] = idx
                leaves["sparse_value"] = rnd(idx.numel(), dt=ad, scale=0.1).requires_grad_()
            args = {k_: v for k_, v in leaves.items() if k_ not in ("x", "weight", "bias")}
            weight = leaves["weight"]
            if "nf4" in paths:  # the reference runs on the dequantized weight
                weight = fastpeft.quantize_weight(weight.detach(), "nf4")
                leaves["weight"] = weight.dequantize()
            y = fastpeft.peft_linear(leaves["x"], weight, leaves.get("bias"), backend="triton", **kw, **args)
            ref = {k_: v.detach().to(dtype).double().requires_grad_(v.requires_grad) for k_, v in leaves.items()}
            ref_args = {k_: v for k_, v in ref.items() if k_ not in ("x", "weight", "bias")}
            y_ref = reference.peft_linear(ref["x"], ref["weight"], ref.get("bias"), **kw, **ref_args)
            g = torch.randn(y_ref.shape, generator=gen, device=dev).to(dtype)
            y.backward(g)
            y_ref.backward(g.double())
            errs = {"y": ((y.double() - y_ref).norm() / y_ref.norm()).item()}
            for k_, v in leaves.items():
                if v.requires_grad:
                    errs[k_] = ((v.grad.double() - ref[k_].grad).norm() / ref[k_].grad.norm()).item()
            worst = max(errs.values())
            passed = worst < tol[dtype]
            ok &= passed
            label = str(dtype).replace("torch.", "") + ("+fp32 adapters" if adt else "")
            rows.append({"dtype": label, "paths": name, "worst_rel_err": worst, "ok": passed, "errors": errs})
            print(f"  {'ok  ' if passed else 'FAIL'} {label:22s} {name:14s} worst rel err {worst:.2e} "
                  f"(tol {tol[dtype]:.0e})" + ("" if passed else f"  {errs}"), flush=True)
    return ok, rows


# ----------------------------------------------------------------------------------------------
# 2. timing

def build_variants(torch, fastpeft, m, k, n, r, p, use_peft, rotate=3, dev="cuda", peft_adapters=False):
    """name -> (forward fn, params needing grad) over rotating inputs; all bf16 on the GPU."""
    dt = torch.bfloat16
    xs = [torch.randn(m, k, device=dev, dtype=dt) for _ in range(rotate)]
    weight = torch.randn(n, k, device=dev, dtype=dt) * k ** -0.5
    a = (torch.randn(r, k, device=dev, dtype=dt) * k ** -0.5).requires_grad_()
    b = (torch.randn(n, r, device=dev, dtype=dt) * 0.01).requires_grad_()
    scale = 2.0
    variants = {
        "cublas_frozen": (lambda x: torch.matmul(x, weight.t()), []),
        "torch_lora": (lambda x: torch.matmul(x, weight.t()) + scale * (
            (torch.nn.functional.dropout(x, p) if p > 0 else x) @ a.t()) @ b.t(), [a, b]),
        "fastpeft_triton": (lambda x: fastpeft.peft_linear(x, weight, lora_A=a, lora_B=b, lora_scale=scale,
                                                           lora_dropout=p, backend="triton"), [a, b]),
    }
    # DoRA (magnitude m = ‖W‖_row, trainable) and an NF4 base, through the same fused op
    mag = weight.float().norm(dim=1).to(dt).requires_grad_()
    variants["fastpeft_triton_dora"] = (
        lambda x: fastpeft.peft_linear(x, weight, lora_A=a, lora_B=b, lora_scale=scale, lora_dropout=p,
                                       dora_magnitude=mag, backend="triton"), [a, b, mag])
    nf4 = fastpeft.quantize_weight(weight, "nf4")
    variants["fastpeft_triton_nf4"] = (
        lambda x: fastpeft.peft_linear(x, nf4, lora_A=a, lora_B=b, lora_scale=scale, lora_dropout=p,
                                       backend="triton"), [a, b])
    if use_peft:
        try:
            from peft import LoraConfig, get_peft_model

            class Wrap(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.proj = torch.nn.Linear(k, n, bias=False, device=dev, dtype=dt)

                def forward(self, x):
                    return self.proj(x)

            for use_dora, label in ((False, "peft_lora"), (True, "peft_dora")):
                model = get_peft_model(Wrap(), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p,
                                                          target_modules=["proj"], use_dora=use_dora))
                model.proj.base_layer.weight.data.copy_(weight)
                variants[label] = (model, [q for q in model.parameters() if q.requires_grad])
            if peft_adapters:  # the same adapters (peft keeps them in fp32 by default) through the fused op
                la, lb = model.proj.lora_A["default"].weight, model.proj.lora_B["default"].weight
                variants["fastpeft_on_peft_adapters"] = (
                    lambda x: fastpeft.peft_linear(x, weight, lora_A=la, lora_B=lb, lora_scale=2.0, lora_dropout=p,
                                                   backend="triton"), [la, lb])
        except Exception as exc:  # peft missing or incompatible: time the rest
            log(f"peft layer skipped: {type(exc).__name__}: {exc}")
    return xs, variants


def time_shape(torch, fastpeft, m, k, n, r, p, rounds, use_peft, peft_adapters=False):
    from triton.testing import do_bench

    xs, variants = build_variants(torch, fastpeft, m, k, n, r, p, use_peft, peft_adapters=peft_adapters)
    xs_grad = [x.detach().clone().requires_grad_() for x in xs]
    grad = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    state = {"i": 0}

    def next_x(pool):
        state["i"] = (state["i"] + 1) % len(pool)
        return pool[state["i"]]

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn(next_x(xs))
        return run

    def fwd_bwd(fn, params):
        def run():
            x = next_x(xs_grad)
            x.grad = None
            for q in params:
                q.grad = None
            fn(x).backward(grad)
        return run

    results = {name: {"fwd_ms": [], "fwd_bwd_ms": []} for name in variants}
    for _name, (fn, params) in variants.items():  # warm-up: JIT compile and autotune outside timing
        fwd(fn)()
        fwd_bwd(fn, params)()
    torch.cuda.synchronize()
    for _ in range(rounds):
        for name, (fn, params) in variants.items():
            results[name]["fwd_ms"].append(do_bench(fwd(fn), warmup=25, rep=100, return_mode="median"))
            results[name]["fwd_bwd_ms"].append(do_bench(fwd_bwd(fn, params), warmup=25, rep=100,
                                                        return_mode="median"))
    for name, (fn, params) in variants.items():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd(fn, params)()
        torch.cuda.synchronize()
        results[name]["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        for key in ("fwd_ms", "fwd_bwd_ms"):
            vals = sorted(results[name][key])
            results[name][key] = vals[len(vals) // 2]
    return results


def print_table(shape_name, m, k, n, r, res):
    base = res["cublas_frozen"]
    print(f"\n== bf16  M={m} K={k} N={n} r={r}  ({shape_name}) ==")
    print(f"{'variant':28s} {'fwd ms':>8s} {'x cuBLAS':>8s} {'fwd+bwd ms':>10s} {'x cuBLAS':>8s} {'peak MiB':>9s}")
    for name, row in res.items():
        print(f"{name:28s} {row['fwd_ms']:8.3f} {row['fwd_ms'] / base['fwd_ms']:8.3f} {row['fwd_bwd_ms']:10.3f} "
              f"{row['fwd_bwd_ms'] / base['fwd_bwd_ms']:8.3f} {row['peak_mib']:9.1f}")
    fused = res["fastpeft_triton"]
    notes = [f"fused fwd {fused['fwd_ms'] / base['fwd_ms']:.3f}x cuBLAS (target <= 1.05)",
             f"fused fwd+bwd {fused['fwd_bwd_ms'] / base['fwd_bwd_ms']:.3f}x cuBLAS (target <= 1.10)"]
    if "peft_lora" in res:
        peft_row = res["peft_lora"]
        notes.append(f"peft/fused fwd+bwd {peft_row['fwd_bwd_ms'] / fused['fwd_bwd_ms']:.2f}x (target > 1.27)")
    if "peft_dora" in res:
        notes.append(f"peft DoRA / fused DoRA fwd+bwd "
                     f"{res['peft_dora']['fwd_bwd_ms'] / res['fastpeft_triton_dora']['fwd_bwd_ms']:.2f}x")
    notes.append(f"NF4 / bf16 base fwd+bwd {res['fastpeft_triton_nf4']['fwd_bwd_ms'] / fused['fwd_bwd_ms']:.3f}x")
    print("  " + "; ".join(notes), flush=True)


def main(argv=None):
    args = parse_args(argv)
    torch, fastpeft = require_gpu()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args)}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    log(f"device {out['device']}, torch {torch.__version__}, triton {out.get('triton')}")
    status = 0
    if not args.skip_check:
        log("numerics vs float64 reference (forward and every gradient; first config, no autotuning)")
        from fastpeft.kernels.config import no_autotune

        with no_autotune():
            ok, rows = check_numerics(torch, fastpeft)
        out["numerics"] = rows
        if not ok:
            status = 1
            log("numerics: FAILURES above")
    if not args.skip_timing:
        use_peft = not args.no_peft
        out["timing"] = []
        for shape_name in args.shapes:
            k, n = SHAPES[shape_name]
            for r in args.ranks:
                log(f"timing {shape_name} r={r} (first call compiles and autotunes)")
                try:
                    res = time_shape(torch, fastpeft, args.tokens, k, n, r, args.dropout, args.rounds, use_peft,
                                     args.peft_adapters)
                except Exception:
                    traceback.print_exc()
                    status = 1
                    continue
                print_table(shape_name, args.tokens, k, n, r, res)
                out["timing"].append({"shape": shape_name, "M": args.tokens, "K": k, "N": n, "r": r, "results": res})
    path = args.json or (os.path.join(os.environ["OUT"], "gpu_bench.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
        log(f"wrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
