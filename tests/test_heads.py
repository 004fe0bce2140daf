"""Task heads: math against a plain nn reference, pooling, class-count errors, head-only training on MiniLM."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastpeft
from fastpeft.methods.heads import ClassificationHead, ModelWithHead, TokenClassificationHead
from fastpeft.nn.accounting import count_parameters


def _reference(head, x):
    """The head's math written out with the same parameters (dropout off)."""
    if head.dense_weight is not None:
        x = torch.tanh(x @ head.dense_weight.t() + head.dense_bias)
    return x @ head.weight.t() + head.bias


def test_classification_head_poolings():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 10)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    for pooling, pooled in (("cls", x[:, 0]),
                            ("mean", torch.stack([x[0].mean(0), x[1, :4].mean(0), x[2, :2].mean(0)])),
                            ("last", torch.stack([x[0, 6], x[1, 3], x[2, 1]])),
                            ("none", x[:, 0])):
        head = ClassificationHead(10, 4, pooling=pooling).eval()
        inp = x[:, 0] if pooling == "none" else x
        out = head(inp, None if pooling == "none" else mask)
        assert out.shape == (3, 4)
        assert torch.allclose(out, _reference(head, pooled), atol=1e-6)
    flat = ClassificationHead(10, 4, hidden_layer=False).eval()
    assert flat.dense_weight is None
    assert torch.allclose(flat(x), x[:, 0] @ flat.weight.t() + flat.bias, atol=1e-6)


def test_token_classification_head_and_loss():
    torch.manual_seed(1)
    head = TokenClassificationHead(8, 5).eval()
    x = torch.randn(2, 6, 8)
    logits = head(x)
    assert logits.shape == (2, 6, 5)
    assert torch.allclose(logits, _reference(head, x), atol=1e-6)
    labels = torch.randint(0, 5, (2, 6))
    labels[1, 4:] = -100  # padding
    keep = labels != -100
    assert torch.allclose(head.loss(logits, labels), F.cross_entropy(logits[keep], labels[keep]))


def test_class_count_mismatch_errors():
    head = ClassificationHead(8, 3)
    logits = head(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="class id 3 but the head has 3 classes"):
        head.loss(logits, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="class id -2"):
        head.loss(logits, torch.tensor([0, -2]))
    with pytest.raises(ValueError, match="logits have 4 classes"):
        head.loss(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must have shape"):
        head.loss(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        head.loss(logits, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="id2label has 2 labels but num_classes is 3"):
        ClassificationHead(8, 3, id2label={0: "a", 1: "b"})
    with pytest.raises(ValueError, match="checkpoint's head has 5 classes but this head has 3"):
        head.load_state_dict(ClassificationHead(8, 5).state_dict())
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        TokenClassificationHead(8, 0)
    with pytest.raises(ValueError, match="features but the head expects 8"):
        head(torch.randn(2, 4, 9))
    with pytest.raises(ValueError, match="pooling"):
        ClassificationHead(8, 3, pooling="max")


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    from fastpeft.tools.minilm import load_minilm

    model, tokenizer = load_minilm()
    batch = tokenizer(["the head is all that trains", "frozen backbone"], padding=True, return_tensors="pt")
    return model, batch


def test_head_only_training_on_minilm(minilm):
    base, batch = minilm
    torch.manual_seed(2)
    model = ModelWithHead(copy.deepcopy(base), ClassificationHead(384, 3, pooling="mean"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias", "head.dense_weight", "head.dense_bias"}
    report = count_parameters(model, ranks=False)
    assert report["weight"]["trainable"] == 384 * 384 + 3 * 384
    assert report["bias"]["trainable"] == 384 + 3
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    labels = torch.tensor([0, 2])
    loss, logits = model(**batch, labels=labels)
    assert logits.shape == (2, 3)
    loss.backward()
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.backbone.named_parameters())
    model.eval()
    with torch.no_grad():
        assert model(**batch, labels=labels)[0] < loss  # the step lowered the loss
    with pytest.raises(ValueError, match="hidden size is 384 but the head expects 100"):
        ModelWithHead(base, ClassificationHead(100, 2))
    # a head on top of injected LoRA: both train, the rest stays frozen
    lora = fastpeft.inject(copy.deepcopy(base), fastpeft.LoRAConfig(r=2, target_modules=["query", "value"]))
    both = ModelWithHead(lora, TokenClassificationHead(384, 4))
    names = {n for n, p in both.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= names and any("lora_A" in n for n in names)
    assert all(n.startswith("head.") or "lora_" in n for n in names)
    tags = both(**batch)
    assert tags.shape == (*batch["input_ids"].shape, 4)


def test_label_map_mismatch_with_backbone_config():
    class Backbone(torch.nn.Module):
        class config:  # noqa: N801 - mimics a transformers config
            hidden_size = 8
            id2label = {0: "a", 1: "b", 2: "c", 3: "d"}

        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="config has 4 labels but the head has 3 classes"):
        ModelWithHead(Backbone(), ClassificationHead(8, 3))
    model = ModelWithHead(Backbone(), ClassificationHead(8, 4, pooling="none"))
    assert model(torch.randn(2, 8)).shape == (2, 4)
