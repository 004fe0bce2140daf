"""LoRA on an embedding table: :func:`lora_embedding` and :class:`LoRAEmbedding` (peft's lora.Embedding).

    y[..., :] = E[ids] + s · A[:, ids]ᵀ Bᵀ          E = weight [V, N] (frozen), A = lora_A [r, V], B = lora_B [N, r]

    dA[:, j] = s · Σ_{m: ids[m] = j} (grad_y B)[m, :]      (j = padding_idx gets nothing; divided by the
                                                            count of j with scale_grad_by_freq, as F.embedding)
    dB       = s · grad_yᵀ A[:, ids]ᵀ
    merged:  E' = E + s · (B A)ᵀ = E + s · Aᵀ Bᵀ

Shapes, init and scale are peft's: ``lora_embedding_A`` [r, V] starts at zeros, ``lora_embedding_B``
[N, r] normal, s = alpha / r (alpha / sqrt(r) with rsLoRA).  There is no dropout on ids (peft
builds a dropout module for embeddings and never applies it: ``lora_dropout`` is kept for its
config only).  The LoRA branch is computed in float32 (float64 for float64 tables) from A and B
as stored, added to E's row and rounded once to E's dtype.

Backends: "cpp" (csrc/embedding.cpp: the gather and the rank-r product fused, y written once;
the backward reads grad_y once for grad_y·B and dB, then scatters into dA's columns), "reference"
(plain PyTorch, the float64 ground truth; also CUDA tensors).  A trainable table gets its
gradient too (a scatter-add of grad_y into its rows); nn.Embedding's ``max_norm`` (which
renormalises the table in place) and ``sparse`` gradients are refused.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastpeft.core import backends as _backends
from fastpeft.core.validation import check_positive_int

__all__ = ["lora_embedding", "lora_embedding_reference", "LoRAEmbedding", "embedding_backend_unavailable"]

_FLOAT = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INT = (torch.int64, torch.int32)
ROW_CHUNK = 4096  # rows of the [V, N] table merged at a time (no dense [V, N] temporary)


# ----------------------------------------------------------------------------- checks
def _check_args(ids, weight, lora_A, lora_B, scale, padding_idx, scale_grad_by_freq) -> Optional[int]:
    """TypeError / ValueError naming the argument, before any work; returns padding_idx in [0, V) or None."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"ids must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype not in _INT:
        raise TypeError(f"ids must be an int64 or int32 tensor, got {ids.dtype}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [num_embeddings, embedding_dim], got "
                         f"{list(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    if weight.dtype not in _FLOAT:
        raise TypeError(f"weight must be float32, bfloat16, float16 or float64, got {weight.dtype}")
    V, N = weight.shape
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {list(t.shape)}")
    r = lora_A.shape[0]
    for name, t, shape in (("lora_A", lora_A, (r, V)), ("lora_B", lora_B, (N, r))):
        if r == 0 or tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)} for a [{V}, {N}] table (peft's layout: "
                             f"lora_A [r, num_embeddings], lora_B [embedding_dim, r], r >= 1), got {list(t.shape)}")
        if t.dtype not in (weight.dtype, torch.float32):
            raise TypeError(f"{name} must have weight's dtype ({weight.dtype}) or torch.float32, got {t.dtype}")
    for name, t in (("ids", ids), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but weight is on {weight.device}; move it to {weight.device}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite real number, got {scale!r}")
    if not isinstance(scale_grad_by_freq, bool):
        raise TypeError(f"scale_grad_by_freq must be True or False, got {scale_grad_by_freq!r}")
    if padding_idx is not None:
        if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
            raise TypeError(f"padding_idx must be an int or None, got {padding_idx!r}")
        if not -V <= padding_idx < V:
            raise ValueError(f"padding_idx must be in [-{V}, {V}) for a table of {V} rows, got {padding_idx}")
        padding_idx %= V
    # reads data: only after every cheap check (nothing has run yet)
    if ids.numel() and ids.device.type != "meta":
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"ids must be in [0, {V}) (the table has {V} rows), got {lo if lo < 0 else hi}")
    return padding_idx


def embedding_backend_unavailable(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when the embedding LoRA runs on backend ``name`` for a ``dtype`` table on ``device``, else why not."""
    if name == "reference":
        return None
    if name == "cpp":
        if device.type != "cpu":
            return f"the C++ embedding kernels run on CPU tensors only, got {device}"
        if dtype == torch.float64:
            return "float64 runs on the 'reference' backend"
        reason = _backends.unavailable_reason("cpp")
        if reason is not None:
            return reason
        try:
            torch.ops.fastpeft_cpp.embedding_lora_fwd  # noqa: B018 - existence check
        except (AttributeError, RuntimeError):
            return ("the fastpeft C++ extension was built without csrc/embedding.cpp; rebuild it "
                    "(python -c \"import fastpeft.core.backends.cpp as c; c.build()\")")
        return None
    return f"unknown backend {name!r}; expected one of {', '.join(_backends.KNOWN)} or 'auto'"


def _resolve(name: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs: "triton" (no kernel of its own: the gather is memory-bound) and "auto"
    take cpp for CPU tensors when it is built, else the reference."""
    if name in (None, "auto"):
        name = _backends.get_backend()
    if name in (None, "auto", "triton"):
        return "cpp" if embedding_backend_unavailable("cpp", device, dtype) is None else "reference"
    reason = embedding_backend_unavailable(name, device, dtype)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available for LoRA on embeddings: {reason}")
    return name


# ----------------------------------------------------------------------------- reference
def lora_embedding_reference(ids: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, *,
                             padding_idx: Optional[int] = None, scale_grad_by_freq: bool = False) -> Tensor:
    """The math in plain PyTorch (autograd by torch): float32 accumulation (float64 for a float64
    table), rounded once to weight's dtype."""
    wide = torch.float64 if weight.dtype == torch.float64 else torch.float32
    base = F.embedding(ids, weight, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq)
    xa = F.embedding(ids, lora_A.to(wide).t(), padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq)
    return (base.to(wide) + scale * (xa @ lora_B.to(wide).t())).to(weight.dtype)


# ----------------------------------------------------------------------------- custom ops (cpp)
@torch.library.custom_op("fastpeft::embedding_lora_fwd", mutates_args=())
def _fwd(ids: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, padding_idx: int,
         scale_grad_by_freq: bool) -> Tensor:
    """ids int64 [M] -> y [M, N]; padding_idx (-1: none) and scale_grad_by_freq are the backward's."""
    return torch.ops.fastpeft_cpp.embedding_lora_fwd(ids, weight, lora_A, lora_B, scale)


@_fwd.register_fake
def _(ids, weight, lora_A, lora_B, scale, padding_idx, scale_grad_by_freq):
    return weight.new_empty(ids.shape[0], weight.shape[1])


@torch.library.custom_op("fastpeft::embedding_lora_bwd", mutates_args=())
def _bwd(grad_y: Tensor, ids: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, padding_idx: int,
         scale_grad_by_freq: bool, needs: list[bool]) -> tuple[Tensor, Tensor]:
    return torch.ops.fastpeft_cpp.embedding_lora_bwd(grad_y, ids, lora_A, lora_B, scale, padding_idx,
                                                     scale_grad_by_freq, needs)


@_bwd.register_fake
def _(grad_y, ids, lora_A, lora_B, scale, padding_idx, scale_grad_by_freq, needs):
    return (torch.empty_like(lora_A) if needs[0] else lora_A.new_empty(0),
            torch.empty_like(lora_B) if needs[1] else lora_B.new_empty(0))


def _setup_context(ctx, inputs, output):
    ids, weight, lora_A, lora_B, scale, padding_idx, freq = inputs
    ctx.save_for_backward(ids, lora_A, lora_B)
    ctx.scale, ctx.padding_idx, ctx.freq = scale, padding_idx, freq
    ctx.needs = [lora_A.requires_grad, lora_B.requires_grad]
    ctx.weight_grad, ctx.weight_shape, ctx.weight_dtype = weight.requires_grad, tuple(weight.shape), weight.dtype


def _backward(ctx, grad_y):
    ids, lora_A, lora_B = ctx.saved_tensors
    g = grad_y.contiguous()
    dA = dB = dW = None
    if any(ctx.needs):
        dA, dB = _bwd(g, ids, lora_A, lora_B, ctx.scale, ctx.padding_idx, ctx.freq, ctx.needs)
        dA, dB = (dA if ctx.needs[0] else None), (dB if ctx.needs[1] else None)
    if ctx.weight_grad:  # a trainable table: the gradient of the gather (rarely used with LoRA)
        dW = _table_grad(g, ids, ctx.weight_shape, ctx.weight_dtype, ctx.padding_idx, ctx.freq)
    return None, dW, dA, dB, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def _table_grad(g: Tensor, ids: Tensor, shape: tuple, dtype: torch.dtype, padding_idx: int, freq: bool) -> Tensor:
    """dE = Σ_m e_{ids[m]} grad_y[m] (padding row excluded, / count with freq), as F.embedding's backward."""
    rows = g.float()
    if freq:
        rows = rows / torch.bincount(ids, minlength=shape[0])[ids].unsqueeze(1).float()
    if padding_idx >= 0:
        rows = rows * (ids != padding_idx).unsqueeze(1)
    return torch.zeros(shape, dtype=torch.float32, device=g.device).index_add_(0, ids, rows).to(dtype)


def lora_embedding(ids: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, *,
                   padding_idx: Optional[int] = None, scale_grad_by_freq: bool = False,
                   backend: Optional[str] = None) -> Tensor:
    """y = weight[ids] + scale · lora_A[:, ids]ᵀ lora_Bᵀ, shape [*ids.shape, N], in weight's dtype.

    Args:
        ids: int64 / int32 token ids of any shape, each in [0, V).
        weight: the [V, N] table (frozen or not); lora_A [r, V], lora_B [N, r] (weight's dtype or float32).
        scale: the LoRA scale s.
        padding_idx, scale_grad_by_freq: nn.Embedding's (the padding row gets no gradient in A's column).
        backend: "cpp", "reference", or None / "auto" / "triton" (cpp for CPU tensors when built, else the
            reference, which also serves CUDA tensors: there is no Triton kernel for this op).

    Raises TypeError / ValueError naming the argument (ids out of range included) before any work.
    """
    padding_idx = _check_args(ids, weight, lora_A, lora_B, scale, padding_idx, scale_grad_by_freq)
    name = _resolve(backend, weight.device, weight.dtype)
    if name == "reference" or torch.compiler.is_compiling():
        return lora_embedding_reference(ids, weight, lora_A, lora_B, scale, padding_idx=padding_idx,
                                        scale_grad_by_freq=scale_grad_by_freq)
    flat = ids.reshape(-1).long()
    y = _fwd(flat, weight, lora_A, lora_B, float(scale), -1 if padding_idx is None else padding_idx,
             scale_grad_by_freq)
    return y.reshape(*ids.shape, weight.shape[1])


# ----------------------------------------------------------------------------- module
def _check_embedding(embedding, what: str = "embedding") -> None:
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"{what} must be a torch.nn.Embedding, got {type(embedding).__name__}")
    if embedding.max_norm is not None:
        raise ValueError(f"{what} has max_norm={embedding.max_norm}: nn.Embedding renormalises its table in place "
                         "on every forward, which LoRA on the embedding does not reproduce")
    if embedding.sparse:
        raise ValueError(f"{what} has sparse=True (sparse gradients); LoRA on embeddings trains dense factors, "
                         "build the embedding with sparse=False")


class LoRAEmbedding(nn.Module):
    """nn.Embedding + LoRA: y = E[ids] + s · A[:, ids]ᵀ Bᵀ (peft's lora.Embedding; see the module doc).

    Build it with :meth:`from_embedding`; ``forward(ids)`` has nn.Embedding's contract.  The table
    ``weight`` is the embedding's own Parameter (frozen); ``lora_A`` [r, V] and ``lora_B`` [N, r]
    train.  ``merge()`` folds s·AᵀBᵀ into the table, ``unmerge()`` takes it out.
    """

    PARAM_CATEGORIES = {"weight": "weight", "lora_A": "adapter", "lora_B": "adapter"}
    lora_bias, fan_in_fan_out = None, False  # what LoRA's peft config reads of a layer (embeddings have neither)

    def __init__(self, weight: nn.Parameter, *, padding_idx: Optional[int] = None, scale_grad_by_freq: bool = False,
                 backend: Optional[str] = None):
        super().__init__()
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError("weight must be a 2-D tensor [num_embeddings, embedding_dim]")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.num_embeddings, self.embedding_dim = weight.shape
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
                raise TypeError(f"padding_idx must be an int or None, got {padding_idx!r}")
            if not -self.num_embeddings <= padding_idx < self.num_embeddings:
                raise ValueError(f"padding_idx must be in [-{self.num_embeddings}, {self.num_embeddings}), "
                                 f"got {padding_idx}")
            padding_idx %= self.num_embeddings
        if not isinstance(scale_grad_by_freq, bool):
            raise TypeError(f"scale_grad_by_freq must be True or False, got {scale_grad_by_freq!r}")
        self.padding_idx, self.scale_grad_by_freq, self.backend = padding_idx, scale_grad_by_freq, backend
        self.lora_A = self.lora_B = None
        self.r, self.lora_alpha, self.lora_scale, self.lora_dropout, self.use_rslora = 0, 0.0, 0.0, 0.0, False
        self._peft_init = None  # (the LoRA path's record of a base-rewriting init; embeddings have none)
        self._merged = False

    # peft's names for the table's sizes (its lora.Embedding: in_features = V, out_features = N)
    @property
    def in_features(self) -> int:
        return self.num_embeddings

    @property
    def out_features(self) -> int:
        return self.embedding_dim

    @property
    def merged(self) -> bool:
        return self._merged

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, r: int = 8, alpha: float = 16, use_rslora: bool = False,
                       dropout: float = 0.0, *, backend: Optional[str] = None) -> LoRAEmbedding:
        """Wrap ``embedding`` (its table is reused, and frozen) with LoRA of rank r, scale alpha/r
        (alpha/√r with use_rslora), initialised as peft: lora_A zeros, lora_B normal, so the layer
        computes exactly what the embedding did.  ``dropout`` is recorded only (peft applies none to ids).
        Everything is checked first: when it raises, ``embedding`` is as it was."""
        layer = cls.build(embedding, backend=backend)
        parts = layer.lora_parts(r, alpha, use_rslora, dropout)
        embedding.weight.requires_grad_(False)
        layer.assign(parts)
        return layer

    @classmethod
    def build(cls, embedding: nn.Embedding, *, backend: Optional[str] = None) -> LoRAEmbedding:
        """The layer over ``embedding``'s table with no LoRA yet (nothing of ``embedding`` changes)."""
        _check_embedding(embedding)
        layer = cls(embedding.weight, padding_idx=embedding.padding_idx,
                    scale_grad_by_freq=embedding.scale_grad_by_freq, backend=backend)
        layer.train(embedding.training)
        return layer

    def lora_parts(self, r: int, alpha: float = 16, use_rslora: bool = False, dropout: float = 0.0) -> dict:
        """New peft-initialised factors and settings (draws lora_B; nothing changes until ``assign``)."""
        self.check_lora(r, alpha, use_rslora, dropout)
        dev = self.weight.device
        a = torch.zeros(r, self.num_embeddings, dtype=torch.float32, device=dev)
        b = torch.empty(self.embedding_dim, r, dtype=torch.float32, device=dev)
        nn.init.normal_(b)
        return self.adopt(nn.Parameter(a), nn.Parameter(b), alpha=alpha, use_rslora=use_rslora, dropout=dropout)

    def check_lora(self, r: int, alpha: float = 16, use_rslora: bool = False, dropout: float = 0.0) -> None:
        """Every check of adding LoRA (no random draw)."""
        if self._merged:
            raise RuntimeError("cannot add LoRA while the layer is merged; call unmerge() first")
        if self.lora_A is not None:
            raise ValueError("this embedding already has a LoRA path")
        check_positive_int("r", r)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise TypeError(f"alpha must be a finite real number, got {alpha!r}")
        if not isinstance(use_rslora, bool):
            raise TypeError(f"use_rslora must be True or False, got {use_rslora!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")

    def adopt(self, lora_A: Tensor, lora_B: Tensor, alpha: float, use_rslora: bool = False, dropout: float = 0.0,
              scale: Optional[float] = None) -> dict:
        """The LoRA parts with these factors (the same objects); ``scale`` defaults to alpha/r or alpha/√r."""
        if self._merged:
            raise RuntimeError("cannot add LoRA while the layer is merged; call unmerge() first")
        V, N = self.num_embeddings, self.embedding_dim
        r = int(lora_A.shape[0]) if isinstance(lora_A, Tensor) and lora_A.dim() == 2 else 0
        if r == 0 or tuple(lora_A.shape) != (r, V):
            raise ValueError(f"lora_A must be [r, {V}] with r > 0, got {list(getattr(lora_A, 'shape', []))}")
        if not isinstance(lora_B, Tensor) or tuple(lora_B.shape) != (N, r):
            raise ValueError(f"lora_B must be [{N}, {r}], got {list(getattr(lora_B, 'shape', []))}")
        for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
            if t.dtype not in (self.weight.dtype, torch.float32) or t.device != self.weight.device:
                raise TypeError(f"{name} must be on the table's device ({self.weight.device}) with its dtype "
                                f"({self.weight.dtype}) or float32, got {t.dtype} on {t.device}")
        if scale is None:
            scale = float(alpha) / (math.sqrt(r) if use_rslora else r)
        return {"lora_A": lora_A, "lora_B": lora_B, "r": r, "lora_alpha": float(alpha), "lora_scale": float(scale),
                "use_rslora": bool(use_rslora), "lora_dropout": float(dropout)}

    def assign(self, parts: dict) -> None:
        """Put ``parts`` (from ``lora_parts`` / ``adopt``) on the layer; cannot fail."""
        for name, value in parts.items():
            setattr(self, name, value)

    # ----------------------------------------------------------------- forward
    def forward(self, ids: Tensor) -> Tensor:
        if self._merged or self.lora_A is None:
            if not isinstance(ids, Tensor) or ids.dtype not in _INT:
                raise TypeError(f"ids must be an int64 or int32 tensor, got "
                                f"{ids.dtype if isinstance(ids, Tensor) else type(ids).__name__}")
            return F.embedding(ids, self.weight, self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq)
        return lora_embedding(ids, self.weight, self.lora_A, self.lora_B, self.lora_scale,
                              padding_idx=self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq,
                              backend=self.backend)

    # ----------------------------------------------------------------- merge
    def _delta_rows(self, v0: int, v1: int, dtype=torch.float32) -> Tensor:
        """s · A[:, v0:v1]ᵀ Bᵀ: rows v0..v1 of the table's difference."""
        a, b = self.lora_A.detach()[:, v0:v1].to(dtype), self.lora_B.detach().to(dtype)
        return self.lora_scale * (a.t() @ b.t())

    def delta_weight(self) -> Tensor:
        """E' - E in float32 [V, N]: what merge() adds to the table."""
        if self.lora_A is None:
            raise RuntimeError("delta_weight(): this embedding has no LoRA")
        if self._merged:
            raise RuntimeError("delta_weight() needs the unmerged table; call unmerge() first")
        with torch.no_grad():
            return torch.cat([self._delta_rows(v, min(v + ROW_CHUNK, self.num_embeddings))
                              for v in range(0, self.num_embeddings, ROW_CHUNK)])

    def _fold(self, sign: float) -> None:
        with torch.no_grad():
            for v in range(0, self.num_embeddings, ROW_CHUNK):
                rows = self.weight[v:v + ROW_CHUNK]
                rows.copy_(rows.float() + sign * self._delta_rows(v, v + rows.shape[0]))

    def merge(self) -> None:
        """Fold s·AᵀBᵀ into the table in place (in row chunks: no [V, N] temporary); forward then gathers only."""
        if self._merged:
            warnings.warn("layer is already merged; merge() did nothing", stacklevel=2)
            return
        if self.lora_A is not None:
            self._fold(1.0)
        self._merged = True

    def unmerge(self) -> None:
        """Undo merge() (the table is restored to its dtype's rounding)."""
        if not self._merged:
            warnings.warn("layer is not merged; unmerge() did nothing", stacklevel=2)
            return
        if self.lora_A is not None:
            self._fold(-1.0)
        self._merged = False

    # ----------------------------------------------------------------- accounting (fastpeft.count_parameters)
    def changed_counts(self) -> dict:
        """Entries of the pre-trained table LoRA changes: nnz(s·AᵀBᵀ) (whether merged or not); a table
        trained in place counts its entries that differ from the snapshot (all of them without one)."""
        counts = {"adapter": 0, "weight": 0}
        if self.lora_A is not None and not any(t.is_meta for t in (self.lora_A, self.lora_B)):
            with torch.no_grad():
                counts["adapter"] = sum(int(torch.count_nonzero(self._delta_rows(v, v + ROW_CHUNK)))
                                        for v in range(0, self.num_embeddings, ROW_CHUNK))
        elif self.lora_A is not None:
            counts["adapter"] = self.num_embeddings * self.embedding_dim
        if self.weight.requires_grad:
            from fastpeft.nn.pretrained import initial_values

            ref = initial_values(self.weight)
            if ref is None or self._merged or self.weight.is_meta:
                counts["weight"] = self.weight.numel()
            else:
                counts["weight"] = int((self.weight.detach() != ref).sum())
        return counts

    def delta_rank(self) -> Optional[int]:
        """Rank of s·AᵀBᵀ from the r x r closed form (fastpeft.paths.lora)."""
        if self.lora_A is None:
            return 0
        if any(t.is_meta for t in (self.lora_A, self.lora_B)):
            return None
        from fastpeft.paths import get

        return get("lora").rank_alone(self)

    # ----------------------------------------------------------------- peft's checkpoint keys
    def peft_tensors(self, name: str, prepare=lambda t: t) -> dict:
        """peft's keys for this layer's factors: ``<name>.lora_embedding_A`` [r, V], ``.lora_embedding_B`` [N, r]."""
        return {f"{name}.lora_embedding_A": prepare(self.lora_A), f"{name}.lora_embedding_B": prepare(self.lora_B)}

    def extra_repr(self) -> str:
        parts = [f"{self.num_embeddings}, {self.embedding_dim}"]
        if self.padding_idx is not None:
            parts.append(f"padding_idx={self.padding_idx}")
        if self.lora_A is not None:
            parts += [f"r={self.r}", f"scale={self.lora_scale:g}"] + ["rslora=True"] * self.use_rslora
        return ", ".join(parts + [f"backend={self.backend or 'auto'}", f"merged={self._merged}"])


# ----------------------------------------------------------------------------- model surgery (fastpeft.inject / merge)
class EmbeddingPlan:
    """LoRA on one nn.Embedding target of ``inject``, in inject's three steps: ``__init__`` checks
    (nothing changes, nothing is drawn), ``build`` draws the factors off the model, ``assign`` puts
    the layer in (cannot fail)."""

    def __init__(self, name: str, module: nn.Module, config):
        self.name, self.replaces = name, None if isinstance(module, LoRAEmbedding) else module
        if getattr(config, "use_dora", False):
            raise ValueError(f"layer {name!r}: use_dora=True is not supported on embeddings by fastpeft")
        if getattr(config, "lora_bias", False):
            raise ValueError(f"layer {name!r}: lora_bias=True is not supported on embeddings (peft refuses it too)")
        self.options = dict(r=config.r, alpha=config.alpha, use_rslora=config.use_rslora, dropout=config.dropout)
        try:
            if self.replaces is not None:
                _check_replaceable_embedding(name, module)
                self.layer = LoRAEmbedding.build(module, backend=config.backend)
            else:
                self.layer = module
            self.layer.check_lora(**self.options)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise type(exc)(f"layer {name!r}: {exc}") from None
        self.parts = None

    def build(self) -> None:
        self.parts = self.layer.lora_parts(**self.options)

    def assign(self, model: nn.Module) -> None:
        self.layer.assign(self.parts)
        if self.replaces is not None:
            self.layer.weight.requires_grad_(False)
            parent, _, child = self.name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, self.layer)


def _check_replaceable_embedding(name: str, module: nn.Module) -> None:
    hooks = [kind for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
             if getattr(module, kind, None)]
    children = [n for n, _ in module.named_children()]
    if hooks or children:
        raise ValueError(f"{name!r} carries {', '.join(children + [h.strip('_').replace('_', ' ') for h in hooks])}: "
                         "replacing it with a fastpeft layer would drop them; inject before registering hooks")


def embedding_plans(model: nn.Module, config) -> list:
    """The checked plans for the nn.Embedding layers a LoRAConfig names (``target_modules`` by name or
    regex; None adapts linear layers only, as peft's "all-linear").  Raises before anything changes."""
    from fastpeft.nn.config import matches

    if getattr(config, "path", None) != "lora" or config.target_modules is None:
        return []
    return [EmbeddingPlan(name, module, config) for name, module in model.named_modules()
            if name and (type(module) is nn.Embedding or isinstance(module, LoRAEmbedding))
            and matches(name, config.target_modules)]


def _shared(model: nn.Module, layer: LoRAEmbedding) -> Optional[str]:
    """The name of another module holding ``layer``'s table (tie_word_embeddings), or None."""
    for name, module in model.named_modules():
        if module is not layer and any(p is layer.weight for p in module.parameters(recurse=False)):
            return name or "<root>"
    return None


def embeddings_to_merge(model: nn.Module) -> list:
    """The unmerged LoRAEmbedding layers of ``model``; ValueError (nothing merged) for one whose table
    is tied to another module, which merging would rewrite too."""
    todo = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRAEmbedding) and not m.merged]
    refused = [f"{n!r} (tied to {other!r})" for n, m in todo if m.lora_A is not None
               and (other := _shared(model, m)) is not None]
    if refused:
        raise ValueError(f"cannot merge {', '.join(refused)}: the table is shared (tie_word_embeddings), so merging "
                         "would rewrite the other module too; keep the model unmerged (same outputs) or untie first")
    return [m for _, m in todo]
