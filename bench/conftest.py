"""pytest-benchmark suites of the kernel families (not part of the test run: tests live in tests/).

Run:   pytest bench/ --benchmark-only                     (the "small" preset: M=64, every shape)
       pytest bench/ --benchmark-only --fastpeft-size medium --benchmark-autosave
       pytest bench/ --benchmark-only --benchmark-compare  (against the last saved run)

Every benchmark sets ``benchmark.group`` to its shape, tokens, dtype and pass, so a group lists
the frozen nn.Linear, each method on each backend and peft side by side, and
``--benchmark-compare`` lines the same test ids up between commits.  ``extra_info`` carries the
shape and the saved-for-backward MiB of the case.

Options: --fastpeft-size tiny|small|medium|large (the presets of ``fastpeft bench``),
--fastpeft-shapes a,b (shape keys), --fastpeft-device cpu|cuda, --fastpeft-dtype float32|bfloat16|float16.
The same can be given as environment variables FASTPEFT_BENCH_SIZE / _SHAPES / _DEVICE / _DTYPE.
"""
import os

import pytest
import torch

from fastpeft.tools import benchmark as fb

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pytest_addoption(parser):
    group = parser.getgroup("fastpeft", "fastpeft benchmark sizes")
    group.addoption("--fastpeft-size", default=os.environ.get("FASTPEFT_BENCH_SIZE", "small"),
                    choices=sorted(fb.PRESETS), help="preset of shapes and tokens (default small)")
    group.addoption("--fastpeft-shapes", default=os.environ.get("FASTPEFT_BENCH_SHAPES"),
                    help=f"comma-separated shape keys instead of the preset's: {', '.join(fb.SHAPES)}")
    group.addoption("--fastpeft-device", default=os.environ.get("FASTPEFT_BENCH_DEVICE"),
                    help="cpu or cuda (default cuda when available)")
    group.addoption("--fastpeft-dtype", default=os.environ.get("FASTPEFT_BENCH_DTYPE"), choices=sorted(_DTYPES),
                    help="default float32 on CPU, bfloat16 on CUDA")


def _settings(config):
    preset = fb.PRESETS[config.getoption("--fastpeft-size")]
    shapes = config.getoption("--fastpeft-shapes")
    shapes = [s.strip() for s in shapes.split(",")] if shapes else list(preset.shapes)
    unknown = [s for s in shapes if s not in fb.SHAPES]
    if unknown:
        raise pytest.UsageError(f"unknown shape(s) {unknown}; choose from {list(fb.SHAPES)}")
    dev = config.getoption("--fastpeft-device")
    device = torch.device(dev) if dev else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = config.getoption("--fastpeft-dtype")
    dtype = _DTYPES[dt] if dt else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return dict(tokens=preset.tokens, shapes=shapes, device=device, dtype=dtype)


def pytest_generate_tests(metafunc):
    """Parametrize ``shape`` and ``backend`` from the options: ids stay stable across commits."""
    settings = _settings(metafunc.config)
    if "shape" in metafunc.fixturenames:
        metafunc.parametrize("shape", settings["shapes"])
    if "backend" in metafunc.fixturenames:
        backends = fb.default_backends(settings["device"]) + [fb.TORCH, fb.PEFT]
        metafunc.parametrize("backend", backends)


@pytest.fixture(scope="session")
def bench_settings(request):
    return _settings(request.config)


@pytest.fixture
def make_case(bench_settings):
    """Build a layer case of the bench (``fastpeft.tools.benchmark.make_case``) at the session's size;
    skips when the backend has no such layer (e.g. peft has no BitFit layer)."""

    def build(method, backend, shape, **kw):
        s = fb.SHAPES[shape]
        case = fb.make_case(method, backend, s.k, s.n, tokens=bench_settings["tokens"], dtype=bench_settings["dtype"],
                            device=bench_settings["device"], **kw)
        if case is None:
            pytest.skip(f"{backend} has no layer for {method}")
        return case

    return build


@pytest.fixture
def run_pass():
    """``run_pass(benchmark, case, which, group_prefix, settings, **extra_info)``: benchmark
    ``case.fwd`` or ``case.fwd_bwd`` in a group named after the shape and pass."""
    return _run_pass


def _run_pass(benchmark, case, which, group_prefix, settings, **extra):
    from fastpeft.tools.profiling import profile_memory

    dtype = str(settings["dtype"]).replace("torch.", "")
    benchmark.group = f"{group_prefix} M={settings['tokens']} {dtype} {which}"
    fn = case.fwd if which == "fwd" else case.fwd_bwd
    fn()  # warm-up outside the timed rounds (first calls build / dispatch lazily)
    mem = profile_memory(case.module, case.x)
    case.x.grad = None
    benchmark.extra_info.update(method=case.method, backend=case.backend, M=settings["tokens"],
                                K=case.x.shape[1], N=case.gy.shape[1], saved_mib=mem["saved_bytes"] / 2**20,
                                device=str(settings["device"]), dtype=dtype, **extra)
    if settings["device"].type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()

        benchmark(timed)
    else:
        benchmark(fn)
