"""Bad input: a clear exception naming the argument, never a crash or a silently wrong result."""
import pytest
import torch

import fastpeft


def args(**over):
    base = dict(x=torch.randn(4, 8), weight=torch.randn(6, 8), bias=None)
    base.update(over)
    return base


def call(**over):
    a = args(**over)
    x, w, b = a.pop("x"), a.pop("weight"), a.pop("bias")
    return fastpeft.peft_linear(x, w, b, backend="reference", **a)


@pytest.mark.parametrize("over, exc, words", [
    (dict(x=torch.randn(4, 7)), ValueError, "x must have shape"),
    (dict(weight=torch.randn(6, 8, 1)), ValueError, "weight must be 2-D"),
    (dict(weight=torch.randn(6, 8).double()), TypeError, "weight dtype"),
    (dict(x=torch.randint(0, 3, (4, 8))), TypeError, "x must be a floating"),
    (dict(bias=torch.randn(5)), ValueError, "bias must have shape"),
    (dict(lora_A=torch.randn(2, 8)), ValueError, "lora_A and lora_B"),
    (dict(lora_A=torch.randn(2, 7), lora_B=torch.randn(6, 2)), ValueError, "lora_A must have shape"),
    (dict(lora_A=torch.randn(2, 8), lora_B=torch.randn(6, 3)), ValueError, "rank mismatch"),
    (dict(lora_A=torch.randn(2, 8), lora_B=torch.randn(5, 2)), ValueError, "lora_B must have shape"),
    (dict(lora_A=torch.randn(2, 8).half(), lora_B=torch.randn(6, 2)), TypeError, "lora_A must have x's dtype"),
    (dict(lora_A=torch.randn(2, 8), lora_B=torch.randn(6, 2), lora_dropout=1.0), ValueError, "lora_dropout"),
    (dict(lora_A=torch.randn(2, 8), lora_B=torch.randn(6, 2), lora_dropout=-0.1), ValueError, "lora_dropout"),
    (dict(lora_A=torch.randn(2, 8), lora_B=torch.randn(6, 2), lora_dropout=0.1, dropout_seed=-1), ValueError, "dropout_seed"),
    (dict(lora_A=torch.randn(2, 8), lora_B=torch.randn(6, 2), lora_dropout=0.1, dropout_seed=1.5), TypeError, "dropout_seed"),
    (dict(ia3_in=torch.randn(6)), ValueError, "ia3_in must have shape"),
    (dict(ia3_out=torch.randn(8)), ValueError, "ia3_out must have shape"),
    (dict(sparse_index=torch.tensor([1, 2], dtype=torch.int32), sparse_value=torch.randn(2)), TypeError, "int64"),
    (dict(sparse_index=torch.tensor([1, 48]), sparse_value=torch.randn(2)), ValueError, "[0, 48)"),
    (dict(sparse_index=torch.tensor([-1, 2]), sparse_value=torch.randn(2)), ValueError, "sparse_index values"),
    (dict(sparse_index=torch.tensor([3, 2]), sparse_value=torch.randn(2)), ValueError, "sorted"),
    (dict(sparse_index=torch.tensor([2, 2]), sparse_value=torch.randn(2)), ValueError, "unique"),
    (dict(sparse_index=torch.tensor([1, 2]), sparse_value=torch.randn(3)), ValueError, "sparse_value must have shape"),
    (dict(sparse_index=torch.tensor([1, 2])), ValueError, "together"),
])
def test_bad_input_names_the_argument(over, exc, words):
    with pytest.raises(exc, match=None) as info:
        call(**over)
    assert words in str(info.value)


def test_device_mismatch_is_reported():
    meta = torch.empty(6, 8, device="meta")
    with pytest.raises(ValueError, match="weight is on meta"):
        fastpeft.peft_linear(torch.randn(4, 8), meta, backend="reference")


def test_unknown_and_unavailable_backends_say_why():
    with pytest.raises(RuntimeError, match="unknown backend"):
        fastpeft.peft_linear(torch.randn(2, 8), torch.randn(3, 8), backend="cuda-magic")
    with pytest.raises(RuntimeError, match="unknown backend"):
        fastpeft.set_backend("nope")


def test_set_backend_and_env(monkeypatch):
    fastpeft.set_backend("reference")
    try:
        assert fastpeft.get_backend() == "reference"
    finally:
        fastpeft.set_backend(None)
    monkeypatch.setenv("FASTPEFT_BACKEND", "reference")
    assert fastpeft.get_backend() == "reference"
    assert "reference" in fastpeft.available_backends()


def test_user_tensors_not_modified():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    copies = [t.clone() for t in (x, w, a, b)]
    fastpeft.peft_linear(x, w, lora_A=a, lora_B=b, lora_dropout=0.5, backend="reference")
    for t, c in zip((x, w, a, b), copies):
        assert torch.equal(t, c)
