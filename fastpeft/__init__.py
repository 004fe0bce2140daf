"""fastpeft: fused kernels for parameter-efficient fine-tuning.

The one op, ``peft_linear``, fuses a frozen linear layer with its LoRA, dropout, IA3, bias and
sparse-delta paths; modules, configs and ``inject`` put it into real models; ``count_parameters``
reports parameters by category (DESIGN.md).
"""
import importlib.util as _util
import os as _os
import sys as _sys
from importlib.machinery import ModuleSpec as _ModuleSpec


def _attach_folder(name: str) -> None:
    """Make the repository's top-level ``kernels/`` or ``csrc/`` importable as ``fastpeft.<name>``.

    A built wheel has them inside the package (pyproject's package-dir maps them there), and this
    does nothing.  A source checkout or an editable install has them beside the package: register
    that folder as the namespace package ``fastpeft.<name>``.  Neither folder has an __init__.py,
    so running from the repository root never shadows another top-level package called ``kernels``.
    """
    here = _os.path.dirname(_os.path.abspath(__file__))
    folder = _os.path.join(_os.path.dirname(here), name)
    if _os.path.isdir(_os.path.join(here, name)) or not _os.path.isdir(folder):
        return
    spec = _ModuleSpec(f"{__name__}.{name}", None, is_package=True)
    spec.submodule_search_locations = [folder]
    _sys.modules[spec.name] = globals()[name] = _util.module_from_spec(spec)


_attach_folder("kernels")
_attach_folder("csrc")

from fastpeft import reference
from fastpeft.core.backends import available_backends, get_backend, set_backend
from fastpeft.core.ops import peft_linear
from fastpeft.interop.peft import from_peft, load_adapter, save_adapter
from fastpeft.methods.adapters import AdapterConfig, BottleneckAdapter, bottleneck_adapter
from fastpeft.methods.heads import ClassificationHead, ModelWithHead, TokenClassificationHead
from fastpeft.methods.prompt import PrefixTuning, PromptTuning
from fastpeft.methods.selective import delta_penalty, select_layers
from fastpeft.methods.sparse_select import select_sparse_by_gradient, select_sparse_indices
from fastpeft.nn.accounting import count_parameters
from fastpeft.nn.config import BitFitConfig, IA3Config, LoRAConfig, SparseConfig
from fastpeft.nn.embedding import LoRAEmbedding, lora_embedding
from fastpeft.nn.inject import inject, merge, unmerge
from fastpeft.nn.modules import BitFitLinear, IA3Linear, LoRALinear, PEFTLinear, SparseLinear
from fastpeft.quant import QuantizedWeight, quantize_weight
from fastpeft.quant.model import quantize
from fastpeft.tools.profiling import profile_memory

__version__ = "0.1.0"

__all__ = [
    "peft_linear", "reference", "available_backends", "set_backend", "get_backend",
    "PEFTLinear", "LoRALinear", "IA3Linear", "BitFitLinear", "SparseLinear",
    "LoRAConfig", "IA3Config", "BitFitConfig", "SparseConfig", "inject", "merge", "unmerge",
    "count_parameters", "from_peft", "save_adapter", "load_adapter", "select_sparse_by_gradient",
    "select_sparse_indices",
    "AdapterConfig", "BottleneckAdapter", "bottleneck_adapter", "ClassificationHead", "TokenClassificationHead",
    "ModelWithHead", "PrefixTuning", "PromptTuning", "delta_penalty", "select_layers", "profile_memory",
    "QuantizedWeight", "quantize_weight", "quantize", "LoRAEmbedding", "lora_embedding",
]
