"""fastpeft: fused kernels for parameter-efficient fine-tuning.

The one op, ``peft_linear``, fuses a frozen linear layer with its LoRA, dropout, IA3, bias and
sparse-delta paths; modules, configs and ``inject`` put it into real models; ``count_parameters``
reports parameters by category (DESIGN.md).
"""
from . import reference
from .accounting import count_parameters
from .adapters import AdapterConfig, BottleneckAdapter, bottleneck_adapter
from .backends import available_backends, get_backend, set_backend
from .config import BitFitConfig, IA3Config, LoRAConfig, SparseConfig
from .heads import ClassificationHead, ModelWithHead, TokenClassificationHead
from .inject import inject, merge, unmerge
from .interop import from_peft, load_adapter, save_adapter
from .modules import BitFitLinear, IA3Linear, LoRALinear, PEFTLinear, SparseLinear
from .ops import peft_linear
from .profiling import profile_memory
from .prompt import PrefixTuning, PromptTuning
from .selective import delta_penalty, select_layers
from .sparse_select import select_sparse_by_gradient, select_sparse_indices

__version__ = "0.1.0"

__all__ = [
    "peft_linear", "reference", "available_backends", "set_backend", "get_backend",
    "PEFTLinear", "LoRALinear", "IA3Linear", "BitFitLinear", "SparseLinear",
    "LoRAConfig", "IA3Config", "BitFitConfig", "SparseConfig", "inject", "merge", "unmerge",
    "count_parameters", "from_peft", "save_adapter", "load_adapter", "select_sparse_by_gradient", "select_sparse_indices",
    "AdapterConfig", "BottleneckAdapter", "bottleneck_adapter", "ClassificationHead", "TokenClassificationHead",
    "ModelWithHead", "PrefixTuning", "PromptTuning", "delta_penalty", "select_layers", "profile_memory",
]
