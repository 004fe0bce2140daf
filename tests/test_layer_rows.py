"""The "Other layers" bench rows (fastpeft.tools.layer_rows): every row produced, ratios where a
peft twin exists, and every layer (fastpeft's and peft's) within fp32 tolerance of float64."""
from __future__ import annotations

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from fastpeft.tools.layer_rows import format_layer_rows, run_layer_rows  # noqa: E402


def test_layer_rows_on_the_tiny_preset():
    rows = run_layer_rows("tiny", r=4, rounds=1)
    impls = [(row["layer"], row["impl"]) for row in rows]
    assert impls == [("GPT-2 Conv1D", "fastpeft Conv1D"), ("GPT-2 Conv1D", "peft Conv1D"),
                     ("GPT-2 Conv1D", "fastpeft nn.Linear"),
                     ("GPT-2 Conv1D + lora_bias", "fastpeft Conv1D + lora_bias"),
                     ("GPT-2 Conv1D + lora_bias", "peft Conv1D + lora_bias"),
                     ("Embedding", "fastpeft"), ("Embedding", "peft")]
    for row in rows:
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
        assert (row["ratio_vs_peft"] is None) == row["impl"].startswith("peft")
        assert row["max_rel_err"] < 1e-5, row
    text = format_layer_rows(rows)
    assert "Embedding: 500x64, 64 ids, r=4" in text and "fastpeft Conv1D + lora_bias" in text
