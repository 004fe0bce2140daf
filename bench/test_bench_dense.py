"""Dense fused linear, one benchmark per method x backend x shape x pass (forward, forward+backward).

Backends: every fastpeft backend that runs natively on the device, "torch" (the frozen
nn.Linear baseline, and BitFit on a plain nn.Linear) and "peft" (its LoRA and IA3 layers).
Cases a backend does not have are skipped.
"""
import pytest

DENSE_METHODS = ["base", "lora", "lora_dropout", "ia3_in", "ia3_out", "bitfit", "combined"]


@pytest.mark.parametrize("which", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("method", DENSE_METHODS)
def test_dense(benchmark, make_case, run_pass, bench_settings, shape, backend, method, which):
    case = make_case(method, backend, shape)
    run_pass(benchmark, case, which, f"dense {shape}", bench_settings)


@pytest.mark.parametrize("rank", [8, 64])
def test_lora_rank(benchmark, make_case, run_pass, bench_settings, shape, backend, rank):
    """LoRA forward+backward at other ranks (the default cases use r=16)."""
    case = make_case("lora", backend, shape, r=rank)
    run_pass(benchmark, case, "fwd_bwd", f"lora-rank {shape}", bench_settings, r=rank)
