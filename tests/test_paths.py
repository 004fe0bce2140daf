"""The PEFT path seam (fastpeft.paths), checked for every registered path and their combinations.

Ground truth is the op itself: ``fastpeft.reference.peft_linear`` in float64 with the layer's own
arguments.  A path's one merged-weight formula (``apply``, in PATHS order, with ``bias_scale``)
must reproduce it, its inverse must undo it, its closed forms must equal the dense ΔW, and the
layer's generated forward call must pass exactly the path's op keywords.  Nothing here names a
path: a new one is covered by its ``example`` (from_linear keywords) alone.
"""
from __future__ import annotations

import copy
import inspect
import io
import itertools

import pytest
import torch
import torch.nn as nn

import fastpeft
import fastpeft.nn.modules as modules
from fastpeft.core import spec
from fastpeft.paths import PATHS, Rounding, merged_rows, weight_paths
from fastpeft.paths.base import finite_rank, measure


def compatible(paths) -> bool:
    """No path of ``paths`` excludes another (``Path.excludes``: e.g. DoRA is never combined with IA3)."""
    names = {p.name for p in paths}
    return not any(names & set(p.excludes) for p in paths)


def widest(paths) -> tuple:
    """PATHS in order, each kept when it combines with those kept before it."""
    kept = ()
    for p in paths:
        kept += (p,) * compatible(kept + (p,))
    return kept


COMBOS = [(p,) for p in PATHS] + [widest(PATHS), widest(reversed(PATHS))[::-1]] + [
    c for c in itertools.combinations(PATHS, 2) if compatible(c)]
IDS = ["+".join(p.name for p in c) for c in COMBOS]


def layer_with(paths, n=13, k=11, seed=0, dtype=torch.float64):
    """A layer with ``paths`` (their examples), every trainable tensor moved off its identity init."""
    torch.manual_seed(seed)
    lin = nn.Linear(k, n).to(dtype)
    options = {key: value for p in paths for key, value in p.example.items()}
    layer = fastpeft.PEFTLinear.from_linear(lin, **options)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer.eval()


def op_kwargs(layer):
    kw = {}
    for path in layer.paths:
        path.op_kwargs(layer, kw)
    return kw


def reference(layer, x):
    return fastpeft.reference.peft_linear(x, layer.weight, layer.bias, **op_kwargs(layer))


def merged_weight(layer):
    w = merged_rows(layer, layer.weight.detach().double().clone(), slice(0, layer.out_features))
    b = layer.bias.detach().double() if layer.bias is not None else None
    for path in weight_paths(layer):
        scale = path.bias_scale(layer)
        if scale is not None and b is not None:
            b = b * scale.detach().double()
    return w, b


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def test_paths_are_the_ops_arguments_and_every_spec_path_is_registered():
    """A path's tensors are keywords of fastpeft.peft_linear (the layer's attributes are named after
    them); every path of the op's spec (fastpeft.core.spec) has its path module in PATHS."""
    keywords = set(inspect.signature(fastpeft.peft_linear).parameters)
    for path in PATHS:
        assert set(path.tensors) <= keywords and set(path.buffers) <= set(path.tensors), path
        assert set(path.categories) <= set(path.tensors) and path.example, path
        rows = {a.name for a in spec.TENSORS if a.path == path.name}
        assert rows & set(path.tensors) == rows & keywords, path  # its public spec rows are its tensors
    missing = {a.path for a in spec.TENSORS} - {"base"} - {p.name for p in PATHS}
    assert not missing, f"spec paths without a path module in fastpeft.paths.PATHS: {sorted(missing)}"


@pytest.mark.parametrize("paths", COMBOS, ids=IDS)
def test_one_formula_is_the_op(paths):
    """x W'ᵀ + b' from the paths' merged-weight formula equals the op's reference output (float64),
    and the formula on row blocks is the formula on the whole weight."""
    layer = layer_with(paths)
    x = torch.randn(7, layer.in_features, dtype=torch.float64)
    w, b = merged_weight(layer)
    y = x @ w.t() + (b if b is not None else 0)
    assert rel(y, reference(layer, x)) < 1e-12
    w0 = layer.weight.detach().double()
    blocks = [merged_rows(layer, w0[i:i + 4].clone(), slice(i, min(i + 4, layer.out_features)))
              for i in range(0, layer.out_features, 4)]
    assert rel(torch.cat(blocks), w) < 1e-14
    assert rel(layer.delta_weight(), w - w0) < 1e-6 or not weight_paths(layer)


@pytest.mark.parametrize("paths", COMBOS, ids=IDS)
def test_merge_unmerge_and_the_accounting_inverse(paths):
    layer = layer_with(paths)
    x = torch.randn(5, layer.in_features, dtype=torch.float64)
    y = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()  # merge and unmerge compute in fp32 (documented): fp32 rounding
    assert rel(layer(x), y) < 1e-6
    merged = layer.weight.detach().clone()
    bound = Rounding(merged.double())
    undone = merged.double()
    for path in reversed(weight_paths(layer)):  # out of place: the merged layer is not touched
        undone = path.invert(layer, undone, bound)
    assert torch.equal(layer.weight, merged) and (bound.known is None or bool(bound.known.all()))
    assert rel(undone, w0) < 1e-6 and bool(((undone - w0).abs() <= 8 * 2.0 ** -23 * bound.err + 1e-12).all())
    layer.unmerge()
    assert rel(layer.weight, w0) < 1e-6 and rel(layer(x), y) < 1e-6


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_closed_forms_equal_the_dense_difference(path):
    layer = layer_with((path,))
    if not path.changes_weight:
        assert not weight_paths(layer)
        return
    delta = (merged_weight(layer)[0] - layer.weight.double()).detach()  # float64 (delta_weight is fp32)
    rank = path.rank_alone(layer)
    assert rank is NotImplemented or rank == finite_rank(delta)
    for kind in ("l2", "l1"):
        closed = path.penalty_alone(layer, kind, torch.float64)
        closed = closed.detach() if closed is not NotImplemented else closed
        assert closed is NotImplemented or abs(float(closed) - float(measure(delta, kind))) <= 1e-9 * float(
            measure(delta, kind))
    changed = path.changed(layer, lambda: type("Pre", (), {"weight": layer.weight.detach(), "w_tol": None,
                                                           "w_known": None})())
    assert 0 < changed <= path.max_changed(layer)
    report = fastpeft.count_parameters(layer)
    assert report[path.category]["changed"] == changed and report.ranks[""] == finite_rank(delta)


@pytest.mark.parametrize("paths", COMBOS, ids=IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_passes_exactly_the_paths_op_keywords(paths, training, monkeypatch):
    layer = layer_with(paths).train(training)
    seen = {}

    def spy(x, weight, bias, **kw):
        seen.update(kw, weight=weight, bias=bias)
        return x

    monkeypatch.setattr(modules, "peft_linear", spy)
    layer(torch.randn(2, layer.in_features, dtype=torch.float64))
    expected = {**op_kwargs(layer), "weight": layer.weight, "bias": layer.bias, "backend": layer.backend}
    assert seen.keys() == expected.keys()
    assert all(seen[k] is expected[k] or seen[k] == expected[k] for k in expected)


def test_setting_a_path_attribute_updates_the_forward_call():
    layer = layer_with(widest(PATHS))
    x = torch.randn(3, layer.in_features, dtype=torch.float64)
    for path in weight_paths(layer):
        saved = {t: getattr(layer, t) for t in path.slots}
        for t in path.slots:
            setattr(layer, t, None)
        assert path not in layer.paths
        assert rel(layer(x), reference(layer, x)) < 1e-12  # the op no longer gets the path's tensors
        for t, value in saved.items():
            setattr(layer, t, value)
        assert rel(layer(x), reference(layer, x)) < 1e-12


@pytest.mark.parametrize("paths", [widest(PATHS), widest(reversed(PATHS))[::-1]], ids=["first", "last"])
def test_copies_and_pickles_keep_the_paths(paths):
    layer = layer_with(paths)
    x = torch.randn(3, layer.in_features, dtype=torch.float64)
    buf = io.BytesIO()
    torch.save(layer, buf)
    for other in (copy.deepcopy(layer), torch.load(io.BytesIO(buf.getvalue()), weights_only=False)):
        assert [p.name for p in other.paths] == [p.name for p in layer.paths]
        assert all(a is b for a, b in zip(other.paths, layer.paths))  # the registered objects themselves
        assert torch.equal(other(x), layer(x))


def test_from_linear_rejects_keywords_no_path_takes():
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['rank'\\]"):
        fastpeft.PEFTLinear.from_linear(nn.Linear(3, 3), rank=2)
