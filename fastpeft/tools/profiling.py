"""Memory profiling of a training step: what autograd saves for backward, and the peak.

``profile_memory(fn_or_module, *inputs)`` runs one forward (and, unless told otherwise, the
backward of the sum of the outputs) and reports:

- ``saved_bytes``: bytes autograd keeps alive between forward and backward, recorded with
  ``torch.autograd.graph.saved_tensors_hooks``.  Parameters and buffers are excluded (they live
  anyway); every storage is counted once, by its full size, however many saved tensors view it.
- ``saved_bytes_by_layer``: the same bytes attributed to the innermost module that was running
  when the tensor was saved (forward pre/post hooks keep a stack of running modules).
- ``peak_bytes``: the peak of memory allocated during the step above what was allocated before
  it.  CUDA: the caching allocator's ``max_memory_allocated``.  CPU: the torch profiler's
  allocator events (``profile_memory=True``), whose running sum is exact for tensors; if the
  profiler is unusable, the growth of the process's resident set, sampled (coarser).

The result is a dict (a ``MemoryProfile``) that prints as a table.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["profile_memory", "MemoryProfile"]

_MIB = float(1 << 20)


class MemoryProfile(dict):
    """Result of ``profile_memory``: a dict with a readable ``str()`` (see ``format``).

    Keys: ``saved_bytes`` (int), ``saved_bytes_by_layer`` (dict name -> int, in the order the
    layers first saved something), ``saved_tensors`` (number of saved tensors, views included),
    ``peak_bytes`` (int), ``peak_source`` ("cuda allocator", "profiler allocator events" or
    "resident set growth"), ``device`` (str), ``backward`` (bool).
    """

    @property
    def saved_mib(self) -> float:
        return self["saved_bytes"] / _MIB

    @property
    def peak_mib(self) -> float:
        return self["peak_bytes"] / _MIB

    def format(self) -> str:
        """The profile as a table: saved bytes per layer, then totals and the peak."""
        rows = [(name or "(top level)", nbytes) for name, nbytes in self["saved_bytes_by_layer"].items()]
        width = max([len("total saved")] + [len(name) for name, _ in rows])
        lines = [f"{'layer':<{width}}  {'saved for backward':>18}"]
        lines.append("-" * (width + 20))
        for name, nbytes in rows:
            lines.append(f"{name:<{width}}  {_fmt_bytes(nbytes):>18}")
        lines.append("-" * (width + 20))
        lines.append(f"{'total saved':<{width}}  {_fmt_bytes(self['saved_bytes']):>18}")
        step = "forward+backward" if self.get("backward", True) else "forward"
        lines.append(f"peak during {step} on {self['device']}: {_fmt_bytes(self['peak_bytes'])} "
                     f"({self['peak_source']})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _fmt_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1 << 20:
        return f"{n / 1024:.1f} KiB"
    return f"{n / _MIB:.2f} MiB"


def _tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside a (nested) output: tensors, tuples/lists, dicts, ModelOutput-likes."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors_in(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors_in(v)]
    return []


def _storage_key(t: torch.Tensor):
    """(identity of the memory a tensor keeps alive, its size in bytes)."""
    if t.layout == torch.strided:
        storage = t.untyped_storage()
        return (t.device.type, t.device.index, storage.data_ptr()), storage.nbytes()
    if t.is_sparse:  # COO: its indices and values
        idx, val = t._indices(), t._values()
        return (t.device.type, t.device.index, val.untyped_storage().data_ptr()), (
            idx.untyped_storage().nbytes() + val.untyped_storage().nbytes())
    return ("other", id(t)), t.numel() * t.element_size()  # other layouts: their logical size


def _modules_of(fn: Any) -> Optional[nn.Module]:
    if isinstance(fn, nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)  # a bound method such as model.forward
    return owner if isinstance(owner, nn.Module) else None


def _device_of(inputs: Iterable[Any], module: Optional[nn.Module]) -> torch.device:
    for t in _tensors_in(list(inputs)):
        return t.device
    if module is not None:
        for p in module.parameters():
            return p.device
    return torch.device("cpu")


class _RSSSampler:
    """Fallback peak on CPU: resident-set growth sampled every ~0.5 ms in a thread (coarse)."""

    def __init__(self):
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._stop = threading.Event()
        self.start_rss = self._rss()
        self.peak_rss = self.start_rss

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self):
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._rss())
            time.sleep(0.0005)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._rss())

    @property
    def peak_bytes(self) -> int:
        return max(0, self.peak_rss - self.start_rss)


def _cpu_peak_from_profiler(prof) -> int:
    """Peak of the running sum of CPU allocator events recorded by the profiler."""
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        if ev.tag == _EventType.Allocation and ev.extra_fields.device.type == "cpu":
            events.append((ev.start_time_ns, ev.extra_fields.alloc_size))
        stack.extend(ev.children)
    events.sort(key=lambda e: e[0])
    running = peak = 0
    for _, size in events:
        running += size
        peak = max(peak, running)
    return peak


def profile_memory(fn_or_module: Callable, *inputs: Any, backward: bool = True,
                   exclude: Iterable[torch.Tensor] = (), **kwargs: Any) -> MemoryProfile:
    """Run one forward (+ backward of the sum of the outputs) and measure its memory.

    Args:
        fn_or_module: an ``nn.Module`` or any callable (a bound method of a module counts as
            that module, for per-layer attribution and parameter exclusion).
        *inputs, **kwargs: passed to it.
        backward: also run ``sum(outputs).backward()`` (every floating output tensor that
            requires grad); the peak then covers forward and backward.  Gradients accumulate
            into ``.grad`` as with any backward.
        exclude: extra tensors whose storage is not an activation (e.g. the weights a plain
            function closes over); parameters and buffers of a module, and any
            ``nn.Parameter``, are always excluded.

    Returns:
        A ``MemoryProfile`` (a dict) with ``saved_bytes``, ``saved_bytes_by_layer``,
        ``peak_bytes`` and more; ``print()`` it for a table.
    """
    module = _modules_of(fn_or_module)
    device = _device_of(inputs, module)
    excluded = set()
    state_tensors = list(exclude)
    if module is not None:
        state_tensors += list(module.parameters()) + list(module.buffers())
    for t in state_tensors:
        excluded.add(_storage_key(t)[0])

    # Innermost running module, via a stack maintained by forward pre/post hooks.
    names = {m: name for name, m in module.named_modules()} if module is not None else {}
    running: list[str] = []
    handles = []
    if module is not None:
        for m in names:
            def pre(mod, args, _name=names[m]):
                running.append(_name)

            def post(mod, args, out, _name=names[m]):
                # Pop back to this module's entry (robust to a hook that raised in between).
                while running and running.pop() != _name:
                    pass

            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))

    seen: set = set()
    by_layer: dict[str, int] = {}
    count = [0]

    def pack(t: torch.Tensor):
        count[0] += 1
        if isinstance(t, nn.Parameter):
            return t
        key, nbytes = _storage_key(t)
        if key in excluded or key in seen or nbytes == 0:
            return t
        seen.add(key)
        layer = running[-1] if running else ""
        by_layer[layer] = by_layer.get(layer, 0) + nbytes
        return t

    def unpack(t):
        return t

    def step():
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            out = fn_or_module(*inputs, **kwargs)
        if backward:
            leaves = [t for t in _tensors_in(out) if t.requires_grad and t.is_floating_point()]
            if not leaves:
                raise ValueError("profile_memory(backward=True): the outputs have no tensor that requires grad; "
                                 "pass backward=False or give inputs/parameters that require grad")
            total = sum(t.float().sum() for t in leaves)
            total.backward()
        return out

    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            out = step()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - before
            source = "cuda allocator"
        else:
            peak, source, out = _cpu_step_with_peak(step)
    finally:
        for h in handles:
            h.remove()
    del out
    return MemoryProfile(saved_bytes=sum(by_layer.values()), saved_bytes_by_layer=by_layer,
                         saved_tensors=count[0], peak_bytes=int(max(0, peak)), peak_source=source,
                         device=str(device), backward=backward)


def _profiler_allocations_supported() -> bool:
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile  # noqa: F401
    except ImportError:
        return False
    return hasattr(_EventType, "Allocation")


@contextlib.contextmanager
def _native_stderr_silenced():
    """Point file descriptor 2 at /dev/null while native code starts or stops the profiler."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_step_with_peak(step):
    if _profiler_allocations_supported():
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _native_stderr_silenced():  # kineto prints "USDT: ... profiler_start/stop" lines
            prof.__enter__()
        try:
            out = step()
        finally:
            with _native_stderr_silenced():
                prof.__exit__(None, None, None)
        try:
            return _cpu_peak_from_profiler(prof), "profiler allocator events", out
        except AttributeError:  # the event tree's layout changed: report what we can
            return _fallback_peak_from_events(prof), "profiler op memory (approx.)", out
    with _RSSSampler() as sampler:
        out = step()
    return sampler.peak_bytes, "resident set growth", out


def _fallback_peak_from_events(prof) -> int:
    """Coarse peak from the public per-op memory deltas, in start order."""
    running = peak = 0
    for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
        if not ev.cpu_children:  # leaf ops only, so nested ops' memory is not counted twice
            running += ev.cpu_memory_usage
            peak = max(peak, running)
    return peak
