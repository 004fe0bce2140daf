"""count_parameters only reads the model: merged layers (IA3 scales of 0 included) are accounted
without a merge/unmerge round trip, and the numbers match a float64 ground truth."""
import copy
import warnings

import pytest
import torch

import fastpeft
from fastpeft.nn.accounting import count_parameters


def _layer(scales, r=2, n=20, k=23, seed=0):
    """A LoRA + IA3(out) layer with the given ia3_out entries (row -> scale), trained-looking LoRA."""
    torch.manual_seed(seed)
    layer = fastpeft.PEFTLinear.from_linear(torch.nn.Linear(k, n), r=r, ia3="out")
    with torch.no_grad():
        layer.lora_B.normal_()
        for row, s in scales.items():
            layer.ia3_out[row] = s
    return layer


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_bitwise_same(module, before):
    after = module.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key].contiguous().view(torch.uint8), value.contiguous().view(torch.uint8)), key


def _exact_delta(layer, w0):
    """W' - W0 in float64 from the layer's adapter parameters (ground truth): DESIGN.md section 1."""
    w = w0.double()
    n, k = w.shape
    s_out = layer.ia3_out.detach().double() if layer.ia3_out is not None else torch.ones(n, dtype=torch.float64)
    s_in = layer.ia3_in.detach().double() if layer.ia3_in is not None else torch.ones(k, dtype=torch.float64)
    sparse = torch.zeros(n * k, dtype=torch.float64)
    if layer.sparse_value is not None:
        sparse[layer.sparse_index] = layer.sparse_value.detach().double()
    merged = s_out[:, None] * (w + sparse.view(n, k)) * s_in[None, :]
    if layer.lora_A is not None:
        merged = merged + layer.lora_scale * layer.lora_B.detach().double() @ layer.lora_A.detach().double()
    return merged - w


def test_merged_ia3_zero_scale_is_read_only_and_does_not_crash():
    layer = _layer({1: 0.0, 5: 1.7, 7: -0.4})
    w0 = layer.weight.detach().clone()
    pretrained = copy.deepcopy(layer.state_dict())
    layer.merge()
    before = _snapshot(layer)
    with pytest.warns(UserWarning, match="rank of .* unknown .*IA3 scales equal to 0.*pretrained="):
        report = count_parameters(layer)
    _assert_bitwise_same(layer, before)
    assert layer.merged and bool(torch.isfinite(layer.weight).all())
    n, k = w0.shape
    # three rows scaled (the zeroed one counted: its pre-trained entries are gone), LoRA touches every entry
    assert report["scaling"] == {"total": n, "trainable": n, "changed": 3 * k}
    assert report["adapter"]["changed"] == n * k
    assert report["weight"]["changed"] == 0 and report["bias"]["changed"] == 0
    assert report.ranks == {"": None} and "unknown" in str(report)
    # with the pre-trained weights the rank is known again, and equals the float64 ground truth
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = count_parameters(layer, pretrained=pretrained)
    _assert_bitwise_same(layer, before)
    assert exact.ranks == {"": int(torch.linalg.matrix_rank(_exact_delta(layer, w0)))} == {"": 5}
    assert exact["weight"]["changed"] == 0 and exact["bias"]["changed"] == 0  # merge is not in-place training
    assert exact["scaling"]["changed"] == 3 * k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_layer_counts_like_unmerged_and_is_untouched(dtype):
    """Nonzero (also tiny) scales, LoRA + IA3 in/out + sparse: merged accounting = unmerged accounting."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(23, 20), torch.nn.ReLU(), torch.nn.Linear(20, 9)).to(dtype)
    pretrained = copy.deepcopy(model.state_dict())
    fastpeft.inject(model, fastpeft.LoRAConfig(r=2, target_modules=["0"]))
    fastpeft.inject(model, fastpeft.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    fastpeft.inject(model, fastpeft.SparseConfig(density=0.05, target_modules=["2"]))
    with torch.no_grad():
        model[0].lora_B.normal_()
        model[0].ia3_out[:4] = torch.tensor([1.5, 1e-6, -2.0, 0.5])
        model[2].ia3_in[3:6] = torch.tensor([0.25, 3.0, 1e-5])
        model[2].sparse_value[:4] = torch.tensor([0.5, -1.0, 2.0, 0.125])
    unmerged = count_parameters(model, pretrained=pretrained)
    unmerged_plain = count_parameters(model)
    fastpeft.merge(model)
    before = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unreliable unmerge" warning: nothing is unmerged
        merged = count_parameters(model, pretrained=pretrained)
        merged_plain = count_parameters(model)
    _assert_bitwise_same(model, before)
    assert all(m.merged for m in model.modules() if isinstance(m, fastpeft.PEFTLinear))
    assert dict(merged) == dict(unmerged) and merged.ranks == unmerged.ranks
    assert dict(merged_plain) == dict(unmerged_plain) and merged_plain.ranks == unmerged_plain.ranks
    assert merged["weight"]["changed"] == 0 and merged["bias"]["changed"] == 0
    for name in ("0", "2"):  # float64 ground truth: W' - W0 from the pre-trained weight
        layer = model[int(name)]
        delta = _exact_delta(layer, pretrained[f"{name}.weight"])
        assert merged.ranks[name] == int(torch.linalg.matrix_rank(delta)), name
    assert merged.ranks["0"] == 4 + 2  # four scaled rows + rank-2 LoRA


def test_merged_bitfit_bias_counts_its_own_training():
    """A trained bias under a merged IA3(out) scale: only the entries training moved are counted."""
    layer = _layer({0: 1.5, 1: 2.0, 2: 0.0})
    layer.train_bias()
    with torch.no_grad():
        layer.bias[0] += 1.0
        layer.bias[4] -= 0.5
    layer.merge()
    before = _snapshot(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unknown-rank warning (zero scale) is tested above
        report = count_parameters(layer)
    _assert_bitwise_same(layer, before)
    # entries 0 and 4 moved; entry 2 was erased by the zero scale and the bias trains: upper bound
    assert report["bias"]["changed"] == 3


def test_non_finite_difference_is_reported_not_raised():
    layer = fastpeft.LoRALinear.from_linear(torch.nn.Linear(8, 6), r=2)
    with torch.no_grad():
        layer.lora_B.fill_(1.0)
        layer.lora_B[0, 0] = float("nan")
    ia3 = fastpeft.IA3Linear.from_linear(torch.nn.Linear(8, 6))
    with torch.no_grad():
        ia3.ia3_out[0] = float("inf")
    for module in (layer, ia3):
        before = _snapshot(module)
        with pytest.warns(UserWarning, match="non-finite"):
            report = count_parameters(module)
        assert report.ranks == {"": None}
        for key, value in before.items():
            assert torch.equal(module.state_dict()[key].nan_to_num(), value.nan_to_num()), key


def test_bad_arguments():
    layer = fastpeft.LoRALinear.from_linear(torch.nn.Linear(8, 6), r=2)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        count_parameters(layer.state_dict())
    with pytest.raises(TypeError, match="pretrained must be an nn.Module, a state_dict"):
        count_parameters(layer, pretrained=[("weight", layer.weight)])
    with pytest.raises(TypeError, match="ranks must be a bool"):
        count_parameters(layer, ranks="yes")


def test_merged_lora_ia3_weights_bitwise_untouched():
    """Ordinary scales: the old unmerge/merge round trip changed rounding bits of the merged weight."""
    torch.manual_seed(0)
    layer = fastpeft.PEFTLinear.from_linear(torch.nn.Linear(23, 20), r=2, ia3="out")
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.ia3_out.uniform_(0.5, 2.0)
    reference = count_parameters(layer)
    layer.merge()
    before = _snapshot(layer)
    for _ in range(3):
        report = count_parameters(layer)
        _assert_bitwise_same(layer, before)
    assert dict(report) == dict(reference) and report.ranks == reference.ranks


def test_meta_device_model_is_counted_not_crashed():
    """Counting trainable parameters of a model built on the meta device (no memory) works."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4))
    fastpeft.inject(model, fastpeft.LoRAConfig(r=2))
    with pytest.warns(UserWarning, match="meta device"):
        report = count_parameters(model)
    assert report["adapter"]["total"] == report["adapter"]["trainable"] == 2 * (8 + 6) + 2 * (6 + 4)
    assert report["weight"] == {"total": 8 * 6 + 6 * 4, "trainable": 0, "changed": 0}
    assert report["adapter"]["changed"] == 8 * 6 + 6 * 4  # upper bound: no values to look at
    assert report.ranks == {"0": None, "1": None}


def test_tied_trained_weight_is_counted_once():
    """A trainable weight shared by two layers counts its changed entries once, like its total."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 5)
    model = torch.nn.Sequential(lin, torch.nn.ReLU(), torch.nn.Linear(5, 5))
    model[2].weight = lin.weight
    with pytest.warns(UserWarning, match="tied"):
        fastpeft.inject(model, fastpeft.LoRAConfig(r=1, target_modules=["0", "2"]))
    pretrained = copy.deepcopy(model.state_dict())
    model[0].weight.requires_grad_(True)
    with torch.no_grad():
        model[0].weight[0, :3] += 1.0
    report = count_parameters(model, pretrained=pretrained)
    assert report["weight"]["total"] == 25 and report["weight"]["changed"] == 3
