"""Ahead-of-time compilation of every Triton kernel variant, on a machine with no GPU.

``compile_all(["sm_80", "sm_90"])`` runs ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
cc, 32))`` on each kernel variant the Triton backend can launch, for each target, and returns one
row per (variant, target).  It catches what the interpreter lets through: type errors in
compiled code, layouts the backend cannot lower, and configs that need more shared memory than
the target has.

Variants, for x in {fp32, bf16, fp16} with adapters of x's dtype and in fp32 (fp32 x: dot in
IEEE fp32 and in tf32):
* every constexpr flag combination of every kernel, with the first block config of its autotune
  list;
* every autotune config with the heaviest flag combination (the most registers and shared memory).

The compilation runs in worker processes without ``TRITON_INTERPRET`` (the kernels must be real
``JITFunction`` objects), ``jobs`` at a time.  ``python -m fastpeft.tools.aot sm_80,sm_90`` prints the rows.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback

# (x dtype, adapter dtype, fp32 dot precision): the dtype pairings compiled for each target.
DTYPE_PAIRS = (
    ("fp32", "fp32", "tf32x3"),
    ("fp32", "fp32", "tf32"),
    ("bf16", "bf16", "ieee"),
    ("bf16", "fp32", "ieee"),
    ("fp16", "fp16", "ieee"),
    ("fp16", "fp32", "ieee"),
)

# "quick": each kernel's heaviest flag combination for fp32 and for 16-bit x with fp32 adapters
# (the conversions fp16 shares with bf16), what the test suite compiles in its time budget.
QUICK_DTYPE_PAIRS = (
    ("fp32", "fp32", "tf32x3"),
    ("bf16", "fp32", "ieee"),
)
COVERAGES = ("full", "quick")
_VARIANTS: dict = {}


def parse_target(target: str) -> int:
    """"sm_80" / "sm90" / "80" -> 80; anything else is a ValueError naming the bad target."""
    match = re.fullmatch(r"(?:sm_?)?(\d{2,3})a?", target.strip().lower())
    if not match:
        raise ValueError(f"compile target must look like 'sm_80' or 'sm_90', got {target!r}")
    cc = int(match.group(1))
    if cc < 80:
        raise ValueError(f"compile target {target!r}: the kernels need sm_80 or newer (bf16 tensor cores)")
    return cc


def variants(coverage: str = "full"):
    """Every Variant to compile for one target, in a fixed order (see ``compile_all``)."""
    if coverage not in COVERAGES:
        raise ValueError(f"coverage must be one of {', '.join(COVERAGES)}, got {coverage!r}")
    if coverage not in _VARIANTS:
        from fastpeft.kernels import dropout, fused_linear, sparse

        full = coverage == "full"
        out = list(dropout.aot_variants(None))
        for x, ad, precision in (DTYPE_PAIRS if full else QUICK_DTYPE_PAIRS):
            tag = f"x={x},adapters={ad}" + (f",dot={precision}" if x == "fp32" else "")
            found = list(fused_linear.aot_variants(x, ad, precision, full))
            if precision != "tf32":  # the sddmm has no dot: one fp32 precision suffices
                found += list(sparse.aot_variants(x, ad, full))
            for v in found:
                v.name = f"{v.name}<{tag}>"
            out += found
        _VARIANTS[coverage] = out
    return _VARIANTS[coverage]


def _compile_one(index: int, cc: int, coverage: str = "full") -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastpeft.kernels import config as _config

    v = variants(coverage)[index]
    start = time.perf_counter()
    row = {"name": v.name, "target": f"sm_{cc}", "ok": True, "error": None}
    try:
        src = ASTSource(v.fn, v.signature, v.constexprs)
        kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                options={"num_warps": v.num_warps, "num_stages": v.num_stages})
        shared = int(kernel.metadata.shared)
        limit = _config.SHARED_LIMIT.get(cc)
        if limit is not None and shared > limit:
            row["ok"] = False
            row["error"] = f"needs {shared} bytes of shared memory; sm_{cc} allows {limit}"
    except Exception as exc:  # every failure becomes a row: the caller reports them all
        row["ok"] = False
        row["error"] = f"{type(exc).__name__}: {exc}".strip()
        if not str(exc):
            row["error"] += "\n" + traceback.format_exc(limit=3)
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def compile_all(targets: list[str], jobs: int | None = None, coverage: str = "full") -> list[dict]:
    """Compile every kernel variant for each target ("sm_80", "sm_90", ...).

    ``coverage="full"`` (default) compiles every flag combination for every dtype pairing and
    every autotune config (several hundred kernels per target: tens of minutes on two cores);
    ``"quick"`` compiles each kernel once per x dtype with all its code paths switched on.

    Returns rows ``{"name", "target", "ok", "error", "seconds"}``, one per (variant, target), in a
    fixed order.  Never raises for a kernel that fails to compile (that is a row with ok=False);
    raises ValueError for a malformed target and reports a missing triton as a failed row.
    """
    ccs = [parse_target(t) for t in targets]
    if coverage not in COVERAGES:
        raise ValueError(f"coverage must be one of {', '.join(COVERAGES)}, got {coverage!r}")
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return [{"name": "triton", "target": f"sm_{cc}", "ok": False, "error": f"triton is not installed: {exc}",
                 "seconds": 0.0} for cc in ccs]
    jobs = max(1, jobs or os.cpu_count() or 1)
    # Workers are fresh interpreters without TRITON_INTERPRET, so the kernels are JITFunctions
    # (plain subprocesses: no multiprocessing bootstrapping demands on the caller's __main__).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_package_root(), env.get("PYTHONPATH")]))
    tasks = [(i, cc) for cc in ccs for i in range(_count_variants(env, coverage))]
    procs = []
    for w in range(min(jobs, len(tasks))):
        mine = tasks[w::jobs]
        cmd = [sys.executable, "-m", "fastpeft.tools.aot", "--coverage", coverage, "--worker",
               ",".join(f"{i}:{cc}" for i, cc in mine)]
        procs.append((mine, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True)))
    rows = {}
    for mine, proc in procs:
        out, err = proc.communicate()
        for line in out.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                rows[(row["index"], row["cc"])] = row
        for i, cc in mine:  # a worker that died leaves its remaining variants as failures
            rows.setdefault((i, cc), {"name": f"variant #{i}", "target": f"sm_{cc}", "ok": False,
                                      "error": f"compile worker exited with status {proc.returncode}: "
                                               f"{err.strip()[-2000:]}", "seconds": 0.0})
    return [{k: rows[t][k] for k in ("name", "target", "ok", "error", "seconds")} for t in tasks]


def _package_root() -> str:
    """The folder that holds the ``fastpeft`` package (fastpeft/tools/aot.py is three levels down)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _count_variants(env, coverage: str) -> int:
    cmd = [sys.executable, "-m", "fastpeft.tools.aot", "--coverage", coverage, "--count"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"listing the Triton kernel variants failed:\n{done.stderr.strip()[-4000:]}")
    return int(done.stdout.strip().splitlines()[-1])


def _main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastpeft.tools.aot",
                                     description="Compile every Triton kernel variant ahead of time.")
    parser.add_argument("targets", nargs="?", default="sm_80,sm_90", help="comma-separated, e.g. sm_80,sm_90")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: all cores)")
    parser.add_argument("--coverage", choices=COVERAGES, default="full",
                        help="full: every variant (default); quick: each kernel once per dtype")
    parser.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.count:
        print(len(variants(args.coverage)))
        return 0
    if args.worker is not None:
        for item in filter(None, args.worker.split(",")):
            i, cc = (int(v) for v in item.split(":"))
            row = _compile_one(i, cc, args.coverage)
            print(json.dumps({**row, "index": i, "cc": cc}), flush=True)
        return 0
    rows = compile_all(args.targets.split(","), args.jobs, args.coverage)
    for row in rows:
        status = "ok  " if row["ok"] else "FAIL"
        print(f"{status} {row['target']} {row['seconds']:7.2f}s {row['name']}")
        if not row["ok"]:
            print("     " + row["error"].replace("\n", "\n     "))
    failed = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - failed}/{len(rows)} kernel variants compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main())
