"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90, with no GPU.

The interpreter runs the kernels' Python; this compiles them through Triton's real pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin) for both targets, which catches what the interpreter
lets through: typing and lowering errors, and configs that overflow shared memory.  The suite
compiles each kernel once per x dtype with every code path switched on (coverage "quick");
``python -m fastpeft.tools.aot sm_80,sm_90`` compiles every flag combination, dtype and config.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from fastpeft.tools import aot  # noqa: E402


def test_compile_all_quick_sm80_sm90():
    rows = aot.compile_all(["sm_80", "sm_90"], coverage="quick")
    failures = [f"{r['target']} {r['name']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failures, "\n".join(failures)
    per_target = {t: sorted(r["name"] for r in rows if r["target"] == t) for t in ("sm_80", "sm_90")}
    assert per_target["sm_80"] == per_target["sm_90"] and len(per_target["sm_80"]) >= 10
    assert all(set(r) == {"name", "target", "ok", "error", "seconds"} for r in rows)
    # every kernel family is in the quick set
    for family in ("fused_matmul[", "fused_matmul_rank", "matmul_tn", "bias_scale_grad", "sddmm", "keep_mask"):
        assert any(name.startswith(family) for name in per_target["sm_90"]), family


def test_full_coverage_lists_every_flag_combination():
    names = [v.name for v in aot.variants("full")]
    assert len(names) == len(set(names))
    gemm = {n.split(",DOT_PRECISION")[0] for n in names if n.startswith("fused_matmul[")}
    # PRO_SCALE x SPARSE x COL_REDUCE x {no LoRA, LoRA, LoRA + dropout}
    assert len(gemm) == 24
    pairs = {n.split("<")[1] for n in names if "<" in n}
    assert len(pairs) == len(aot.DTYPE_PAIRS)
    assert len(aot.variants("quick")) < len(names)


HASH_IR = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastpeft.tools.aot import variants
v = [v for v in variants("quick") if v.name == "keep_mask"][0]
k = triton.compile(ASTSource(v.fn, v.signature, v.constexprs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": v.num_warps, "num_stages": v.num_stages})
print(k.asm["ttir"])
"""


def test_mask_hash_compiles_to_wrapping_uint32_ops():
    # Compiled semantics of the hash: 32-bit multiplies (wrap modulo 2**32) and logical shifts,
    # never a signed shift or a widening of the word, so GPU bits match fastpeft.mask.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", HASH_IR], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ttir = done.stdout
    muls = [line for line in ttir.splitlines() if "arith.muli" in line and "tensor<1024x" in line]
    assert len(muls) >= 5 and all("xi32>" in line for line in muls), muls
    assert "arith.shrui" in ttir and "arith.shrsi" not in ttir
    assert "arith.cmpi uge" in ttir  # the threshold compare is unsigned


@pytest.mark.parametrize("bad", ["sm80x", "gfx90a", "sm_70", ""])
def test_bad_target_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="target"):
        aot.compile_all([bad])


def test_bad_coverage_is_a_clear_error():
    with pytest.raises(ValueError, match="coverage"):
        aot.compile_all(["sm_90"], coverage="most")
