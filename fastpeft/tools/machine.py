"""The machine a benchmark runs on: CPU model, cores, torch threads, GPU, load and versions.

Shared by every bench (``fastpeft bench``'s layer and model benches, bench/ scripts) so their
reports state the machine the same way.
"""
from __future__ import annotations

import os
import platform
from typing import Optional

import torch

__all__ = ["default_device", "load_average", "machine_info", "versions"]


def default_device() -> torch.device:
    """cuda when torch sees a GPU, else cpu."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Optional[float]:
    """The 1-minute load average (other work competing for the cores), where the OS reports it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine_info(device: Optional[torch.device] = None) -> dict:
    """The machine the numbers come from: CPU model, cores, torch threads, GPU if used."""
    device = torch.device(device) if device is not None else default_device()
    info = dict(cpu=_cpu_model(), cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                platform=platform.platform(), device=str(device), load_average=load_average())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}")
    return info


def versions() -> dict:
    out = dict(python=platform.python_version(), torch=torch.__version__)
    for name in ("fastpeft", "peft", "transformers", "triton", "numpy"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "unknown")
        except Exception:  # an optional package that is absent or broken
            out[name] = None
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out
