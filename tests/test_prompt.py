"""Prompt and prefix tuning on the real MiniLM, against an independent float64 BERT forward."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from fastpeft.methods.prompt import PrefixTuning, PromptTuning, extend_attention_mask
from fastpeft.nn.accounting import count_parameters
from fastpeft.tools.equivalence import rel_err

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def minilm():
    from fastpeft.tools.minilm import load_minilm

    model, tokenizer = load_minilm()
    batch = tokenizer(["prefix tuning on a real model", "short one"], padding=True, return_tensors="pt")
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # the batch has padding
    return model, tokenizer, batch


def bert_reference(model, input_ids, attention_mask, prefix=None, prompt=None):
    """BERT's forward (eval mode) written out from its weights; optional per-layer prefixes
    [layers, 2, heads, n, head_dim] or input-level virtual tokens [n, H]."""
    emb = model.embeddings
    cfg = model.config
    heads, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    x = emb.word_embeddings.weight[input_ids]
    mask = attention_mask.bool()
    if prompt is not None:
        x = torch.cat([prompt.to(x.dtype).expand(x.shape[0], -1, -1), x], 1)
        mask = torch.cat([mask.new_ones(x.shape[0], prompt.shape[0]), mask], 1)
    b, length, _ = x.shape
    x = x + emb.position_embeddings.weight[:length] + emb.token_type_embeddings.weight[0]

    def ln(t, mod):
        return F.layer_norm(t, t.shape[-1:], mod.weight, mod.bias, mod.eps)

    def lin(t, mod):
        return t @ mod.weight.t() + mod.bias

    x = ln(x, emb.LayerNorm)
    for i, layer in enumerate(model.encoder.layer):
        sa = layer.attention.self
        q, k, v = (lin(x, m).view(b, length, heads, hd).transpose(1, 2) for m in (sa.query, sa.key, sa.value))
        key_mask = mask
        if prefix is not None:
            k = torch.cat([prefix[i, 0].to(k.dtype).expand(b, -1, -1, -1), k], 2)
            v = torch.cat([prefix[i, 1].to(v.dtype).expand(b, -1, -1, -1), v], 2)
            key_mask = torch.cat([mask.new_ones(b, prefix.shape[3]), mask], 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, length, -1)
        a = ln(lin(ctx, layer.attention.output.dense) + x, layer.attention.output.LayerNorm)
        inter = F.gelu(lin(a, layer.intermediate.dense))
        x = ln(lin(inter, layer.output.dense) + a, layer.output.LayerNorm)
    return x


def _close_on_tokens(out, ref, mask, tol):
    keep = mask.bool()
    err = (out[keep] - ref[keep]).norm() / ref[keep].norm()
    assert float(err) < tol, float(err)


def test_reference_matches_transformers(minilm):
    """The written-out forward is BERT (so it can judge the wrappers)."""
    model, _, batch = minilm
    with torch.no_grad():
        out = model(**batch).last_hidden_state
        ref = bert_reference(model, batch["input_ids"], batch["attention_mask"])
    _close_on_tokens(out, ref, batch["attention_mask"], 1e-5)


# ----------------------------------------------------------------------------- prompt tuning
def test_prompt_from_vocabulary_equals_real_tokens(minilm):
    model, tokenizer, batch = minilm
    ids = tokenizer("classify this", add_special_tokens=False)["input_ids"]
    pt = PromptTuning(copy.deepcopy(model), 5, init=ids)
    wanted = torch.tensor((ids * 5)[:5])  # repeated to fill n, like peft
    assert torch.equal(pt.prompt.detach(), model.embeddings.word_embeddings.weight[wanted])
    with torch.no_grad():
        out = pt(**batch).last_hidden_state
        # the same computation as real tokens in front of the input
        ids_in = torch.cat([wanted.expand(2, -1), batch["input_ids"]], 1)
        mask_in = torch.cat([torch.ones(2, 5, dtype=torch.long), batch["attention_mask"]], 1)
        real = model(input_ids=ids_in, attention_mask=mask_in).last_hidden_state[:, 5:]
        ref = bert_reference(model, batch["input_ids"], batch["attention_mask"], prompt=pt.prompt)[:, 5:]
    assert out.shape == batch["input_ids"].shape + (384,)  # virtual positions dropped
    _close_on_tokens(out, real, batch["attention_mask"], 1e-5)
    _close_on_tokens(out, ref, batch["attention_mask"], 1e-5)
    # text init through the tokenizer gives the same prompt
    same = PromptTuning(model, 5, init="classify this", tokenizer=tokenizer, freeze_model=False)
    assert torch.equal(same.prompt, pt.prompt)


def test_prompt_training_touches_only_the_prompt(minilm):
    model, _, batch = minilm
    torch.manual_seed(0)
    pt = PromptTuning(copy.deepcopy(model), 4, keep_virtual_outputs=True)
    assert [n for n, p in pt.named_parameters() if p.requires_grad] == ["prompt"]
    assert "token_type_ids" in batch  # extended with zeros for the virtual tokens
    out = pt(**batch)
    assert out.last_hidden_state.shape[1] == batch["input_ids"].shape[1] + 4
    report = count_parameters(pt, ranks=False)
    assert report["prompt"] == {"total": 4 * 384, "trainable": 4 * 384, "changed": 0}
    twin = copy.deepcopy(pt)  # a copy keeps the baseline of count_parameters' "changed"
    assert count_parameters(twin, ranks=False)["prompt"]["changed"] == 0
    out.last_hidden_state.square().mean().backward()
    assert pt.prompt.grad is not None and pt.prompt.grad.abs().sum() > 0
    torch.optim.SGD([pt.prompt], lr=1.0).step()
    assert count_parameters(pt, ranks=False)["prompt"]["changed"] > 0


def test_prompt_bad_input(minilm):
    model, tokenizer, batch = minilm
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int, got 0"):
        PromptTuning(model, 0, freeze_model=False)
    with pytest.raises(ValueError, match="vocabulary size"):
        PromptTuning(model, 2, init=[5, 10**6], freeze_model=False)
    with pytest.raises(ValueError, match="tokenizer"):
        PromptTuning(model, 2, init="some words", freeze_model=False)
    with pytest.raises(TypeError, match="get_input_embeddings"):
        PromptTuning(torch.nn.Linear(2, 2), 2)
    pt = PromptTuning(model, 2, freeze_model=False)
    with pytest.raises(ValueError, match="exactly one"):
        pt()
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        pt(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"][:, :3])
    with pytest.raises(ValueError, match="position_ids"):
        pt(**batch, position_ids=torch.arange(batch["input_ids"].shape[1])[None])


# ----------------------------------------------------------------------------- prefix tuning
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefix_equals_reference_float64(minilm, attn):
    model, _, batch = minilm
    torch.manual_seed(1)
    m64 = copy.deepcopy(model).double()
    m64.set_attn_implementation(attn)
    pt = PrefixTuning(m64, 3, init_std=0.5)
    assert pt.num_layers == 6 and (pt.kv_heads, pt.head_dim) == (12, 32)
    states = pt.prefix_states()
    assert states.shape == (6, 2, 12, 3, 32) and states.dtype == torch.float64
    with torch.no_grad():
        out = pt(**batch).last_hidden_state
        ref = bert_reference(m64, batch["input_ids"], batch["attention_mask"], prefix=states)
        plain = bert_reference(m64, batch["input_ids"], batch["attention_mask"])
    _close_on_tokens(out, ref, batch["attention_mask"], 1e-10)
    assert float((out - plain).abs().max()) > 1e-3  # the prefixes do change the output
    with torch.no_grad():  # the bare model, called directly, is untouched by the hooks
        _close_on_tokens(m64(**batch).last_hidden_state, plain, batch["attention_mask"], 1e-10)


def test_prefix_padding_and_reparameterisation(minilm):
    model, tokenizer, batch = minilm
    torch.manual_seed(2)
    pt = PrefixTuning(copy.deepcopy(model), 4, reparameterize=True, encoder_hidden_size=32, init_std=1.0)
    trainable = {n for n, p in pt.named_parameters() if p.requires_grad}
    assert trainable == {"prefix", "mlp_in_weight", "mlp_in_bias", "mlp_out_weight", "mlp_out_bias"}
    out = pt(**batch).last_hidden_state
    # a padded row equals the same sentence run alone: the extended mask hides the padding
    alone = tokenizer(["short one"], return_tensors="pt")
    n = alone["input_ids"].shape[1]
    with torch.no_grad():
        single = pt(**alone).last_hidden_state
    assert float((out[1, :n].detach() - single[0]).abs().max()) < 1e-4
    with torch.no_grad():
        ref = bert_reference(pt.model, batch["input_ids"], batch["attention_mask"], prefix=pt.prefix_states())
    _close_on_tokens(out.detach(), ref, batch["attention_mask"], 1e-5)
    out.square().mean().backward()
    assert all(getattr(pt, name).grad is not None for name in trainable)
    report = count_parameters(pt, ranks=False)
    assert report["prompt"]["trainable"] == 4 * 384 + 32 * 384 + 32 + 6 * 2 * 384 * 32 + 6 * 2 * 384
    assert report["prompt"]["trainable"] == sum(p.numel() for p in pt.parameters() if p.requires_grad)


def test_prefix_bad_input(minilm):
    model, _, _ = minilm
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int, got 0"):
        PrefixTuning(model, 0)
    with pytest.raises(TypeError, match="no attention module"):
        PrefixTuning(torch.nn.Sequential(torch.nn.Linear(3, 3)), 2)
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        PrefixTuning(copy.deepcopy(model), 2, reparameterize=True, encoder_hidden_size=0)
    with pytest.raises(ValueError, match="4-D"):
        extend_attention_mask(torch.ones(2, 5), 3)
    m = torch.zeros(1, 1, 2, 2)
    assert extend_attention_mask(m, 3).shape == (1, 1, 2, 5)
    assert float(extend_attention_mask(m, 3)[..., :3].abs().max()) == 0
    b = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    assert bool(extend_attention_mask(b, 2)[..., :2].all()) and not bool(extend_attention_mask(b, 2)[..., 2:].any())
    assert extend_attention_mask(None, 3) is None


def test_prompt_extends_mask_types_and_labels():
    """What the wrapped model receives: virtual embeddings first, mask ones, type ids 0, labels -100."""

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)

        def get_input_embeddings(self):
            return self.emb

        def forward(self, inputs_embeds, attention_mask, token_type_ids=None, labels=None):
            self.seen = (inputs_embeds, attention_mask, token_type_ids, labels)
            return inputs_embeds.sum()

    rec = Recorder()
    pt = PromptTuning(rec, 3, init=[7, 8])
    ids = torch.tensor([[1, 2, 0], [3, 4, 5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    pt(input_ids=ids, attention_mask=mask, token_type_ids=torch.ones_like(ids), labels=ids)
    embeds, m, tt, labels = rec.seen
    assert torch.equal(embeds[:, :3], rec.emb.weight[[7, 8, 7]].expand(2, -1, -1))
    assert torch.equal(embeds[:, 3:], rec.emb(ids))
    assert torch.equal(m, torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], 1))
    assert torch.equal(tt, torch.cat([torch.zeros(2, 3, dtype=ids.dtype), torch.ones_like(ids)], 1))
    assert torch.equal(labels, torch.cat([torch.full((2, 3), -100), ids], 1))


# ----------------------------------------------------------------------------- checkpointing, copies
def _train_without_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.train()


def _enable_checkpointing(model, reentrant):
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


@pytest.mark.parametrize("reparameterize", [False, True])
@pytest.mark.parametrize("mode", ["reentrant", "reentrant-frozen-inputs", "non-reentrant"])
def test_prefix_trains_under_gradient_checkpointing(minilm, mode, reparameterize):
    """Recomputed layers see the prefixes: gradients equal the float64 written-out BERT's.
    frozen-inputs: no embedding hook making the layer inputs require grad (reentrant needs one)."""
    model, _, batch = minilm
    torch.manual_seed(5)
    m64 = _train_without_dropout(copy.deepcopy(model).double())
    pt = PrefixTuning(m64, 3, reparameterize=reparameterize, encoder_hidden_size=16, init_std=0.5)
    _enable_checkpointing(m64, reentrant=mode != "non-reentrant")
    if mode == "reentrant-frozen-inputs":
        m64.disable_input_require_grads()
    layers = list(m64.encoder.layer)
    funcs = [layer._gradient_checkpointing_func for layer in layers]
    assert all(layer.gradient_checkpointing for layer in layers)
    keep = batch["attention_mask"].bool()
    out = pt(**batch).last_hidden_state
    out[keep].square().mean().backward()
    assert [layer._gradient_checkpointing_func for layer in layers] == funcs  # the model is left as it was
    params = [p for p in pt.parameters() if p.requires_grad]
    assert params and all(p.grad is not None for p in params)
    ref = bert_reference(m64, batch["input_ids"], batch["attention_mask"], prefix=pt.prefix_states())
    _close_on_tokens(out.detach(), ref.detach(), batch["attention_mask"], 1e-10)
    want = torch.autograd.grad(ref[keep].square().mean(), params)
    for p, g in zip(params, want):
        assert float((p.grad - g).norm() / g.norm()) < 1e-9
    # and the prefixes train: one step moves the output
    torch.optim.SGD(params, lr=10.0).step()
    with torch.no_grad():
        after = pt(**batch).last_hidden_state
    assert float((after - out.detach())[keep].abs().max()) > 1e-4


def test_prefix_refuses_checkpointing_it_cannot_see(minilm):
    """Reentrant checkpointing called by a model directly would recompute without the prefix: refused."""
    model, _, batch = minilm

    class Direct(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert, self.config = bert, bert.config
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            def run(scale):
                return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state * scale
            return torch.utils.checkpoint.checkpoint(run, self.scale, use_reentrant=True)

    pt = PrefixTuning(Direct(copy.deepcopy(model)), 2, freeze_model=False)
    with pytest.raises(RuntimeError, match="gradients disabled.*checkpointing.*gradient_checkpointing_enable.*wrapper as a whole"):
        pt(**batch)
    with torch.no_grad():  # without gradients nothing is recomputed: fine
        pt(**batch)
    assert pt._active is None or not pt._active


@pytest.mark.parametrize("reparameterize", [False, True])
def test_prefix_deepcopy_and_pickle_carry_the_prefixes(minilm, tmp_path, reparameterize):
    """EMA / best-model copies and torch.save: the copy has its own prefixes, hooks and training."""
    model, _, batch = minilm
    torch.manual_seed(6)
    pt = PrefixTuning(copy.deepcopy(model), 3, reparameterize=reparameterize, encoder_hidden_size=16, init_std=0.5)
    keep = batch["attention_mask"]
    with torch.no_grad():
        out = pt(**batch).last_hidden_state
    torch.save(pt, tmp_path / "pt.pt")
    loaded = torch.load(tmp_path / "pt.pt", weights_only=False)
    for other in (copy.deepcopy(pt), loaded):
        assert other.prefix is not pt.prefix and torch.equal(other.prefix, pt.prefix)
        assert count_parameters(other, ranks=False)["prompt"]["changed"] == 0  # its initial values came along
        with torch.no_grad():
            same = other(**batch).last_hidden_state
        _close_on_tokens(same, out, keep, 1e-6)
        other(**batch).last_hidden_state.square().mean().backward()
        assert other.prefix.grad is not None and pt.prefix.grad is None
        torch.optim.SGD([p for p in other.parameters() if p.requires_grad], lr=10.0).step()
        with torch.no_grad():
            moved = other(**batch).last_hidden_state
            ref = bert_reference(other.model, batch["input_ids"], batch["attention_mask"], prefix=other.prefix_states())
            again = pt(**batch).last_hidden_state
        assert float((moved - out).abs().max()) > 1e-4
        _close_on_tokens(moved, ref, keep, 1e-5)
        assert torch.equal(again, out)  # the original did not move
        assert count_parameters(other, ranks=False)["prompt"]["changed"] > 0
        bare = other.remove()
        with torch.no_grad():  # removing the copy's hooks leaves the original's in place
            plain = bert_reference(bare, batch["input_ids"], batch["attention_mask"])
            _close_on_tokens(bare(**batch).last_hidden_state, plain, keep, 1e-5)
            assert torch.equal(pt(**batch).last_hidden_state, out)


@pytest.mark.parametrize("padded", [False, True])
def test_prefix_on_a_causal_decoder_is_the_same_under_sdpa_and_eager(padded):
    """transformers' SDPA path passes no mask to a causal layer (the kernel's is_causal); with the
    prefix in front of the keys that would align the causal band wrongly, so the hook gives the
    explicit mask: SDPA and eager attention (which always gets a mask) then agree, and a real token
    sees the earlier real tokens."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    outs = {}
    for attn in ("sdpa", "eager"):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=attn).eval()
        torch.manual_seed(1)
        wrapped = PrefixTuning(model, 3, init_std=0.5)
        ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(2))
        mask = torch.ones(2, 7, dtype=torch.long)
        if padded:
            mask[1, :2] = 0
        outs[attn] = wrapped(input_ids=ids, attention_mask=mask if padded else None, use_cache=False).logits
        if not padded:  # the last token's output depends on the first real token
            other = ids.clone()
            other[:, 0] = (other[:, 0] + 1) % 61
            assert not torch.allclose(wrapped(input_ids=other, use_cache=False).logits[:, -1], outs[attn][:, -1])
    valid = slice(None) if not padded else (slice(None), slice(2, None))
    assert rel_err(outs["sdpa"][valid], outs["eager"][valid]) < 1e-5
