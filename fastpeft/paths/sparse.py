"""Sparse fine-tuning: a trainable delta on a fixed set of the frozen weight's entries.

    W_eff = W + S,   S = scatter(sparse_value at sparse_index) [N, K]
    sparse_index: int64 [nnz] flat row-major indices into W, sorted, unique (a buffer, fixed)
    sparse_value: [nnz] trainable, starts at 0

The index comes from ``select_sparse_indices`` (fastpeft.paths.sparse_index: random, magnitude,
or gradient scores; optionally b x b blocks) or is given.  It is validated once, when the layer
is built (``mark_validated``: the op then skips the per-call value checks for it).  On the meta
device the index is a meta tensor of the selection's size, ready for ``to_empty`` +
``load_state_dict``.  Closed form alone: ‖S‖² = Σ v², ‖S‖₁ = Σ |v|.  peft has no format for it.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastpeft.core.validation import check_sparse, mark_validated
from fastpeft.paths.base import Path, adapter_dtype, check_addable, measure, new_param, random_tensor
from fastpeft.paths.sparse_index import select_sparse_indices


def _row_range(layer, rows: slice):
    """(index, values) of the entries inside ``rows``, indices relative to the block's first row."""
    idx, vals = layer.sparse_index, layer.sparse_value
    if rows.start == 0 and rows.stop >= layer.out_features:
        return idx, vals
    k = layer.in_features
    bounds = torch.tensor([rows.start * k, rows.stop * k], device=idx.device)
    lo, hi = torch.searchsorted(idx, bounds).tolist()
    return idx[lo:hi] - rows.start * k, vals[lo:hi]


class SparsePath(Path):
    name = "sparse"
    label = "sparse delta"
    tensors = ("sparse_index", "sparse_value")
    buffers = ("sparse_index",)
    categories = {"sparse_value": "sparse"}
    category = "sparse"
    attrs = {"sparse_density": None, "sparse_selection": None, "sparse_block": None}
    bench_cases = {"sparse": "sparse"}
    combined_case = "sparse"
    peft_names = ("shira_",)

    def present(self, layer) -> bool:
        return layer.sparse_value is not None

    linear_keywords = ("density", "selection", "block", "seed")
    example = {"density": 0.3, "selection": "random", "seed": 1}

    def linear_options(self, kw: dict) -> Optional[dict]:
        if kw["density"] is None:
            return None
        return dict(density=kw["density"], selection=kw["selection"], block=kw["block"], seed=kw["seed"])

    def parts(self, layer, density: float = 0.01, selection: str = "magnitude", block: Optional[int] = None,
              seed: int = 0, index: Optional[torch.Tensor] = None) -> dict:
        check_addable(layer, self, "add a sparse delta")
        if layer.sparse_value is not None:
            raise ValueError("this layer already has a sparse delta")
        if index is None:
            weight = layer.weight_nk  # [N, K] (a view for a transposed Conv1D base)
            if not isinstance(weight, torch.Tensor):  # a quantized base: magnitudes of its dequantized values
                weight = weight.dequantize() if selection == "magnitude" else \
                    torch.empty((), dtype=weight.dtype, device=weight.device).expand(*weight.shape)
            index = select_sparse_indices(weight, density, selection, seed=seed, block=block)
        elif not isinstance(index, torch.Tensor):
            raise TypeError(f"index must be a torch.Tensor of flat indices or None, got {type(index).__name__}")
        elif index.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"index must be an int64 (or int32) tensor, got {index.dtype}")
        index = index.to(device=layer.weight.device, dtype=torch.int64)
        n_values = index.shape[0] if index.dim() == 1 else 0  # check_sparse rejects other shapes
        values = new_param(layer, torch.zeros(n_values, dtype=adapter_dtype(layer.weight), device=index.device))
        parts = self.adopt(layer, sparse_index=index, sparse_value=values)
        return {**parts, "sparse_density": density, "sparse_selection": selection, "sparse_block": block}

    def adopt(self, layer, sparse_index: torch.Tensor, sparse_value: torch.Tensor) -> dict:
        check_addable(layer, self, "add a sparse delta")
        meta = sparse_index.device.type == "meta"  # meta tensors have no values to check (only shapes)
        check_sparse(sparse_index, sparse_value, layer.out_features, layer.in_features, check_values=False)
        if not meta and not sparse_index.is_inference():
            mark_validated(sparse_index, layer.out_features, layer.in_features)  # checks the values, once
        elif not meta:
            check_sparse(sparse_index, sparse_value, layer.out_features, layer.in_features)
        return {"sparse_index": sparse_index, "sparse_value": sparse_value}


    def extra_repr(self, layer) -> list[str]:
        return [f"nnz={layer.sparse_value.numel()}"]

    # ------------------------------------------------------------------ the merged weight: W + S
    def apply(self, layer, w, rows, inplace=False):
        idx, vals = _row_range(layer, rows)
        if inplace:
            w.view(-1).index_add_(0, idx, vals.to(w.dtype))
            return w
        return w.reshape(-1).index_add(0, idx, vals.to(w.dtype)).view(w.shape)

    def invert(self, layer, w, bound=None):
        vals = layer.sparse_value.detach().to(w.dtype)
        if bound is None:
            w.view(-1).index_add_(0, layer.sparse_index, -vals)
            return w
        sparse = w.new_zeros(w.numel()).index_add_(0, layer.sparse_index, vals).view(w.shape)
        bound.err = bound.err + sparse.abs()
        return w - sparse

    # ------------------------------------------------------------------ accounting and penalty
    def changed(self, layer, pre) -> int:
        return int(torch.count_nonzero(layer.sparse_value.detach()))

    def max_changed(self, layer) -> int:
        return layer.sparse_value.numel()

    def penalty_alone(self, layer, kind, dtype):
        return measure(layer.sparse_value.to(dtype), kind)

    # ------------------------------------------------------------------ cases
    def random_args(self, case, weight, settings, gen) -> dict:
        index = select_sparse_indices(weight, settings.density, "magnitude", block=settings.block)
        return {"sparse_index": index, "sparse_value": random_tensor(weight, gen, index.numel(), scale=0.02)}

    def peft_twin(self, case, weight, args, settings, wrap, target):
        import peft

        if not hasattr(peft, "ShiraConfig") or settings.block is not None:
            return None  # SHiRA, peft's sparse method: unstructured masks only
        n, k = weight.shape
        index = args["sparse_index"]
        # SHiRA's r sets nnz = r (K + N); ours is then swapped in so both train the same entries.
        layer = wrap(peft.ShiraConfig(r=max(1, index.numel() // (k + n)), target_modules=[target]))
        rows = torch.div(index, k, rounding_mode="floor")
        layer.shira_indices["default"] = torch.stack([rows, index - rows * k]).to(weight.device)
        layer.shira_weight["default"] = torch.nn.Parameter(args["sparse_value"].detach().clone())
        layer.scaling["default"] = 1.0
        return layer, {"sparse_value": layer.shira_weight["default"]}, True


SPARSE = SparsePath()
