"""torch.distributed on CPU: DDP and FSDP2 (fully_shard) of an injected model, gloo, 2 processes.

The test launches this file as a script twice (ranks 0 and 1) on a free localhost port, with a
timeout so nothing hangs.  Each rank trains on its half of a fixed batch; the gradients (and, for
FSDP2, the parameters after one SGD step) must equal a single-process run on the whole batch.

Teardown: gloo workers sometimes abort after the work is done ("terminate called without an
active exception", SIGABRT, in about 1 run of 10, plain torch layers alike: torch's, not ours).
So each worker writes all its results to a file (atomically: a temporary file renamed into place,
with a completeness marker) *before* tearing down.  ``check_worker`` accepts a rank that exited
with SIGABRT only when its complete result file exists; the tests then verify every result, and
only then report the abort, as a ``TeardownAbort`` warning.  Any other failure fails: a non-zero
exit other than SIGABRT, an abort before the results were complete, a missing or incomplete
result, a wrong result, a timeout.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import warnings
from datetime import timedelta

import pytest
import torch
import torch.nn as nn

import fastpeft

WORLD = 2
BATCH, K, HIDDEN, N = 8, 24, 40, 17
LR = 0.1


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(K, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.down = nn.Linear(HIDDEN, N)

    def forward(self, x):
        return self.down(torch.relu(self.norm(self.up(x))))


def make_model(backend):
    """LoRA + BitFit on "up", IA3 + a sparse delta on "down"; adapters moved off their init."""
    torch.manual_seed(0)
    model = Net()
    fastpeft.inject(model, fastpeft.LoRAConfig(r=4, alpha=8, target_modules=["up"], bias="lora_only",
                                               backend=backend))
    fastpeft.inject(model, fastpeft.IA3Config(target_modules=["down"], backend=backend))
    fastpeft.inject(model, fastpeft.SparseConfig(density=0.1, selection="random", target_modules=["down"],
                                                 backend=backend))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, K, generator=g), torch.randn(BATCH, 3, N, generator=g)


def loss_of(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def single_process(backend):
    """Gradients on the whole batch, and the parameters after one SGD step."""
    model = make_model(backend)
    x, y = data()
    loss_of(model, x, y).backward()
    grads = {n: p.grad.clone() for n, p in trainable(model).items()}
    torch.optim.SGD(list(trainable(model).values()), lr=LR).step()
    return grads, {n: p.detach().clone() for n, p in trainable(model).items()}


SECTIONS = ("ddp_grads", "fsdp_sharded", "fsdp_grads", "fsdp_params")
RESULTS_WRITTEN = "fastpeft-dist: results written"
TORN_DOWN = "fastpeft-dist: process group destroyed"


class TeardownAbort(UserWarning):
    """A worker aborted after writing complete results (torch/gloo teardown); the results were checked."""


class WorkerFailed(AssertionError):
    """A worker failed in a way that is not a teardown abort after complete results."""


def result_path(out, rank):
    return os.path.join(out, f"rank{rank}.pt")


def write_result(out, rank, result):
    """All of a rank's results, marked complete, renamed into place in one step (never half a file)."""
    path = result_path(out, rank)
    tmp = path + ".tmp"
    torch.save(dict(result, complete=True), tmp)
    os.replace(tmp, path)


def read_result(out, rank):
    """The rank's results; WorkerFailed if there is no complete result file."""
    path = result_path(out, rank)
    if not os.path.isfile(path):
        raise WorkerFailed(f"rank {rank} wrote no complete results ({path} missing)")
    try:
        result = torch.load(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is an incomplete result
        raise WorkerFailed(f"rank {rank}: result file unreadable: {exc}") from exc
    missing = [k for k in SECTIONS if not isinstance(result.get(k), dict) or not result[k]]
    if result.get("complete") is not True or missing:
        raise WorkerFailed(f"rank {rank}: incomplete results (missing {missing or 'the completeness marker'})")
    return result


def _is_abort(returncode):
    return returncode in (-signal.SIGABRT, 128 + signal.SIGABRT)


def check_worker(rank, returncode, log, out):
    """(results, note) of one finished worker.

    note is None for a clean exit; for SIGABRT after complete results it says where the worker
    died (the caller reports it once the results are verified).  Anything else raises WorkerFailed.
    """
    if returncode == 0:
        return read_result(out, rank), None
    tail = log[-4000:]
    if not _is_abort(returncode):
        raise WorkerFailed(f"rank {rank} failed (exit status {returncode}):\n{tail}")
    try:
        result = read_result(out, rank)
    except WorkerFailed as exc:
        raise WorkerFailed(f"rank {rank} aborted (SIGABRT) before its results were complete: {exc}\n{tail}") from None
    where = "at interpreter exit" if TORN_DOWN in log else "in barrier/destroy_process_group"
    last = next((line for line in reversed(log.splitlines()) if line.strip()), "")
    return result, (f"rank {rank} aborted (SIGABRT) {where}, after writing complete results; "
                    f"its results were verified. Last output line: {last!r}")


def worker(rank, port, backend, out, abort_at_exit=False):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    x, y = data()
    per = BATCH // WORLD
    x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    result = {}

    ddp = DistributedDataParallel(make_model(backend))
    loss_of(ddp, x, y).backward()
    result["ddp_grads"] = {n.removeprefix("module."): p.grad.clone() for n, p in ddp.named_parameters()
                           if p.requires_grad}

    model = make_model(backend)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in (model.up, model.down):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    result["fsdp_sharded"] = {n: type(p).__name__ for n, p in model.named_parameters()}
    loss_of(model, x, y).backward()
    result["fsdp_grads"] = {n: full(p.grad).clone() for n, p in params.items()}
    torch.optim.SGD(list(params.values()), lr=LR).step()
    result["fsdp_params"] = {n: full(p.detach()).clone() for n, p in params.items()}
    write_result(out, rank, result)
    print(RESULTS_WRITTEN, flush=True)
    dist.barrier()
    dist.destroy_process_group()
    print(TORN_DOWN, flush=True)
    if abort_at_exit:  # the tests' stand-in for torch's teardown abort
        os.abort()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, backend, timeout=150, abort_rank=None):
    """Run the two workers; ([results of each rank], [teardown-abort notes]).  See check_worker."""
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastpeft.__file__)))  # works uninstalled too
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--port", str(port), "--backend", backend,
                               "--out", str(tmp_path)] + (["--abort-at-exit"] if r == abort_rank else []),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0].decode(errors="replace"))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = [p.communicate()[0].decode(errors="replace")[-2000:] for p in procs]
        pytest.fail(f"distributed workers did not finish within {timeout} s; output:\n" + "\n---\n".join(tails))
    checked = [check_worker(r, p.returncode, logs[r], str(tmp_path)) for r, p in enumerate(procs)]
    return [res for res, _ in checked], [note for _, note in checked if note is not None]


def report_teardown_aborts(notes):
    """Called by a test after it verified every result."""
    for note in notes:
        warnings.warn(TeardownAbort(note), stacklevel=2)


def assert_close(a, b, what):
    err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
    assert err < 1e-5, f"{what}: relative error {err:.2e}"


def _dist_backend():
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    # The collectives, sharding and Parameter handling under test do not depend on the kernel:
    # the reference backend keeps the workers free of any extension build (FASTPEFT_BACKEND overrides).
    return fastpeft.get_backend() or "reference"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    backend = _dist_backend()
    return (backend, *launch(tmp_path_factory.mktemp("dist"), backend))


def check_ddp(backend, ranks):
    grads, _ = single_process(backend)
    assert sorted(grads) == ["down.ia3_out", "down.sparse_value", "up.bias", "up.lora_A", "up.lora_B"]
    for rank, res in enumerate(ranks):
        assert res["ddp_grads"].keys() == grads.keys()
        for name, g in grads.items():
            assert_close(res["ddp_grads"][name], g, f"DDP rank {rank} grad of {name}")


def check_fsdp2(backend, ranks):
    grads, stepped = single_process(backend)
    for rank, res in enumerate(ranks):
        # every parameter, frozen or not, is sharded as a DTensor: the layers hold plain Parameters
        assert set(res["fsdp_sharded"].values()) == {"DTensor"}, res["fsdp_sharded"]
        assert res["fsdp_grads"].keys() == grads.keys()
        for name, g in grads.items():
            assert_close(res["fsdp_grads"][name], g, f"FSDP2 rank {rank} grad of {name}")
            assert_close(res["fsdp_params"][name], stepped[name], f"FSDP2 rank {rank} {name} after a step")


def test_ddp_gradients_equal_single_process(results):
    backend, ranks, notes = results
    check_ddp(backend, ranks)
    report_teardown_aborts(notes)


def test_fsdp2_shards_and_matches_single_process(results):
    backend, ranks, notes = results
    check_fsdp2(backend, ranks)
    report_teardown_aborts(notes)


def test_teardown_abort_after_complete_results_is_reported_not_failed(tmp_path):
    """End to end: rank 1 aborts (SIGABRT) after tearing down; its results are still checked, and
    the abort comes back as a note (a TeardownAbort warning), not as a failure."""
    backend = _dist_backend()
    ranks, notes = launch(tmp_path, backend, abort_rank=1)
    check_ddp(backend, ranks)
    check_fsdp2(backend, ranks)
    assert len(notes) == 1 and notes[0].startswith("rank 1 aborted (SIGABRT) at interpreter exit")
    with pytest.warns(TeardownAbort, match="rank 1 aborted"):
        report_teardown_aborts(notes)


# ----------------------------------------------------------------------------- the result checker
def _complete(tmp_path, rank=0):
    write_result(str(tmp_path), rank, {k: {"x": torch.ones(2)} for k in SECTIONS})


def test_check_worker_accepts_only_aborts_after_complete_results(tmp_path):
    out = str(tmp_path)
    _complete(tmp_path)
    result, note = check_worker(0, 0, "fine\n", out)
    assert note is None and result["complete"] is True and set(SECTIONS) <= set(result)
    for code in (-signal.SIGABRT, 128 + signal.SIGABRT):  # killed by the signal / through a shell
        result, note = check_worker(0, code, f"{RESULTS_WRITTEN}\nterminate called without an active exception\n", out)
        assert result["ddp_grads"]["x"].tolist() == [1.0, 1.0]
        assert "rank 0 aborted (SIGABRT) in barrier/destroy_process_group" in note
        assert "terminate called without an active exception" in note
    _, note = check_worker(0, -signal.SIGABRT, f"{RESULTS_WRITTEN}\n{TORN_DOWN}\n", out)
    assert "at interpreter exit" in note
    # any other exit fails even with complete results: only torch's teardown abort is tolerated
    for code in (1, -signal.SIGSEGV, -signal.SIGKILL):
        with pytest.raises(WorkerFailed, match=f"rank 0 failed \\(exit status {code}\\)"):
            check_worker(0, code, "Traceback ...\n", out)


def test_check_worker_fails_aborts_before_complete_results(tmp_path):
    out = str(tmp_path)
    with pytest.raises(WorkerFailed, match="before its results were complete.*missing"):
        check_worker(1, -signal.SIGABRT, "", out)  # no file at all
    with pytest.raises(WorkerFailed, match="wrote no complete results"):
        check_worker(1, 0, "", out)  # a clean exit must still leave its results
    torch.save({"ddp_grads": {"x": torch.ones(1)}}, result_path(out, 1) + ".tmp")  # died while writing
    with pytest.raises(WorkerFailed, match="before its results were complete"):
        check_worker(1, -signal.SIGABRT, "", out)
    torch.save({k: {"x": torch.ones(1)} for k in SECTIONS[:2]}, result_path(out, 1))  # no marker, sections missing
    with pytest.raises(WorkerFailed, match="incomplete results.*fsdp_grads"):
        check_worker(1, -signal.SIGABRT, "", out)
    torch.save({**{k: {"x": torch.ones(1)} for k in SECTIONS}, "complete": False}, result_path(out, 1))
    with pytest.raises(WorkerFailed, match="completeness marker"):
        check_worker(1, -signal.SIGABRT, "", out)
    with open(result_path(out, 1), "wb") as f:
        f.write(b"truncated")
    with pytest.raises(WorkerFailed, match="unreadable"):
        check_worker(1, -signal.SIGABRT, "", out)


def test_wrong_results_after_an_abort_still_fail(tmp_path):
    """The abort is only excused once the results are verified: wrong gradients still fail."""
    backend = _dist_backend()
    grads, _ = single_process(backend)
    wrong = {k: {"x": torch.ones(1)} for k in SECTIONS}
    wrong["ddp_grads"] = {n: g + 1.0 for n, g in grads.items()}
    write_result(str(tmp_path), 0, wrong)
    result, note = check_worker(0, -signal.SIGABRT, RESULTS_WRITTEN, str(tmp_path))
    assert note is not None
    with pytest.raises(AssertionError, match="DDP rank 0 grad of"):
        check_ddp(backend, [result])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--abort-at-exit", action="store_true")
    args = parser.parse_args()
    worker(args.rank, args.port, args.backend, args.out, args.abort_at_exit)
