"""Drop-in nn.Linear replacements that run the fused op.

Every module is a ``PEFTLinear``: the original (frozen) weight and bias, plus whichever adapter
paths it carries.  ``from_linear`` keeps the very same weight and bias tensors (no copy) and
initialises adapters like peft (A Kaiming-uniform, B zeros, IA3 ones, sparse values zeros), so a
freshly built layer computes exactly what the nn.Linear did.  Attribute names match the op's
arguments: ``weight``, ``bias``, ``lora_A`` [r, K], ``lora_B`` [N, r], ``ia3_in`` [K],
``ia3_out`` [N], ``sparse_index`` (buffer), ``sparse_value``.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn as nn

from fastpeft.nn.accounting import remember_pretrained
from fastpeft.core.ops import peft_linear
from fastpeft.methods.sparse_select import select_sparse_indices
from fastpeft.core.validation import check_positive_int, check_sparse

IA3_POSITIONS = ("in", "out", "both")
# |scale| below this makes unmerge divide by (nearly) zero: the restored weight is unreliable.
_IA3_UNMERGE_EPS = 1e-4


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    # peft keeps adapters in fp32 when the base layer is half precision ("autocast_adapter_dtype").
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def _check_linear(linear) -> None:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")


class PEFTLinear(nn.Module):
    """A linear layer with any combination of LoRA, IA3, trainable bias and a sparse delta.

    Build it with :meth:`from_linear`; ``forward(x)`` has nn.Linear's contract.  ``merge()`` folds
    the adapters into ``weight`` (and ``bias``) for inference and ``unmerge()`` takes them out.
    """

    PARAM_CATEGORIES = {"weight": "weight", "bias": "bias", "lora_A": "adapter", "lora_B": "adapter",
                        "ia3_in": "scaling", "ia3_out": "scaling", "sparse_value": "sparse"}

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter] = None, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("weight must be a 2-D tensor [out_features, in_features]")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = weight.shape
        self.backend = backend
        self.lora_A = self.lora_B = None
        self.r, self.lora_alpha, self.lora_scale, self.lora_dropout, self.use_rslora = 0, 0.0, 0.0, 0.0, False
        self.ia3_in = self.ia3_out = None
        self.sparse_value = None
        self.register_buffer("sparse_index", None)
        self._merged = False

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, *, r: int = 0, alpha: Optional[float] = None, dropout: float = 0.0,
                    use_rslora: bool = False, ia3: Optional[str] = None, train_bias: bool = False,
                    density: Optional[float] = None, selection: str = "magnitude", block: Optional[int] = None,
                    seed: int = 0, backend: Optional[str] = None) -> "PEFTLinear":
        """Wrap ``linear`` (its weight and bias are reused, and frozen) with the chosen paths.

        r, alpha, dropout, use_rslora: LoRA of rank r (r = 0: none), scale alpha/r or alpha/sqrt(r).
        ia3: None, "in", "out" or "both".  train_bias: BitFit (a zero bias is added if the layer has none).
        density, selection, block, seed: a sparse delta over that fraction of W's entries.
        """
        _check_linear(linear)
        layer = cls(linear.weight, linear.bias, backend=backend)
        if r:
            layer.add_lora(r, alpha if alpha is not None else r, dropout, use_rslora)
        if ia3 is not None:
            layer.add_ia3(ia3)
        if density is not None:
            layer.add_sparse(density, selection, block, seed)
        # linear's own tensors change (frozen) only once every path was built
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        if train_bias:
            layer.train_bias()
        return layer

    def _new_param(self, tensor: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(tensor.to(device=self.weight.device, dtype=_adapter_dtype(self.weight)))

    def _check_unmerged(self, what: str) -> None:
        if self._merged:
            raise RuntimeError(f"cannot {what} while the layer is merged; call unmerge() first")

    def _assign(self, parts: dict) -> "PEFTLinear":
        # Parameters, the sparse_index buffer and plain attributes alike: nothing here can fail.
        for name, value in parts.items():
            setattr(self, name, value)
        return self

    def add_lora(self, r: int, alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False) -> "PEFTLinear":
        """Add a LoRA path: lora_A Kaiming-uniform [r, K], lora_B zeros [N, r]."""
        return self._assign(self._lora_parts(r, alpha, dropout, use_rslora))

    def _lora_parts(self, r: int, alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False) -> dict:
        """Validate and build what ``add_lora`` adds, as {attribute: value}; the layer is not changed."""
        self._check_lora(r, dropout)
        a = torch.empty(r, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # peft's (and nn.Linear's) init for lora_A
        return {"lora_A": self._new_param(a), "lora_B": self._new_param(torch.zeros(self.out_features, r)),
                "r": r, "lora_alpha": float(alpha), "lora_dropout": float(dropout), "use_rslora": bool(use_rslora),
                "lora_scale": float(alpha) / (math.sqrt(r) if use_rslora else r)}

    def _check_lora(self, r: int, dropout: float) -> None:
        """Raise what ``add_lora`` would raise, without drawing its random init."""
        self._check_unmerged("add LoRA")
        if self.lora_A is not None:
            raise ValueError("this layer already has a LoRA path")
        check_positive_int("r", r)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

    def add_ia3(self, position: str = "out") -> "PEFTLinear":
        """Add IA3 scale vectors (ones) on the input ("in"), the output ("out") or both."""
        return self._assign(self._ia3_parts(position))

    def _ia3_parts(self, position: str = "out") -> dict:
        """Validate and build what ``add_ia3`` adds, as {attribute: value}; the layer is not changed."""
        self._check_unmerged("add IA3")
        if position not in IA3_POSITIONS:
            raise ValueError(f"position must be one of {', '.join(IA3_POSITIONS)}, got {position!r}")
        parts = {}
        if position in ("in", "both"):
            if self.ia3_in is not None:
                raise ValueError("this layer already has an input IA3 vector")
            parts["ia3_in"] = self._new_param(torch.ones(self.in_features))
        if position in ("out", "both"):
            if self.ia3_out is not None:
                raise ValueError("this layer already has an output IA3 vector")
            parts["ia3_out"] = self._new_param(torch.ones(self.out_features))
        return parts

    def train_bias(self) -> "PEFTLinear":
        """BitFit: make the bias trainable (adding a zero bias when the layer has none)."""
        if self.bias is None:
            self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=self.weight.dtype, device=self.weight.device))
        else:
            remember_pretrained(self.bias)  # so count_parameters can tell which entries training changed
        self.bias.requires_grad_(True)
        return self

    def add_sparse(self, density: float = 0.01, selection: str = "magnitude", block: Optional[int] = None,
                   seed: int = 0, index: Optional[torch.Tensor] = None) -> "PEFTLinear":
        """Add a trainable sparse delta on a fixed set of W's entries (values start at zero).

        On the meta device the index is a meta tensor of the selection's size (select_sparse_indices),
        ready for ``to_empty`` + ``load_state_dict``.
        """
        return self._assign(self._sparse_parts(density, selection, block, seed, index))

    def _sparse_parts(self, density: float = 0.01, selection: str = "magnitude", block: Optional[int] = None,
                     seed: int = 0, index: Optional[torch.Tensor] = None) -> dict:
        """Validate and build what ``add_sparse`` adds, as {attribute: value}; the layer is not changed."""
        self._check_unmerged("add a sparse delta")
        if self.sparse_value is not None:
            raise ValueError("this layer already has a sparse delta")
        if index is None:
            index = select_sparse_indices(self.weight, density, selection, seed=seed, block=block)
        elif not isinstance(index, torch.Tensor):
            raise TypeError(f"index must be a torch.Tensor of flat indices or None, got {type(index).__name__}")
        elif index.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"index must be an int64 (or int32) tensor, got {index.dtype}")
        index = index.to(device=self.weight.device, dtype=torch.int64)
        n_values = index.shape[0] if index.dim() == 1 else 0  # check_sparse rejects other shapes
        values = torch.zeros(n_values, dtype=_adapter_dtype(self.weight), device=index.device)
        # Meta tensors have no values to check (only their shapes).
        check_sparse(index, values, self.out_features, self.in_features, check_values=index.device.type != "meta")
        return {"sparse_index": index, "sparse_value": self._new_param(values), "sparse_density": density,
                "sparse_selection": selection, "sparse_block": block}

    # ----------------------------------------------------------------- forward
    @property
    def merged(self) -> bool:
        return self._merged

    @property
    def methods(self) -> list[str]:
        names = []
        if self.lora_A is not None:
            names.append("lora")
        if self.ia3_in is not None:
            names.append("ia3_in")
        if self.ia3_out is not None:
            names.append("ia3_out")
        if self.bias is not None and self.bias.requires_grad:
            names.append("bitfit")
        if self.sparse_value is not None:
            names.append("sparse")
        return names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged:
            return peft_linear(x, self.weight, self.bias, backend=self.backend)
        p = self.lora_dropout if self.training else 0.0
        return peft_linear(x, self.weight, self.bias, lora_A=self.lora_A, lora_B=self.lora_B,
                           lora_scale=self.lora_scale, lora_dropout=p, ia3_in=self.ia3_in, ia3_out=self.ia3_out,
                           sparse_index=self.sparse_index, sparse_value=self.sparse_value, backend=self.backend)

    # ----------------------------------------------------------------- merge
    def delta_weight(self) -> torch.Tensor:
        """Effective W' - W in fp32 (dense [N, K]): what merge() adds to the weight."""
        with torch.no_grad():
            w = self.weight.float()
            if self._merged:
                raise RuntimeError("delta_weight() needs the unmerged weight; call unmerge() first")
            return self._apply_paths_(w.clone()) - w

    def _apply_paths_(self, w: torch.Tensor) -> torch.Tensor:
        """In place on fp32 ``w``: diag(ia3_out) (w + S) diag(ia3_in) + scale * B A (the merged weight)."""
        if self.sparse_value is not None:
            w.view(-1).index_add_(0, self.sparse_index, self.sparse_value.float())
        if self.ia3_in is not None:
            w.mul_(self.ia3_in.float()[None, :])
        if self.ia3_out is not None:
            w.mul_(self.ia3_out.float()[:, None])
        if self.lora_A is not None:
            w.addmm_(self.lora_B.float(), self.lora_A.float(), alpha=self.lora_scale)
        return w

    def merge(self) -> None:
        """Fold every adapter path into weight (and bias) in place; forward then costs a plain linear.

        The weight tensor is written wherever it is shared: ``fastpeft.merge(model)`` refuses layers
        whose weight is tied to another module (e.g. the input embeddings); this method does not look.
        """
        if self._merged:
            warnings.warn("layer is already merged; merge() did nothing", stacklevel=2)
            return
        with torch.no_grad():
            self.weight.copy_(self._apply_paths_(self.weight.float()))
            if self.ia3_out is not None and self.bias is not None:
                self.bias.copy_(self.bias.float() * self.ia3_out.float())
        self._merged = True

    def unmerge(self) -> None:
        """Undo merge(): W is restored to fp32 rounding (warns when an IA3 scale is near zero)."""
        if not self._merged:
            warnings.warn("layer is not merged; unmerge() did nothing", stacklevel=2)
            return
        with torch.no_grad():
            w = self.weight.float()
            if self.lora_A is not None:
                w.addmm_(self.lora_B.float(), self.lora_A.float(), alpha=-self.lora_scale)
            for name, vec, dim in (("ia3_out", self.ia3_out, 1), ("ia3_in", self.ia3_in, 0)):
                if vec is None:
                    continue
                if bool((vec.float().abs() < _IA3_UNMERGE_EPS).any()):
                    warnings.warn(f"{name} has scales near zero (|s| < {_IA3_UNMERGE_EPS}); the unmerged "
                                  "weight is not reliable", stacklevel=2)
                scale = vec.float()[:, None] if dim == 1 else vec.float()[None, :]
                w.div_(scale)
                if name == "ia3_out" and self.bias is not None:
                    self.bias.copy_(self.bias.float() / vec.float())
            if self.sparse_value is not None:
                w.view(-1).index_add_(0, self.sparse_index, -self.sparse_value.float())
            self.weight.copy_(w)
        self._merged = False

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                 f"method={'+'.join(self.methods) or 'frozen'}"]
        if self.lora_A is not None:
            parts += [f"r={self.r}", f"scale={self.lora_scale:g}", f"dropout={self.lora_dropout:g}"]
            if self.use_rslora:
                parts.append("rslora=True")
        if self.sparse_value is not None:
            parts.append(f"nnz={self.sparse_value.numel()}")
        parts += [f"backend={self.backend or 'auto'}", f"merged={self._merged}"]
        return ", ".join(parts)


class LoRALinear(PEFTLinear):
    """nn.Linear + LoRA: y = x W^T + b + scale * (dropout(x) A^T) B^T."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                    use_rslora: bool = False, *, backend: Optional[str] = None) -> "LoRALinear":
        check_positive_int("r", r)
        return super().from_linear(linear, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                   backend=backend)


class IA3Linear(PEFTLinear):
    """nn.Linear with IA3 scaling of its inputs ("in", feed-forward layers) or outputs ("out")."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, position: str = "out", *, backend: Optional[str] = None) -> "IA3Linear":
        return super().from_linear(linear, ia3=position, backend=backend)


class BitFitLinear(PEFTLinear):
    """nn.Linear whose only trainable part is its bias."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, backend: Optional[str] = None) -> "BitFitLinear":
        return super().from_linear(linear, train_bias=True, backend=backend)


class SparseLinear(PEFTLinear):
    """nn.Linear plus a trainable sparse delta on a fixed fraction of W's entries."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, density: float = 0.01, selection: str = "magnitude",
                    block: Optional[int] = None, seed: int = 0, *, backend: Optional[str] = None) -> "SparseLinear":
        return super().from_linear(linear, density=density, selection=selection, block=block, seed=seed,
                                   backend=backend)
