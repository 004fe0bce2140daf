"""Backend registry and selection.

A backend implements the fused op on 2-D contiguous x as two functions (see ``Backend``); the
autograd wiring, validation and torch.library registration live in ``fastpeft.core.ops`` and are
shared by all backends.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Optional

import torch

from fastpeft.core.backends.base import Backend

KNOWN = ("reference", "cpp", "triton")


_REGISTRY: dict[str, Backend] = {}
_LOADERS: dict[str, Callable[[], Backend]] = {}
_selected: Optional[str] = None


def register_loader(name: str, loader: Callable[[], Backend]) -> None:
    """Register a lazily imported backend (importing triton or building C++ is not free)."""
    _LOADERS[name] = loader


def _load(name: str) -> Optional[Backend]:
    if name not in _REGISTRY and name in _LOADERS:
        _REGISTRY[name] = _LOADERS[name]()
    return _REGISTRY.get(name)


def unavailable_reason(name: str) -> Optional[str]:
    if name not in KNOWN:
        return f"unknown backend {name!r}; expected one of {', '.join(KNOWN)} or 'auto'"
    try:
        backend = _load(name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("fastpeft."):
            return f"backend {name!r} is not part of this build"
        return f"backend {name!r} needs the missing package {exc.name!r}"
    except Exception as exc:  # a broken optional dependency must not break the reference path
        return f"backend {name!r} failed to load: {type(exc).__name__}: {exc}"
    if backend is None:
        return f"backend {name!r} is not part of this build"
    return backend.unavailable()


def available_backends() -> list[str]:
    """The backends usable on this machine, a subset of ["reference", "cpp", "triton"]."""
    return [name for name in KNOWN if unavailable_reason(name) is None]


def set_backend(name: Optional[str]) -> None:
    """Choose the default backend for every call (None or "auto": the best for each tensor)."""
    global _selected
    if name is None or name == "auto":
        _selected = None
        return
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"cannot select backend {name!r}: {reason}")
    _selected = name


def get_backend() -> Optional[str]:
    """The backend set by set_backend or FASTPEFT_BACKEND (None means auto)."""
    if _selected is not None:
        return _selected
    env = os.environ.get("FASTPEFT_BACKEND", "").strip()
    return None if env in ("", "auto") else env


def resolve(name: Optional[str], device: torch.device, dtype: torch.dtype = torch.float32) -> Backend:
    """The Backend object for an explicit name (or the global choice, or auto), device and dtype."""
    if name is None or name == "auto":
        name = get_backend()
    if name is None or name == "auto":
        preferred = ("triton", "reference") if device.type == "cuda" else ("cpp", "reference")
        for candidate in preferred:
            if unavailable_reason(candidate) is None:
                backend = _load(candidate)
                if backend.device_error(device) is None and dtype in backend.dtypes:
                    return backend
        raise RuntimeError(f"no backend supports tensors on {device}")
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    backend = _load(name)
    reason = backend.device_error(device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run on {device}: {reason}")
    if dtype not in backend.dtypes:
        supported = ", ".join(str(d).replace("torch.", "") for d in backend.dtypes)
        raise TypeError(f"backend {name!r} does not compute in {dtype}; it supports {supported}")
    return backend


def eager_cpu_op(name: Optional[str]) -> Optional[Callable]:
    """``torch.ops.fastpeft_cpp.peft_linear`` when backend ``name`` (None or "auto": the global
    choice) runs CPU tensors on the C++ backend and the extension is built, else None.

    ``fastpeft.peft_linear`` calls it directly for eager CPU tensors: reshaping, validation, the
    seed draw and autograd all happen in C++, so a call costs no Python beyond this lookup.
    """
    if name is None or name == "auto":
        name = get_backend()
    if name not in (None, "auto", "cpp") or unavailable_reason("cpp") is not None:
        return None
    from fastpeft.core.backends import cpp

    return cpp.build().peft_linear


def _reference_loader() -> Backend:
    from fastpeft.core.backends import reference

    return reference.BACKEND


def _cpp_loader() -> Backend:
    from fastpeft.core.backends import cpp

    return cpp.BACKEND


def _triton_loader() -> Backend:
    from fastpeft.core.backends import triton

    return triton.BACKEND


register_loader("reference", _reference_loader)
register_loader("cpp", _cpp_loader)
register_loader("triton", _triton_loader)
