"""Sparse fine-tuning masks chosen by gradient: FISH masks (Sung et al., 2021).

``select_sparse_by_gradient(model, batches, config)`` runs a few user batches through the frozen
model, accumulates the squared gradient of every target layer's weight (the diagonal empirical
Fisher) and selects, per layer, the entries (or b x b blocks) with the largest scores, with the
same density, block and tie rules as the one-weight selection ``select_sparse_indices``
(fastpeft.paths.sparse_index, re-exported here with ``count_for_density`` and ``SELECTIONS``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Optional

import torch

from fastpeft.nn.config import SparseConfig
from fastpeft.nn.inject import target_names
from fastpeft.nn.modules import is_conv1d
from fastpeft.paths.sparse_index import SELECTIONS, count_for_density, select_sparse_indices

__all__ = ["SELECTIONS", "count_for_density", "select_sparse_indices", "accumulate_squared_gradients",
           "select_sparse_by_gradient"]


def _model_loss(output, batch, loss_fn: Optional[Callable]) -> torch.Tensor:
    if loss_fn is not None:
        loss = loss_fn(output, batch)
    elif getattr(output, "loss", None) is not None:  # Hugging Face ModelOutput with labels
        loss = output.loss
    elif isinstance(output, Mapping) and output.get("loss") is not None:
        loss = output["loss"]
    elif isinstance(output, torch.Tensor) and output.numel() == 1:
        loss = output
    else:
        raise TypeError("cannot find a loss in the model's output (no .loss, not a scalar): pass "
                        "loss_fn(output, batch) -> scalar tensor")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError("the loss must be a scalar tensor, got "
                        f"{type(loss).__name__}{list(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
    if not loss.requires_grad:
        raise RuntimeError("the loss does not depend on any target layer's weight (no gradient flows)")
    return loss.reshape(())


def _run(model: torch.nn.Module, batch):
    if isinstance(batch, Mapping):  # dicts and tokenizer outputs (transformers' BatchEncoding)
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _folder(score: torch.Tensor):
    """A post-accumulate hook adding grad² into ``score`` and dropping the gradient."""
    def fold(param):
        g = param.grad.float()
        score.addcmul_(g, g)
        param.grad = None

    return fold


def accumulate_squared_gradients(model: torch.nn.Module, batches: Iterable, target_modules=None,
                                 loss_fn: Optional[Callable] = None) -> dict[str, torch.Tensor]:
    """Sum over ``batches`` of grad(loss)² of each target layer's weight, fp32 [N, K] per layer name.

    Targets are the layers ``fastpeft.inject`` would adapt for ``target_modules`` (None: every
    linear layer whose weight is not tied to another module).  Only the
    target weights require grad while this runs; each gradient is folded into its score as soon
    as it is accumulated and then dropped, so at most one dense gradient per layer is alive.
    The model's requires_grad flags and existing ``.grad`` tensors are restored afterwards and
    its parameters are not modified.  The model runs in its current train/eval mode.
    """
    names = target_names(model, target_modules)
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear in the model")
    weights = {name: model.get_submodule(name).weight for name in names}
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    scores: dict[int, torch.Tensor] = {}
    hooks = []
    seen_batches = 0
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            if id(w) in scores:
                continue  # a weight shared by several target layers is scored once
            scores[id(w)] = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            w.requires_grad_(True)

            hooks.append(w.register_post_accumulate_grad_hook(_folder(scores[id(w)])))
        with torch.enable_grad():
            for batch in batches:
                loss = _model_loss(_run(model, batch), batch, loss_fn)
                loss.backward()
                seen_batches += 1
    finally:
        for h in hooks:
            h.remove()
        for p, flag, grad in zip(params, saved_flags, saved_grads):
            p.requires_grad_(flag)
            p.grad = grad
    if seen_batches == 0:
        raise ValueError("batches is empty: gradient selection needs at least one batch")
    # [N, K] per layer: a transposed base (transformers Conv1D, fan_in_fan_out) stores [K, N]
    return {name: scores[id(w)].t() if _transposed(model.get_submodule(name)) else scores[id(w)]
            for name, w in weights.items()}


def _transposed(module) -> bool:
    return bool(getattr(module, "fan_in_fan_out", False)) or is_conv1d(module)


def select_sparse_by_gradient(model: torch.nn.Module, batches: Iterable, config,
                              loss_fn: Optional[Callable] = None) -> dict[str, torch.Tensor]:
    """FISH-mask selection: per target layer, the entries with the largest accumulated grad².

    Args:
        model: the (frozen) model; it is not modified (requires_grad flags and grads restored).
        batches: an iterable of batches; a mapping (a dict, a tokenizer's output) is called as
            ``model(**batch)``, a tuple/list as ``model(*batch)``, anything else as ``model(batch)``.
        config: a ``fastpeft.SparseConfig``: its ``target_modules``, ``density`` and ``block``
            apply.  Its ``selection`` is not read (this function always selects by gradient), so
            ``SparseConfig(density=0.01, target_modules=[...])`` is enough.
        loss_fn: ``loss_fn(output, batch) -> scalar``; by default the output's ``.loss`` (Hugging
            Face models given labels), a ``"loss"`` key, or the output itself when it is a scalar.
            A model that returns hidden states (``transformers.AutoModel``) needs one.

    Returns ``{layer name: int64 sorted unique flat indices}``, ready for
    ``fastpeft.inject(model, SparseConfig(selection="gradient", indices=result, ...))``.
    """
    if not isinstance(config, SparseConfig):
        raise TypeError(f"config must be a fastpeft.SparseConfig, got {type(config).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(output, batch) -> scalar, got {type(loss_fn).__name__}")
    scores = accumulate_squared_gradients(model, batches, config.target_modules, loss_fn)
    out = {}
    for name, score in scores.items():
        module = model.get_submodule(name)
        weight = module.weight.t() if _transposed(module) else module.weight  # [N, K], as the scores
        out[name] = select_sparse_indices(weight, config.density, "gradient", seed=config.seed, scores=score,
                                          block=config.block)
    return out
