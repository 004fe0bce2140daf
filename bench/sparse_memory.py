"""Sparse fine-tuning step: extra memory and fwd+bwd time over the frozen layer's step.

    python bench/sparse_memory.py                       # the issue's table: N=K=4096, M=2048, fp32 CPU
    python bench/sparse_memory.py --n 512 --k 384 --m 256 --repeats 2   # a quick smoke run
    python bench/sparse_memory.py --json sparse.json
    python bench/sparse_memory.py --backends cpp --no-memory --breakdown   # where the cpp time goes

For each density and mask structure (unstructured, b x b blocks; masks from "random" selection,
the selection rule does not change the cost) it compares, on the same weight, input and mask:

- ``frozen base``: ``F.linear(x, W)`` with W frozen and x requiring grad (forward + dX).
- ``fastpeft[<backend>]``: ``fastpeft.peft_linear(x, W, sparse_index=, sparse_value=)``.
- ``dense-grad torch``: plain PyTorch ``F.linear(x, W + scatter(values))``; autograd forms the
  dense [N, K] delta, the dense W + S and a dense [N, K] gradient (a third GEMM).
- ``peft SHiRA``: peft's ``ShiraConfig`` layer (clones W and adds a sparse COO delta every step);
  SHiRA fixes nnz = r (N + K), so it runs with the nearest r and its own nnz.

Memory: each case runs in a fresh subprocess with glibc told to mmap every allocation above
64 KiB and to trim eagerly (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``), so the
resident set follows live tensors.  After two warm-up steps the kernel's peak-RSS counter is
reset (``/proc/self/clear_refs`` = 5) and one step runs; its growth is VmHWM - VmRSS before the
step (the largest of 3 steps; 1 warm-up and 1 step for a slow method).  "extra" is that growth
minus the frozen base's growth.

Time: every method of one case is timed in this process, interleaved round by round (the order
rotates each round), and the medians are compared: "x base" = method / frozen base.

Targets (issue 5): extra memory <= 10% of one dense fp32 N x K gradient (6.4 MiB for 4096^2)
plus newly saved activations (none here: the only activation the sparse gradient needs is x,
which the caller holds anyway), and fwd+bwd <= 1.5x the base at 1% density.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import fastpeft
from fastpeft.methods.sparse_select import select_sparse_indices

MIB = 1024 * 1024
BASE = "frozen base"
DENSE = "dense-grad torch"
SHIRA = "peft SHiRA"


# ----------------------------------------------------------------------------- methods


class Case:
    """The shared tensors of one (shape, density, mask) case."""

    def __init__(self, n, k, m, density, block, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.n, self.k, self.m, self.density, self.block = n, k, m, density, block
        self.weight = torch.randn(n, k, generator=gen) / k ** 0.5
        self.x = torch.randn(m, k, generator=gen).requires_grad_(True)
        self.grad_y = torch.randn(m, n, generator=gen)
        self.index = select_sparse_indices(self.weight, density, "random", seed=seed, block=block)
        self.values = (torch.randn(self.index.numel(), generator=gen) * 1e-3).requires_grad_(True)


class Method:
    """One way of running the layer: ``forward()`` -> y, then y.backward(grad_y)."""

    name = ""
    nnz = 0

    def forward(self):
        raise NotImplementedError

    def params(self):
        return []

    def step(self, case, timings=None):
        t0 = time.perf_counter()
        y = self.forward()
        t1 = time.perf_counter()
        y.backward(case.grad_y)
        t2 = time.perf_counter()
        del y
        case.x.grad = None
        for p in self.params():
            p.grad = None
        if timings is not None:
            timings.append((t1 - t0, t2 - t1))


class Frozen(Method):
    name = BASE

    def __init__(self, case):
        self.case = case

    def forward(self):
        return F.linear(self.case.x, self.case.weight)


class FastPeft(Method):
    def __init__(self, case, backend):
        self.case, self.backend = case, backend
        self.name = f"fastpeft[{backend}]"
        self.nnz = case.index.numel()

    def forward(self):
        c = self.case
        return fastpeft.peft_linear(c.x, c.weight, sparse_index=c.index, sparse_value=c.values, backend=self.backend)

    def params(self):
        return [self.case.values]


class DenseGrad(Method):
    """The common plain-PyTorch way: scatter the values into a dense delta, add, linear."""

    name = DENSE

    def __init__(self, case):
        self.case = case
        self.nnz = case.index.numel()

    def forward(self):
        c = self.case
        delta = torch.zeros(c.n * c.k, dtype=c.values.dtype).scatter(0, c.index, c.values).view(c.n, c.k)
        return F.linear(c.x, c.weight + delta)

    def params(self):
        return [self.case.values]


class Shira(Method):
    name = SHIRA

    def __init__(self, case):
        from peft import ShiraConfig
        from peft.tuners.shira.layer import Linear as ShiraLinear

        self.case = case
        r = max(1, round(case.density * case.n * case.k / (case.n + case.k)))
        self.nnz = r * (case.n + case.k)
        index = select_sparse_indices(case.weight, None, "random", seed=1, block=case.block, count=self.nnz)
        if index.numel() != self.nnz:  # block masks only hit r (N + K) exactly when blocks tile it
            index = index[torch.randperm(index.numel(), generator=torch.Generator().manual_seed(0))[: self.nnz]]
        mask = torch.zeros(case.n * case.k)
        mask[index] = 1.0
        base = torch.nn.Linear(case.k, case.n, bias=False)
        with torch.no_grad():
            base.weight.copy_(case.weight)
        base.weight.requires_grad_(False)
        self.layer = ShiraLinear(base, mask.view(case.n, case.k), "default", ShiraConfig(r=r), r=r)
        with torch.no_grad():
            self.layer.shira_weight["default"].normal_(0.0, 1e-3)

    def forward(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's sparse-invariant notice
            return self.layer(self.case.x)

    def params(self):
        return [self.layer.shira_weight["default"]]


def shira_available() -> bool:
    try:
        import peft

        return hasattr(peft, "ShiraConfig")
    except ImportError:
        return False


def build(name, case):
    if name == BASE:
        return Frozen(case)
    if name == DENSE:
        return DenseGrad(case)
    if name == SHIRA:
        return Shira(case)
    if name.startswith("fastpeft["):
        return FastPeft(case, name[len("fastpeft["):-1])
    raise ValueError(f"unknown method {name!r}")


# ----------------------------------------------------------------------------- memory (child process)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def measure_memory_child(spec: dict) -> dict:
    case = Case(spec["n"], spec["k"], spec["m"], spec["density"], spec["block"])
    method = build(spec["method"], case)
    for _ in range(spec.get("warmup", 2)):  # warm-up: thread pools, lazy imports, kernel caches
        method.step(case)
    growths = []
    for _ in range(spec.get("measure", 3)):
        gc.collect()
        _reset_peak()
        before = _status_kib("VmRSS")
        method.step(case)
        growths.append((_status_kib("VmHWM") - before) / 1024.0)
    return {"growth_mib": max(growths), "all_mib": growths}


def measure_memory(spec: dict) -> float | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               MALLOC_TOP_PAD_="0", MALLOC_ARENA_MAX="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"memory child failed for {spec['method']}: {proc.stderr.strip()[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["growth_mib"]


# ----------------------------------------------------------------------------- timing


def measure_time(case, methods, repeats, slow_repeats=1, slow_factor=4.0):
    """Median fwd / bwd / fwd+bwd per method, rounds interleaved.

    A method whose warm-up step takes more than ``slow_factor`` times the base's (the reference
    backend's gather-based SDDMM at high density) runs only in the first ``slow_repeats`` rounds.
    """
    built = [build(name, case) for name in methods]
    warm = []
    for meth in built:
        t0 = time.perf_counter()
        meth.step(case)
        warm.append(time.perf_counter() - t0)
    rounds = {meth.name: repeats if w <= slow_factor * warm[0] else min(repeats, slow_repeats)
              for meth, w in zip(built, warm)}
    timings = {meth.name: [] for meth in built}
    for rnd in range(repeats):
        order = built[rnd % len(built):] + built[:rnd % len(built)]
        for meth in order:
            if rnd < rounds[meth.name]:
                meth.step(case, timings[meth.name])
    out = {}
    for meth in built:
        fwd = statistics.median(t[0] for t in timings[meth.name])
        bwd = statistics.median(t[1] for t in timings[meth.name])
        total = statistics.median(t[0] + t[1] for t in timings[meth.name])
        out[meth.name] = {"fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3, "total_ms": total * 1e3, "nnz": meth.nnz,
                          "rounds": rounds[meth.name]}
    return out


# ----------------------------------------------------------------------------- breakdown


def breakdown(case, repeats):
    """Where the cpp backend's sparse time goes: each sparse kernel alone vs the dense GEMMs."""
    ops = torch.ops.fastpeft_cpp
    x, w, gy, idx, val = case.x.detach(), case.weight, case.grad_y, case.index, case.values.detach()
    parts = {
        "gemm x W^T (fwd)": lambda: x @ w.t(),
        "gemm gy W (dX)": lambda: gy @ w,
        "sparse_matmul (fwd)": lambda: ops.sparse_matmul(x, idx, val, case.n),
        "sparse_matmul_t (dX)": lambda: ops.sparse_matmul_t(gy, idx, val, case.k),
        "sddmm (d values)": lambda: ops.sddmm(gy, x, idx),
    }
    for fn in parts.values():
        fn()
    samples = {name: [] for name in parts}
    for _ in range(repeats):
        for name, fn in parts.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) * 1e3 for name, v in samples.items()}


# ----------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--densities", default="0.001,0.01,0.05")
    ap.add_argument("--block", type=int, default=16, help="b of the b x b block masks (0: unstructured only)")
    ap.add_argument("--backends", default=None,
                    help="comma list of fastpeft backends (default: cpp if available, and reference)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per case (medians)")
    ap.add_argument("--slow-repeats", type=int, default=1,
                    help="rounds for a method whose warm-up step is > 4x the base's")
    ap.add_argument("--no-memory", action="store_true", help="skip the subprocess memory measurement")
    ap.add_argument("--no-shira", action="store_true")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the cpp backend's sparse kernels alone against the dense GEMMs")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure_memory_child(json.loads(args.child))))
        return 0

    available = fastpeft.available_backends()
    if args.backends:
        backends = [b for b in args.backends.split(",") if b]
        missing = [b for b in backends if b not in available]
        if missing:
            raise SystemExit(f"backend(s) {missing} not available here (available: {available})")
    else:
        backends = [b for b in ("cpp", "reference") if b in available]
    methods = [BASE] + [f"fastpeft[{b}]" for b in backends] + [DENSE]
    if not args.no_shira and shira_available():
        methods.append(SHIRA)
    densities = [float(d) for d in args.densities.split(",")]
    structures = [None] + ([args.block] if args.block else [])
    dense_grad_mib = args.n * args.k * 4 / MIB
    mem_limit = 0.1 * dense_grad_mib

    print(f"# sparse fine-tuning step, N={args.n} K={args.k} M={args.m} fp32 CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, backends {backends}")
    print(f"# memory target: extra <= {mem_limit:.1f} MiB (10% of the {dense_grad_mib:.0f} MiB dense grad); "
          f"time target: fwd+bwd <= 1.5x base at 1% density; timing medians of {args.repeats} interleaved rounds")
    rows, slow_notes = [], []
    header = (f"| {'density':>7} | {'mask':<8} | {'method':<20} | {'nnz':>8} | {'fwd ms':>8} | {'bwd ms':>8} | "
              f"{'fwd+bwd ms':>10} | {'x base':>6} | {'step peak MiB':>13} | {'extra MiB':>9} | {'targets':<11} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for block in structures:
        for density in densities:
            case = Case(args.n, args.k, args.m, density, block)
            times = measure_time(case, methods, args.repeats, args.slow_repeats)
            del case
            gc.collect()
            base_growth = None
            for name in methods:
                growth = None
                if not args.no_memory:
                    slow = times[name]["rounds"] < args.repeats
                    growth = measure_memory({"n": args.n, "k": args.k, "m": args.m, "density": density,
                                             "block": block, "method": name,
                                             "warmup": 1 if slow else 2, "measure": 1 if slow else 3})
                if name == BASE:
                    base_growth = growth
                t = times[name]
                ratio = t["total_ms"] / times[BASE]["total_ms"]
                extra = None if growth is None or base_growth is None else growth - base_growth
                verdict = ""
                if name != BASE:
                    mem_ok = None if extra is None else extra <= mem_limit
                    time_ok = ratio <= 1.5 if abs(density - 0.01) < 1e-12 else None
                    verdict = " ".join(f"{label}:{'ok' if ok else 'MISS'}" for label, ok
                                       in (("mem", mem_ok), ("time", time_ok)) if ok is not None)
                row = {"density": density, "mask": f"{block}x{block}" if block else "unstruct", "method": name,
                       "nnz": t["nnz"], "fwd_ms": t["fwd_ms"], "bwd_ms": t["bwd_ms"], "total_ms": t["total_ms"],
                       "ratio": ratio, "step_peak_mib": growth, "extra_mib": extra, "targets": verdict}
                rows.append(row)
                if t["rounds"] < args.repeats:
                    slow_notes.append(f"{density * 100:.1f}% {row['mask']} {name}: {t['rounds']} timed round(s)")
                fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
                print(f"| {density * 100:>6.1f}% | {row['mask']:<8} | {name:<20} | {t['nnz'] or '-':>8} | "
                      f"{t['fwd_ms']:>8.1f} | {t['bwd_ms']:>8.1f} | {t['total_ms']:>10.1f} | {ratio:>5.2f}x | "
                      f"{fmt(growth, '13.1f'):>13} | {fmt(extra, '9.1f') if name != BASE else '-':>9} | "
                      f"{verdict:<11} |", flush=True)
    for note in slow_notes:
        print(f"# slow method, fewer rounds: {note}")
    if args.breakdown and "cpp" in available:
        from fastpeft.core.backends import cpp as cpp_backend

        cpp_backend.build()
        print("\n# cpp sparse kernels alone (medians, ms; % of one dense GEMM x W^T)")
        names = None
        for block in structures:
            for density in densities:
                case = Case(args.n, args.k, args.m, density, block)
                parts = breakdown(case, args.repeats)
                if names is None:
                    names = list(parts)
                    print("| density | mask     | " + " | ".join(f"{n:>20}" for n in names) + " |")
                    print("|---------|----------|" + "|".join("-" * 22 for _ in names) + "|")
                gemm = parts[names[0]]
                cells = [f"{v:>9.1f} ({100 * v / gemm:>5.1f}%)" for v in parts.values()]
                mask = f"{block}x{block}" if block else "unstruct"
                print(f"| {density * 100:>6.1f}% | {mask:<8} | " + " | ".join(f"{c:>20}" for c in cells) + " |",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "k": args.k, "m": args.m, "backends": backends, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
