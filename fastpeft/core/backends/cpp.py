"""C++ CPU backend: the fused op as ``torch.ops.fastpeft_cpp.*`` kernels (csrc/).

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (ninja, -O3,
-march=native, OpenMP) and cached in torch's extension directory, so later processes only load it.
Every ``csrc/*.cpp`` goes into the one extension.  ``build()`` compiles and loads it ahead of time:
``python -c "import fastpeft.core.backends.cpp as c; c.build()"`` after installing prebuilds it.
If there is no C++ compiler or the build fails,
``BACKEND.unavailable()`` says why, and "auto" falls back to the "reference" backend.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import sys
import threading
import time
from typing import Optional

import torch

from fastpeft.core import spec
from fastpeft.core.backends.base import Backend
from fastpeft.core.spec import Grads

EXTENSION_NAME = "fastpeft_cpp"


def _csrc_dir() -> str:
    """The C++ sources: ``fastpeft.csrc`` (the repository's csrc/, mapped by pyproject's package-dir)."""
    import importlib.util

    spec = importlib.util.find_spec("fastpeft.csrc")
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    # Running from a source tree that was not installed: csrc/ beside the fastpeft package.
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "csrc")


CSRC = os.path.normpath(_csrc_dir())
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_state: dict = {}  # "ops" (the loaded namespace) or "error" (why it failed), once per process


def _sources() -> list[str]:
    return sorted(glob.glob(os.path.join(CSRC, "*.cpp")))


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _needs_build(build_dir: str) -> bool:
    """True when the cached library is missing or older than a source or header (ninja will compile)."""
    lib = os.path.join(build_dir, f"{EXTENSION_NAME}.so")
    if not os.path.exists(lib):
        return True
    compiled = [p for p in glob.glob(os.path.join(CSRC, "*")) if p.endswith((".cpp", ".h"))]  # not README.md
    newest = max(os.path.getmtime(p) for p in compiled)
    return newest > os.path.getmtime(lib)


STALE_LOCK_SECONDS = 600  # a build takes a minute or two; an older lock is left by a killed build


def _clear_stale_lock(build_dir: str) -> None:
    """Remove torch's build lock if a killed build left it behind (torch would wait on it forever)."""
    lock = os.path.join(build_dir, "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return
    if age > STALE_LOCK_SECONDS:
        print(f"fastpeft: removing a stale build lock ({lock}, {age / 60:.0f} min old)", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):
            os.remove(lock)


def build(verbose: bool = False):
    """Compile (if needed) and load the C++ extension; returns the ``torch.ops.fastpeft_cpp`` namespace.

    Raises RuntimeError naming the cause when there is no compiler or the build fails.  The result,
    success or failure, is cached for the process.
    """
    ops = _state.get("ops")
    if ops is not None:
        return ops
    with _lock:
        if "ops" in _state:
            return _state["ops"]
        if "error" in _state:
            raise RuntimeError(_state["error"])
        try:
            _state["ops"] = _build(verbose)
            return _state["ops"]
        except Exception as exc:  # no compiler, compile error, load error: report, fall back
            _state["error"] = _reason(exc)
            print(f"fastpeft: {_state['error']}", file=sys.stderr, flush=True)
            raise RuntimeError(_state["error"]) from exc


def _build(verbose: bool):
    from torch.utils import cpp_extension

    sources = _sources()
    if not sources:
        raise FileNotFoundError(f"no C++ sources found in {CSRC}")
    if _compiler() is None:
        raise OSError("no C++ compiler found (set CXX or install g++ / clang++)")
    build_dir = cpp_extension._get_build_directory(EXTENSION_NAME, verbose)
    _clear_stale_lock(build_dir)
    if _needs_build(build_dir):
        print("fastpeft: building the C++ extension (first use, about a minute)...", file=sys.stderr, flush=True)
    cpp_extension.load(name=EXTENSION_NAME, sources=sources, extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                       build_directory=build_dir, is_python_module=False, verbose=verbose)
    return torch.ops.fastpeft_cpp


def _reason(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    errors = [line.strip() for line in lines if "error:" in line]  # the compiler's first complaint
    detail = errors[0] if errors else (lines[-1] if lines else type(exc).__name__)
    if isinstance(exc, OSError) and "compiler" in str(exc):
        cause = str(exc)
    else:
        cause = f"building the C++ extension failed ({type(exc).__name__}: {detail})"
    return f"{cause}; the 'reference' backend is used instead"


def unavailable() -> Optional[str]:
    """None when the extension is built and loaded, else the reason as a sentence."""
    if "ops" in _state:  # every call resolves the backend: keep the common case lock-free
        return None
    try:
        build()
        return None
    except RuntimeError as exc:
        return str(exc)


def device_error(device: torch.device) -> Optional[str]:
    if getattr(device, "type", None) != "cpu" and torch.device(device).type != "cpu":
        return f"the C++ backend runs on CPU tensors only, got {device} (use 'triton' or 'reference')"
    return None


def forward(a, save_z):
    return build().forward(*a, bool(save_z))


def backward(grad_y, a, xa, z, needs):
    t = spec.N_TENSORS
    grads = build().backward(grad_y, *a[:t], xa, z, *a[t:], list(needs))
    return Grads._make(g if need else None for g, need in zip(grads, needs))


BACKEND = Backend(
    name="cpp",
    forward=forward,
    backward=backward,
    unavailable=unavailable,
    device_error=device_error,
    dtypes=(torch.float32, torch.bfloat16, torch.float16),
)
