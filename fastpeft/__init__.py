"""fastpeft: fused kernels for parameter-efficient fine-tuning.

The one op, ``peft_linear``, fuses a frozen linear layer with its LoRA, dropout, IA3, bias and
sparse-delta paths; modules, configs and ``inject`` put it into real models.
"""
from . import reference
from .backends import available_backends, get_backend, set_backend
from .ops import peft_linear

__version__ = "0.1.0"

__all__ = [
    "peft_linear", "reference", "available_backends", "set_backend", "get_backend",
]
