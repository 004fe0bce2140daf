"""CPU speed and saved-memory ratios of the C++ backend against the frozen layer, the reference
backend and peft (issue 3's table; issue 5's sparse table with --sparse).

    python bench/cpu_ratios.py            # full table: 512x1024x1024, 2048^3, 4096^3 (slow: minutes)
    python bench/cpu_ratios.py --quick    # small shapes, a few seconds
    python bench/cpu_ratios.py --sparse   # sparse fine-tuning, N=K=4096, M=2048, densities 0.1/1/5 %
    python bench/cpu_ratios.py --clock cpu  # 1 thread, timed by thread CPU time (steady on a busy box)

fp32, 2 threads (``--threads``).  Every variant of a row is timed in the same loop, interleaved
(base, cpp, reference, peft, base, cpp, ...); a ratio is the median over rounds of (variant time /
base time in the same round), so load from other processes hits both sides of a ratio alike.
cpp/peft is cpp/base divided by peft/base.  "saved MiB" is what autograd keeps for backward in one
forward, measured with torch.autograd.graph.saved_tensors_hooks: unique storages, parameters
(frozen weight, bias, adapters) excluded.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

import fastpeft

MiB = 2.0**20


def saved_bytes(fn, params) -> int:
    """Bytes of the unique non-parameter storages autograd saves while running fn()."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params if p is not None}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


STAT = statistics.median
CLOCK = time.perf_counter


def interleaved(variants: dict, reps: int, base: str = "base") -> dict:
    """Per variant: its median (or ``--stat``) seconds and the median of its per-round ratios to
    ``base``.  Variants are timed round-robin (one warm-up round first), so a round's variants run
    under the same machine load and the per-round ratio cancels most of it."""
    times = {name: [] for name in variants}
    for rep in range(reps + 1):
        for name, fn in variants.items():
            start = CLOCK()
            fn()
            elapsed = CLOCK() - start
            if rep > 0:
                times[name].append(elapsed)
    out = {}
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times[base])]
        out[name] = STAT(ts)
        out[name + "/base"] = STAT(ratios)
    return out


def peft_layer(linear: nn.Linear, config):
    from peft import get_peft_model

    model = get_peft_model(nn.Sequential(linear), config)
    return model.base_model.model[0]


def run_step(forward, x, grad_y, backward: bool):
    def step():
        x.grad = None
        y = forward(x)
        if backward:
            y.backward(grad_y)
        return y

    return step


def dense_rows(shape, ranks, reps, methods):
    """Yield result rows for the dense methods on one shape."""
    from peft import IA3Config, LoraConfig

    m, k, n = shape
    linear = nn.Linear(k, n).requires_grad_(False)
    w, b = linear.weight, linear.bias
    x = torch.randn(m, k)
    grad_y = torch.randn(m, n)

    def lora_variants(r, p):
        lcfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"])
        layer = peft_layer(nn.Linear(k, n), lcfg)
        layer.base_layer.weight.data, layer.base_layer.bias.data = w.data, b.data
        layer.base_layer.requires_grad_(False)
        a_, b_ = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            b_.normal_(0, 0.02)
        scale = layer.scaling["default"]

        def ours(backend):
            return lambda t: fastpeft.peft_linear(t, w, b, lora_A=a_, lora_B=b_, lora_scale=scale,
                                                  lora_dropout=p, backend=backend)

        return layer, ours, [w, b, a_, b_]

    def ia3_variants(position):
        cfg = IA3Config(target_modules=["0"], feedforward_modules=["0"] if position == "in" else [])
        layer = peft_layer(nn.Linear(k, n), cfg)
        layer.base_layer.weight.data, layer.base_layer.bias.data = w.data, b.data
        layer.base_layer.requires_grad_(False)
        vec = layer.ia3_l["default"]
        with torch.no_grad():
            vec.uniform_(0.5, 1.5)
        key = "ia3_in" if position == "in" else "ia3_out"

        def ours(backend):
            return lambda t: fastpeft.peft_linear(t, w, b, backend=backend, **{key: vec.view(-1)})

        return layer, ours, [w, b, vec]

    def bitfit_variants():
        # peft has no BitFit: its "peft" column is plain torch, nn.Linear with only the bias trainable.
        layer = nn.Linear(k, n)
        layer.weight.data, layer.weight.requires_grad = w.data, False
        bias = layer.bias
        bias.data.copy_(b.data)

        def ours(backend):
            return lambda t: fastpeft.peft_linear(t, w, bias, backend=backend)

        return layer, ours, [w, bias]

    cases = []
    for r in ranks:
        if "lora_fwd" in methods:
            cases.append((r, "LoRA fwd", lambda r=r: lora_variants(r, 0.0), False))
        if "lora_fwdbwd" in methods:
            cases.append((r, "LoRA fwd+bwd", lambda r=r: lora_variants(r, 0.0), True))
        if "lora_drop" in methods:
            cases.append((r, "LoRA+drop0.1 fwd+bwd", lambda r=r: lora_variants(r, 0.1), True))
    if "ia3_in" in methods:
        cases.append(("-", "IA3 in fwd+bwd", lambda: ia3_variants("in"), True))
    if "ia3_out" in methods:
        cases.append(("-", "IA3 out fwd+bwd", lambda: ia3_variants("out"), True))
    if "bitfit" in methods:
        cases.append(("-", "BitFit fwd+bwd", bitfit_variants, True))

    for r, name, make, backward in cases:
        layer, ours, params = make()
        layer.train()
        x.requires_grad_(backward)
        variants = {
            "base": run_step(linear, x, grad_y, backward),
            "cpp": run_step(ours("cpp"), x, grad_y, backward),
            "reference": run_step(ours("reference"), x, grad_y, backward),
            "peft": run_step(layer, x, grad_y, backward),
        }
        med = interleaved(variants, reps)
        x.requires_grad_(True)
        base_saved = saved_bytes(lambda: linear(x), [w, b])
        cpp_saved = saved_bytes(lambda: ours("cpp")(x), params + list(layer.parameters()))
        peft_saved = saved_bytes(lambda: layer(x), params + list(layer.parameters()))
        yield {
            "shape": f"{m}x{k}x{n}", "r": r, "method": name,
            "vs_base": med["cpp/base"], "vs_peft": med["cpp/base"] / med["peft/base"],
            "ref_vs_base": med["reference/base"], "peft_vs_base": med["peft/base"],
            "base_ms": med["base"] * 1e3,
            "saved": cpp_saved / MiB, "saved_base": base_saved / MiB, "saved_peft": peft_saved / MiB,
        }


def print_dense(rows):
    header = (f"{'shape':>15} {'r':>3} {'method':<22} {'cpp/base':>8} {'cpp/peft':>8} {'ref/base':>8} "
              f"{'peft/base':>9} {'base ms':>9} {'saved MiB':>9} {'base MiB':>8} {'peft MiB':>8}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['shape']:>15} {row['r']:>3} {row['method']:<22} {row['vs_base']:8.3f} {row['vs_peft']:8.3f} "
              f"{row['ref_vs_base']:8.3f} {row['peft_vs_base']:9.3f} {row['base_ms']:9.2f} {row['saved']:9.2f} "
              f"{row['saved_base']:8.2f} {row['saved_peft']:8.2f}", flush=True)


# ---- sparse (issue 5) ----------------------------------------------------------------------------

class DenseGradSparse(torch.autograd.Function):
    """The plain-PyTorch way: W + S formed densely, dS = dY^T X as a dense N x K GEMM, then gathered."""

    @staticmethod
    def forward(ctx, x, weight, index, value):
        w = weight.clone()
        w.view(-1)[index] += value
        ctx.save_for_backward(x, w, index)
        return x @ w.t()

    @staticmethod
    def backward(ctx, gy):
        x, w, index = ctx.saved_tensors
        gx = gy @ w
        gv = (gy.t() @ x).view(-1)[index]
        return gx, None, None, gv


def sparse_rows(m, k, n, densities, reps):
    linear = nn.Linear(k, n, bias=False).requires_grad_(False)
    w = linear.weight
    x = torch.randn(m, k, requires_grad=True)
    grad_y = torch.randn(m, n)
    for density in densities:
        nnz = max(1, int(round(density * n * k)))
        index = torch.randperm(n * k)[:nnz].sort().values
        value = nn.Parameter(torch.randn(nnz) * 0.01)
        variants = {
            "base": run_step(linear, x, grad_y, True),
            "cpp": run_step(lambda t: fastpeft.peft_linear(t, w, sparse_index=index, sparse_value=value,
                                                           backend="cpp"), x, grad_y, True),
            "reference": run_step(lambda t: fastpeft.peft_linear(t, w, sparse_index=index, sparse_value=value,
                                                                 backend="reference"), x, grad_y, True),
            "dense-grad": run_step(lambda t: DenseGradSparse.apply(t, w, index, value), x, grad_y, True),
        }
        med = interleaved(variants, reps)
        saved = saved_bytes(lambda: fastpeft.peft_linear(x, w, sparse_index=index, sparse_value=value,
                                                         backend="cpp"), [w, value])
        yield {"density": density, "nnz": nnz, "cpp": med["cpp/base"],
               "reference": med["reference/base"], "dense": med["dense-grad/base"],
               "base_ms": med["base"] * 1e3, "saved": saved / MiB}


def print_sparse(rows, m, k, n):
    print(f"sparse fine-tuning, x [{m}, {k}], W [{n}, {k}], fwd+bwd (grads for x and sparse_value), "
          f"ratios vs the frozen layer's fwd+bwd")
    header = (f"{'density':>8} {'nnz':>9} {'cpp/base':>8} {'ref/base':>8} {'densegrad/base':>14} "
              f"{'base ms':>9} {'saved MiB':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['density'] * 100:7.2f}% {row['nnz']:9d} {row['cpp']:8.3f} {row['reference']:8.3f} "
              f"{row['dense']:14.3f} {row['base_ms']:9.2f} {row['saved']:9.2f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--sparse", action="store_true", help="the sparse fine-tuning table instead")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=None, help="timed rounds per row (default by shape)")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="statistic of the timed rounds (min is steadier on a loaded machine)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: one thread timed by its own CPU time (time.thread_time), which a loaded "
                             "machine does not inflate; implies --threads 1")
    parser.add_argument("--shapes", default=None, help="e.g. 512x1024x1024,2048x2048x2048 (overrides the plan)")
    parser.add_argument("--methods", default="lora_fwd,lora_fwdbwd,lora_drop,ia3_in,ia3_out,bitfit")
    args = parser.parse_args(argv)
    global STAT, CLOCK
    STAT = min if args.stat == "min" else statistics.median
    if args.clock == "cpu":
        CLOCK, args.threads = time.thread_time, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reason = fastpeft.core.backends.unavailable_reason("cpp")
    if reason is not None:
        sys.exit(f"the cpp backend is not available: {reason}")
    clock = "thread CPU time" if args.clock == "cpu" else "wall clock"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, {clock}; "
          f"{args.stat}s of interleaved rounds", flush=True)
    if args.sparse:
        m, k, n = (256, 512, 512) if args.quick else (2048, 4096, 4096)
        rows = sparse_rows(m, k, n, (0.001, 0.01, 0.05), args.reps or (10 if args.quick else 5))
        print_sparse(rows, m, k, n)
        return
    methods = set(args.methods.split(","))
    if args.quick:
        plan = [((128, 256, 256), 20), ((256, 512, 512), 20)]
    else:
        plan = [((512, 1024, 1024), 30), ((2048, 2048, 2048), 8), ((4096, 4096, 4096), 3)]
    if args.shapes:
        default_reps = {512: 30, 2048: 8, 4096: 3}
        plan = [(tuple(int(v) for v in s.split("x")), default_reps.get(int(s.split("x")[0]), 10))
                for s in args.shapes.split(",")]

    def all_rows():
        for shape, reps in plan:
            yield from dense_rows(shape, (8, 16, 64), args.reps or reps, methods)

    print_dense(all_rows())


if __name__ == "__main__":
    main()
