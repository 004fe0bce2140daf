"""The ``fastpeft`` command: ``fastpeft bench`` (the main job) and ``fastpeft check``."""
from __future__ import annotations

import argparse
import sys


def _check(args) -> int:
    from fastpeft.core.backends import available_backends
    from fastpeft.tools.selfcheck import run_check

    print(f"available backends: {', '.join(available_backends())}")
    ok = run_check(args.backends.split(",") if args.backends else None, device=args.device)
    if args.compile:
        from fastpeft.tools.aot import compile_all

        targets = [t.strip() for t in args.compile.split(",") if t.strip()]
        rows = compile_all(targets, coverage=getattr(args, "compile_coverage", "full"))
        print(f"\nTriton ahead-of-time compile for {', '.join(targets)}: {len(rows)} kernel variants")
        failed = [row for row in rows if not row["ok"]]
        for row in failed:
            print(f"FAIL {row['name']} [{row['target']}]: {row['error']}")
        print(f"{len(rows) - len(failed)} compiled, {len(failed)} failed")
        ok &= not failed
    print("check passed" if ok else "check FAILED")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastpeft", description="Fused PEFT kernels: benchmarks and self-checks.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time and profile every method on every backend across layer sizes",
                           description="Speed, memory and error of every PEFT method on every available backend.")
    from fastpeft.tools.benchmark import add_arguments

    add_arguments(bench)
    check = sub.add_parser("check", help="compare every available backend with the float64 reference",
                           description="Equivalence self-check of every available backend (forward and every "
                                       "gradient, every path combination, fp32 and bf16) against float64.")
    check.add_argument("--backends", help="comma-separated backends to check (default: all available)")
    check.add_argument("--device", help="device to run on (default: cuda if present, else cpu)")
    check.add_argument("--compile", metavar="TARGETS",
                       help="also compile every Triton kernel ahead of time for these targets, e.g. sm_80,sm_90 "
                            "(no GPU needed)")
    check.add_argument("--compile-coverage", choices=("full", "quick"), default="full",
                       help="full: every flag combination, dtype and autotune config (slow: hundreds of "
                            "kernels per target); quick: each kernel once per dtype with every path on")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from fastpeft.tools.benchmark import run

        return run(args)
    return _check(args)


if __name__ == "__main__":
    sys.exit(main())
