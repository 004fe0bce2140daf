"""Choosing which entries of one weight a sparse delta trains (the sparse path's index).

Every selector returns flat row-major indices into a [N, K] weight: int64, sorted, unique, on
the weight's device, deterministic given the seed (and the scores).  The mask is fixed after
selection.

Selections:

- ``"random"``: a uniform sample of entries (or of blocks), from a generator seeded with ``seed``.
- ``"magnitude"``: the entries (blocks) with the largest |W|.
- ``"gradient"``: the entries (blocks) with the largest accumulated squared gradient, the
  diagonal empirical Fisher of FISH masks (Sung et al., 2021).  The scores come from
  ``fastpeft.select_sparse_by_gradient`` (fastpeft.methods.sparse_select), which runs a few user
  batches through the frozen model, or directly as ``scores=`` for one weight.

``block=b`` makes the mask block-structured for the kernels: the weight is tiled into b x b
blocks (the last block row / column is clipped when N or K is not a multiple of b) and whole
blocks are chosen, by their mean score, or uniformly for "random".  Density still counts
entries: the fewest top-ranked blocks whose entries reach ``ceil(density * N * K)``, so nnz
overshoots the target by less than one block.  Ties in scores are broken towards the lower
flat index (block index), so score-based selections do not depend on the device or on topk's
internal order.

On the meta device (deferred initialisation) a weight has no values: "random" selects as usual
(its indices never depend on the weight), and "magnitude"/"gradient" return a meta index of the
size the selection will have, or raise when that size depends on the values (blocks clipped at
the edges).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

SELECTIONS = ("random", "magnitude", "gradient")


def count_for_density(numel: int, density: float) -> int:
    """Number of entries for a density in (0, 1]: at least one, at most all."""
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a float in (0, 1], got {type(density).__name__}")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return min(numel, max(1, math.ceil(float(density) * numel)))


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- unstructured


def _random_subset(numel: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """A uniform sample of ``count`` distinct values of range(numel), sorted.

    Memory O(count), not O(numel): integers are drawn with replacement and the first ``count``
    distinct ones in draw order are kept (sequential sampling with rejection of repeats is
    uniform without replacement).  Dense samples use a permutation instead, which is cheaper
    once repeats would be common.
    """
    if 4 * count >= numel:
        return torch.randperm(numel, generator=gen)[:count].sort().values
    picked = torch.empty(0, dtype=torch.int64)
    while picked.numel() < count:
        need = count - picked.numel()
        drawn = torch.randint(0, numel, (need + need // 8 + 16,), generator=gen)
        cand = torch.cat([picked, drawn])
        uniq, inverse = torch.unique(cand, return_inverse=True)
        first = torch.full((uniq.numel(),), cand.numel(), dtype=torch.int64)
        first.scatter_reduce_(0, inverse, torch.arange(cand.numel()), reduce="amin")
        picked = cand[first.sort().values]  # distinct values, in order of first draw
    return picked[:count].sort().values


def _top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted flat indices of the ``count`` largest scores; ties go to the lower index.

    O(numel): topk finds the threshold, then every entry above it and the first entries equal
    to it are kept (topk alone picks among ties in an unspecified order).
    """
    flat = scores.reshape(-1)
    if count >= flat.numel():
        return torch.arange(flat.numel(), device=flat.device)
    threshold = torch.topk(flat, count, sorted=False).values.min()
    above = torch.nonzero(flat > threshold).squeeze(1)
    ties = torch.nonzero(flat == threshold).squeeze(1)[: count - above.numel()]
    return torch.cat([above, ties]).sort().values


# ----------------------------------------------------------------------------- blocks


def _block_grid(n: int, k: int, block: int):
    rows, cols = -(-n // block), -(-k // block)
    # entries per block: b*b inside, fewer in the clipped last block row / column
    height = torch.full((rows,), block, dtype=torch.int64)
    height[-1] = n - (rows - 1) * block
    width = torch.full((cols,), block, dtype=torch.int64)
    width[-1] = k - (cols - 1) * block
    return rows, cols, (height[:, None] * width[None, :]).reshape(-1)


def _block_scores(scores: torch.Tensor, block: int, sizes: torch.Tensor) -> torch.Tensor:
    """Mean score of each b x b block (clipped blocks average over their own entries)."""
    n, k = scores.shape
    rows, cols = -(-n // block), -(-k // block)
    padded = torch.nn.functional.pad(scores, (0, cols * block - k, 0, rows * block - n))
    sums = padded.reshape(rows, block, cols, block).sum(dim=(1, 3), dtype=torch.float64).reshape(-1)
    return sums / sizes.to(device=sums.device, dtype=torch.float64)


def _blocks_to_indices(chosen: torch.Tensor, n: int, k: int, block: int, cols: int) -> torch.Tensor:
    """Sorted flat indices of every entry inside the chosen blocks (edge blocks clipped)."""
    offsets = torch.arange(block, device=chosen.device)
    row = (chosen // cols)[:, None, None] * block + offsets[None, :, None]
    col = (chosen % cols)[:, None, None] * block + offsets[None, None, :]
    inside = (row < n) & (col < k)
    return (row * k + col)[inside].sort().values


def _fewest_blocks(order: torch.Tensor, sizes: torch.Tensor, count: int) -> torch.Tensor:
    """The shortest prefix of ``order`` (block ids, best first) holding at least ``count`` entries."""
    held = torch.cumsum(sizes[order.cpu()], 0)
    take = int(torch.searchsorted(held, torch.tensor(count, dtype=torch.int64))) + 1
    return order[:take]


# ----------------------------------------------------------------------------- public


def select_sparse_indices(weight: torch.Tensor, density: Optional[float], selection: str = "magnitude",
                          seed: int = 0, scores: Optional[torch.Tensor] = None, block: Optional[int] = None,
                          count: Optional[int] = None) -> torch.Tensor:
    """Flat row-major indices of the entries of ``weight`` [N, K] to train (int64, sorted, unique).

    Args:
        weight: the frozen [N, K] weight (read for "magnitude", its shape and device otherwise).
        density: fraction of entries in (0, 1]; ``ceil(density * N * K)`` entries, at least one.
        selection: "random", "magnitude" or "gradient" (see the module docstring).
        seed: seeds "random" (a CPU generator, so the mask is the same on every device).
        scores: [N, K] non-negative importance per entry, required by (and only used by)
            "gradient": the accumulated squared gradients, see ``fastpeft.select_sparse_by_gradient``.
        block: b for a b x b block-structured mask; whole blocks are chosen, by mean score.
        count: number of entries instead of ``density`` (pass ``density=None``).

    Returns an int64 tensor on ``weight``'s device.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {list(weight.shape)}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    n, k = weight.shape
    if n * k == 0:
        raise ValueError(f"weight has no entries to select (shape {list(weight.shape)})")
    if count is not None:
        if density is not None:
            raise ValueError("give either density or count, not both")
        count = _check_int("count", count, 1)
        if count > n * k:
            raise ValueError(f"count must be at most N*K = {n * k} for a [{n}, {k}] weight, got {count}")
    else:
        if density is None:
            raise ValueError("density must be given (a float in (0, 1]) unless count is")
        count = count_for_density(n * k, density)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if block is not None:
        block = _check_int("block", block, 1)

    if selection == "gradient":
        if scores is None:
            raise ValueError("selection='gradient' needs scores, the accumulated squared gradients of this "
                             "weight: use fastpeft.select_sparse_by_gradient(model, batches, config) and pass its "
                             "result as SparseConfig(indices=...) or add_sparse(index=...)")
        if not isinstance(scores, torch.Tensor):
            raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
        if tuple(scores.shape) != (n, k):
            raise ValueError(f"scores must have the weight's shape [{n}, {k}], got {list(scores.shape)}")
        if not scores.is_floating_point():
            raise TypeError(f"scores must be a floating tensor, got {scores.dtype}")
    elif scores is not None:
        raise ValueError(f"scores is only used by selection='gradient', not {selection!r}")
    source = scores if selection == "gradient" else weight if selection == "magnitude" else None
    if source is not None and source.device.type == "meta":
        # No values to rank (deferred initialisation): a meta index of the size the selection will have.
        return torch.empty(_value_free_count(n, k, count, block, selection), dtype=torch.int64, device=weight.device)
    # Where the selection runs: the weight's device, or the scores' (CPU for "random") for a meta weight.
    if weight.device.type != "meta":
        work = weight.device
    else:
        work = source.device if source is not None else torch.device("cpu")
    if source is not None:
        score = source.detach().to(device=work, dtype=torch.float32)
        if source is weight:
            score = score.abs()
        if bool(torch.isnan(score).any()):
            raise ValueError("scores contain NaN (did the loss overflow?)" if source is scores
                             else "weight contains NaN; magnitude selection is undefined")
    else:
        score = None

    gen = torch.Generator(device="cpu").manual_seed(seed)
    if block is None:
        if score is None:
            idx = _random_subset(n * k, count, gen)
        else:
            idx = _top_indices(score, count)
    else:
        rows, cols, sizes = _block_grid(n, k, block)
        if score is None:
            order = torch.randperm(rows * cols, generator=gen)
        else:
            # best block first, ties to the lower block id (stable sort)
            order = torch.sort(_block_scores(score, block, sizes), descending=True, stable=True).indices
        chosen = _fewest_blocks(order, sizes, count).to(work)
        idx = _blocks_to_indices(chosen, n, k, block, cols)
    return idx.to(device=weight.device, dtype=torch.int64)


def _value_free_count(n: int, k: int, count: int, block: Optional[int], selection: str) -> int:
    """nnz of a score-based selection without looking at the scores, or a ValueError when it depends on them."""
    if block is None:
        return count
    if n % block == 0 and k % block == 0:  # every block holds block² entries
        return -(-count // (block * block)) * block * block
    raise ValueError(f"the weight is on the meta device (it has no values), and how many entries {selection!r} "
                     f"selection with block={block} picks depends on them when the shape [{n}, {k}] is not a "
                     "multiple of the block: pass the indices (index= / SparseConfig(indices=...)), use "
                     "selection='random', or select on the materialised weight")
