"""Task heads that can be the only trained part of a model ("linear probing" / head-only tuning).

``ClassificationHead`` pools a sequence ([B, L, H] hidden states, or a transformers output with
``last_hidden_state``) and maps it to [B, num_classes] logits; ``TokenClassificationHead`` maps
every position to [B, L, num_classes].  ``ModelWithHead(backbone, head)`` runs a backbone and a
head together and, by default, freezes the backbone so the head is all that trains (PEFT layers
injected into the backbone beforehand keep training).

Heads hold their parameters directly (``weight``/``bias`` and, with a hidden layer,
``dense_weight``/``dense_bias``), counted as "weight"/"bias" by ``count_parameters``.
Class-count mismatches (labels out of range, a label map or checkpoint of another size) raise
ValueError saying both numbers.

Modules saved in full with an adapter (peft's ``modules_to_save``): a module marked by
``save_in_full`` (``ModelWithHead``'s head; the modules ``LoRAConfig(modules_to_save=[...])`` and
the other configs name, trained in place by ``fastpeft.inject``) is written by
``fastpeft.save_adapter`` exactly as peft writes a ``modules_to_save`` module: its state_dict under
``base_model.model.<path>.<key>`` and ``<path>`` in the config's ``modules_to_save`` list, so
``PeftModel.from_pretrained`` restores it (and ``fastpeft.load_adapter`` copies it back in place).
A peft ``ModulesToSaveWrapper`` left in a model by ``fastpeft.from_peft`` is saved the same way
(its active trained copy).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from fastpeft.core.validation import check_positive_int
from fastpeft.methods.adapters import BottleneckAdapter
from fastpeft.nn.modules import PEFTLinear

POOLINGS = ("cls", "mean", "last", "none")
IGNORE_INDEX = -100


def _hidden(x) -> Tensor:
    if hasattr(x, "last_hidden_state"):
        x = x.last_hidden_state
    elif isinstance(x, (tuple, list)):
        x = x[0]
    if not isinstance(x, Tensor):
        raise TypeError(f"expected hidden states (a Tensor or a model output with last_hidden_state), got "
                        f"{type(x).__name__}")
    return x


class _Head(nn.Module):
    PARAM_CATEGORIES = {"weight": "weight", "bias": "bias", "dense_weight": "weight", "dense_bias": "bias"}

    def __init__(self, hidden_size: int, num_classes: int, hidden_layer: bool, dropout: float,
                 id2label: Optional[dict], dtype, device):
        super().__init__()
        check_positive_int("hidden_size", hidden_size)
        check_positive_int("num_classes", num_classes)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if id2label is not None and len(id2label) != num_classes:
            raise ValueError(f"id2label has {len(id2label)} labels but num_classes is {num_classes}")
        self.hidden_size, self.num_classes, self.id2label = hidden_size, num_classes, id2label
        kw = {"dtype": dtype, "device": device}
        if hidden_layer:
            self.dense_weight = nn.Parameter(torch.empty(hidden_size, hidden_size, **kw))
            self.dense_bias = nn.Parameter(torch.empty(hidden_size, **kw))
        else:
            self.dense_weight = self.dense_bias = None
        self.weight = nn.Parameter(torch.empty(num_classes, hidden_size, **kw))
        self.bias = nn.Parameter(torch.empty(num_classes, **kw))
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation for every projection."""
        for w, b in ((self.dense_weight, self.dense_bias), (self.weight, self.bias)):
            if w is None:
                continue
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(b, -bound, bound)

    def _project(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden states have {x.shape[-1]} features but the head expects {self.hidden_size}")
        x = self.dropout(x)
        if self.dense_weight is not None:
            x = self.dropout(torch.tanh(F.linear(x, self.dense_weight.to(x.dtype), self.dense_bias.to(x.dtype))))
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))

    def check_labels(self, labels: Tensor) -> None:
        """Raise ValueError when labels are not integer class ids in [0, num_classes) (or IGNORE_INDEX)."""
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError("labels must be an integer tensor of class ids")
        valid = labels[labels != IGNORE_INDEX]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= self.num_classes):
            bad = int(valid.max()) if int(valid.max()) >= self.num_classes else int(valid.min())
            raise ValueError(f"labels contain class id {bad} but the head has {self.num_classes} classes "
                             f"(valid ids: 0..{self.num_classes - 1})")

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of logits [..., C] against labels [...] (IGNORE_INDEX entries are skipped)."""
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[-1]} classes but the head has {self.num_classes}")
        if tuple(labels.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"labels must have shape {list(logits.shape[:-1])}, got {list(labels.shape)}")
        self.check_labels(labels)
        return F.cross_entropy(logits.reshape(-1, self.num_classes).float(), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        w = state_dict.get(prefix + "weight")
        if isinstance(w, Tensor) and w.dim() == 2 and w.shape[0] != self.num_classes:
            raise ValueError(f"the checkpoint's head has {w.shape[0]} classes but this head has {self.num_classes}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_classes={self.num_classes}, "
                f"hidden_layer={self.dense_weight is not None}")


class ClassificationHead(_Head):
    """Sequence classification: pool [B, L, H] hidden states, then (dense + tanh) and a linear layer.

    pooling: "cls" (first position, BERT-style), "mean" (mean over positions where the
    attention mask is 1), "last" (last position the mask keeps, decoder-style) or "none"
    (the input is already pooled, [B, H]).  hidden_layer: the dense + tanh layer of BERT's and
    RoBERTa's classification heads before the output projection.
    """

    def __init__(self, hidden_size: int, num_classes: int, *, pooling: str = "cls", hidden_layer: bool = True,
                 dropout: float = 0.1, id2label: Optional[dict] = None, dtype=None, device=None):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        super().__init__(hidden_size, num_classes, hidden_layer, dropout, id2label, dtype, device)
        self.pooling = pooling

    def pool(self, hidden, attention_mask: Optional[Tensor] = None) -> Tensor:
        """[B, H] summary of [B, L, H] hidden states by ``self.pooling``."""
        x = _hidden(hidden)
        if self.pooling == "none":
            if x.dim() != 2:
                raise ValueError(f"pooling='none' expects pooled [B, H] input, got shape {list(x.shape)}")
            return x
        if x.dim() != 3:
            raise ValueError(f"expected hidden states [B, L, H], got shape {list(x.shape)}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"attention_mask must have shape {list(x.shape[:2])}, got {list(attention_mask.shape)}")
        if self.pooling == "cls":
            return x[:, 0]
        mask = attention_mask.to(x.dtype) if attention_mask is not None else x.new_ones(x.shape[:2])
        if self.pooling == "mean":
            return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        # last kept position of each row
        pos = torch.arange(x.shape[1], device=x.device)
        last = (mask * (pos + 1)).argmax(1)
        return x[torch.arange(x.shape[0], device=x.device), last]

    def forward(self, hidden, attention_mask: Optional[Tensor] = None) -> Tensor:
        return self._project(self.pool(hidden, attention_mask))


class TokenClassificationHead(_Head):
    """Per-position classification (NER, tagging): [B, L, H] -> [B, L, num_classes] logits.

    ``loss`` skips positions labelled IGNORE_INDEX (-100), as transformers does for padding and
    sub-word continuations.
    """

    def __init__(self, hidden_size: int, num_classes: int, *, hidden_layer: bool = False, dropout: float = 0.1,
                 id2label: Optional[dict] = None, dtype=None, device=None):
        super().__init__(hidden_size, num_classes, hidden_layer, dropout, id2label, dtype, device)

    def forward(self, hidden, attention_mask: Optional[Tensor] = None) -> Tensor:
        x = _hidden(hidden)
        if x.dim() != 3:
            raise ValueError(f"expected hidden states [B, L, H], got shape {list(x.shape)}")
        return self._project(x)


class ModelWithHead(nn.Module):
    """``head(backbone(**inputs), attention_mask)``; with ``freeze_backbone`` only the head trains.

    Parameters of fastpeft layers already injected into the backbone (LoRA, adapters, prompts)
    stay trainable; every other backbone parameter is frozen.  ``forward(labels=...)`` returns
    ``(loss, logits)``, else the logits.
    """

    PARAM_CATEGORIES: dict = {}

    def __init__(self, backbone: nn.Module, head: _Head, freeze_backbone: bool = True):
        super().__init__()
        if not isinstance(head, _Head):
            raise TypeError(f"head must be a ClassificationHead or TokenClassificationHead, got {type(head).__name__}")
        hidden = getattr(getattr(backbone, "config", None), "hidden_size", None)
        if isinstance(hidden, int) and hidden != head.hidden_size:
            raise ValueError(f"the backbone's hidden size is {hidden} but the head expects {head.hidden_size}")
        id2label = getattr(getattr(backbone, "config", None), "id2label", None)
        # transformers' default config says 2 labels; any other count is a real label map to agree with
        if head.id2label is None and id2label and len(id2label) not in (2, head.num_classes):
            raise ValueError(f"the backbone's config has {len(id2label)} labels but the head has "
                             f"{head.num_classes} classes")
        self.backbone, self.head = backbone, head
        save_in_full(head)  # save_adapter writes the head as peft's modules_to_save
        if freeze_backbone:
            def is_peft(m):
                return (isinstance(m, (PEFTLinear, BottleneckAdapter))
                        or "prompt" in getattr(m, "PARAM_CATEGORIES", {}).values())

            keep = {id(p) for m in backbone.modules() if is_peft(m)
                    for p in m.parameters(recurse=False) if p.requires_grad}
            for p in backbone.parameters():
                if id(p) not in keep:
                    p.requires_grad_(False)

    def forward(self, *args, labels: Optional[Tensor] = None, **inputs):
        out = self.backbone(*args, **inputs)
        mask = inputs.get("attention_mask")
        hidden = _hidden(out)
        if mask is not None and hidden.dim() == 3 and mask.shape[1] != hidden.shape[1]:
            mask = None  # a prompt-tuned backbone that keeps its virtual positions: pool over all of them
        logits = self.head(hidden, mask)
        if labels is None:
            return logits
        return self.head.loss(logits, labels), logits


# ----------------------------------------------------------------------------- modules saved in full
_SAVED_IN_FULL = WeakIdKeyDictionary()  # module -> True, as long as the module lives


def save_in_full(module: nn.Module) -> None:
    """Mark ``module`` to be saved in full by ``fastpeft.save_adapter`` (peft's ``modules_to_save``)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    _SAVED_IN_FULL[module] = True


def is_modules_to_save(module: nn.Module) -> bool:
    """Whether ``module`` is peft's ``ModulesToSaveWrapper`` (peft is not imported)."""
    return type(module).__name__ == "ModulesToSaveWrapper" and type(module).__module__.startswith("peft.")


def saved_copy(module: nn.Module) -> Optional[nn.Module]:
    """What is saved for ``module``: itself when marked by ``save_in_full``, the active trained copy of a
    peft ``ModulesToSaveWrapper``, else None."""
    if is_modules_to_save(module):
        active = [a for a in module.active_adapters if a in module.modules_to_save]
        return module.modules_to_save[active[0]] if len(active) == 1 else None
    return module if module in _SAVED_IN_FULL else None


def modules_saved_in_full(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """[(path in ``model``, the module whose state_dict is saved)], outermost first; a marked module
    inside another one saved in full is part of it."""
    found, prefix = [], None
    for name, module in model.named_modules():
        if prefix is not None and name.startswith(prefix):
            continue
        copy = saved_copy(module)
        if copy is not None and name:
            found.append((name, copy))
            prefix = f"{name}."
    return found
