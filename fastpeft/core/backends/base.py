"""The backend contract: one implementation of the fused op (fastpeft.core.backends registers them)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Backend:
    """One implementation of the fused op.

    forward(args: spec.OpArgs, save_z: bool) -> (y, xa, z)
        args.x is [M, K] contiguous, args.seed an int (fastpeft.core.spec defines the fields and
        their shapes); y is [M, N] in x's dtype; xa is the [M, r] product dropout(x) @ lora_A^T
        the backward needs for dB (empty [0] when there is no LoRA); z is the [M, N] output
        before ia3_out (empty [0] unless save_z).
    backward(grad_y, args: spec.OpArgs, xa, z, needs: spec.Needs) -> spec.Grads
        one gradient per spec.GRAD_NAMES entry, each in its argument's dtype, None where
        ``needs`` is False; args.x is None when no gradient reads it (spec.saved_for_backward).
    Backends read their arguments by name (``args.lora_A``), never by position.
    unavailable() -> None when usable on this machine, else the reason as a sentence.
    device_error(device) -> None when tensors on ``device`` are supported, else the reason.
    dtypes: the dtypes of x it computes in.
    """

    name: str
    forward: Callable
    backward: Callable
    unavailable: Callable[[], Optional[str]]
    device_error: Callable[[torch.device], Optional[str]]
    dtypes: tuple = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
