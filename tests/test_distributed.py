"""torch.distributed on CPU: DDP and FSDP2 (fully_shard) of an injected model, gloo, 2 processes.

The test launches this file as a script twice (ranks 0 and 1) on a free localhost port, with a
timeout so nothing hangs.  Each rank trains on its half of a fixed batch; the gradients (and, for
FSDP2, the parameters after one SGD step) must equal a single-process run on the whole batch.
"""
import argparse
import os
import socket
import subprocess
import sys
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


def worker(rank, port, backend, out):
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
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, backend, timeout=150):
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastpeft.__file__)))  # works uninstalled too
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--port", str(port), "--backend", backend,
                               "--out", str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-4000:]}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def assert_close(a, b, what):
    err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
    assert err < 1e-5, f"{what}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    # The collectives, sharding and Parameter handling under test do not depend on the kernel:
    # the reference backend keeps the workers free of any extension build (FASTPEFT_BACKEND overrides).
    backend = fastpeft.get_backend() or "reference"
    return backend, launch(tmp_path_factory.mktemp("dist"), backend)


def test_ddp_gradients_equal_single_process(results):
    backend, ranks = results
    grads, _ = single_process(backend)
    assert sorted(grads) == ["down.ia3_out", "down.sparse_value", "up.bias", "up.lora_A", "up.lora_B"]
    for rank, res in enumerate(ranks):
        assert res["ddp_grads"].keys() == grads.keys()
        for name, g in grads.items():
            assert_close(res["ddp_grads"][name], g, f"DDP rank {rank} grad of {name}")


def test_fsdp2_shards_and_matches_single_process(results):
    backend, ranks = results
    grads, stepped = single_process(backend)
    for rank, res in enumerate(ranks):
        # every parameter, frozen or not, is sharded as a DTensor: the layers hold plain Parameters
        assert set(res["fsdp_sharded"].values()) == {"DTensor"}, res["fsdp_sharded"]
        assert res["fsdp_grads"].keys() == grads.keys()
        for name, g in grads.items():
            assert_close(res["fsdp_grads"][name], g, f"FSDP2 rank {rank} grad of {name}")
            assert_close(res["fsdp_params"][name], stepped[name], f"FSDP2 rank {rank} {name} after a step")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    worker(args.rank, args.port, args.backend, args.out)
