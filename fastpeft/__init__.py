"""fastpeft: fused kernels for parameter-efficient fine-tuning.

The one op, ``peft_linear``, fuses a frozen linear layer with its LoRA, dropout, IA3, bias and
sparse-delta paths; modules, configs and ``inject`` put it into real models; ``count_parameters``
reports parameters by category (DESIGN.md).
"""
from . import reference
from .accounting import count_parameters
from .backends import available_backends, get_backend, set_backend
from .config import BitFitConfig, IA3Config, LoRAConfig, SparseConfig
from .inject import inject, merge, unmerge
from .modules import BitFitLinear, IA3Linear, LoRALinear, PEFTLinear, SparseLinear
from .ops import peft_linear

__version__ = "0.1.0"

__all__ = [
    "peft_linear", "reference", "available_backends", "set_backend", "get_backend",
    "PEFTLinear", "LoRALinear", "IA3Linear", "BitFitLinear", "SparseLinear",
    "LoRAConfig", "IA3Config", "BitFitConfig", "SparseConfig", "inject", "merge", "unmerge",
    "count_parameters",
]
