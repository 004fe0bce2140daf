"""Prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021) for transformers models.

``PromptTuning(model, n)`` learns n virtual-token embeddings P [n, H] and runs

    model(inputs_embeds=[P; E(input_ids)], attention_mask=[1…1; mask], token_type_ids=[0…0; tt])

so every layer sees the virtual tokens as ordinary (always attended) positions.  The output's
``last_hidden_state`` drops the n virtual positions by default, so it lines up with the input.

``PrefixTuning(model, n)`` learns, for every attention layer ℓ, n key and n value vectors
(K_ℓ, V_ℓ [n, kv_dim]) that are prepended to the layer's keys and values:

    attention_ℓ(Q, [K_ℓ; K], [V_ℓ; V])   with the mask extended by n always-attended columns

Queries, positions and the number of outputs are unchanged.  With ``reparameterize=True`` the
prefixes come from a two-layer MLP (H → encoder_hidden → tanh → layers·2·kv_dim) applied to n
learnable embeddings, as in the paper (training is more stable); the MLP is only a
reparameterisation: the prefixes it produces are what the model sees.

How the prefixes reach the attention: a forward pre-hook on each attention module (the modules
that take a ``cache``/``past_key_values`` argument and own key/value projections, e.g.
``BertSelfAttention``) passes a one-shot cache object whose ``update(k, v, layer_idx)`` returns
``[K_ℓ; k], [V_ℓ; v]`` (transformers' own Cache protocol, which the attention calls right after
projecting keys and values) and extends the attention mask the model built (4-D bool or
additive float; None stays None).  Nothing is stored between calls, position ids do not shift,
and the model runs as usual when it is called without the wrapper.  Each hook computes its
layer's prefix from the parameters when it runs (for the MLP: only that layer's rows), so a
recomputed layer sees exactly what the first pass saw.

Activation checkpointing (transformers' ``gradient_checkpointing_enable`` /
``activation_checkpointing_enable``, reentrant or not): a checkpointed layer is recomputed during
backward, after the wrapper's forward returned.  While the wrapper runs, each layer's
``_gradient_checkpointing_func`` is wrapped (and restored afterwards) so that the function it
checkpoints switches the hooks on whenever it runs, recompute included, and the wrapper's
parameters are passed as extra checkpoint inputs (reentrant checkpointing back-propagates only
when an input needs grad: this keeps it working with frozen embeddings).  Checkpointing the
wrapper as a whole works as is.  Checkpointing that the model calls by other means cannot be
seen, and its recompute would drop the prefix: reentrant, an attention layer that runs with
gradients disabled inside a forward that records them raises a RuntimeError; non-reentrant,
torch's own recompute check raises (the recomputed keys are shorter).

The hooks are picklable objects holding the wrapper (no closures), so ``copy.deepcopy`` and
``torch.save``/``torch.load`` of the wrapper give an independent copy with its own prefixes,
hooks and ``count_parameters`` baseline.

Both wrappers freeze the model (``freeze_model=False`` keeps its trainable parameters) and hold
their parameters directly, counted as "prompt" by ``count_parameters``.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastpeft.core.validation import check_positive_int
from fastpeft.nn.pretrained import initial_values, remember_pretrained


def _input_embeddings(model: nn.Module) -> nn.Embedding:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(emb, nn.Embedding):
        raise TypeError(f"{type(model).__name__} has no get_input_embeddings() returning an nn.Embedding; "
                        "prompt tuning needs a transformers model that accepts inputs_embeds")
    return emb


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _batch_size(input_ids, inputs_embeds) -> int:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids or inputs_embeds")
    return (input_ids if input_ids is not None else inputs_embeds).shape[0]


class _CarriesInitialValues(nn.Module):
    """Copies and pickles keep count_parameters' baseline (the initial values of own parameters)."""

    def __getstate__(self):
        state = super().__getstate__()
        initial = {name: initial_values(p) for name, p in self.named_parameters(recurse=False)}
        state["_initial_values"] = {name: v for name, v in initial.items() if v is not None}
        return state

    def __setstate__(self, state):
        state = dict(state)
        initial = state.pop("_initial_values", {})
        super().__setstate__(state)
        own = dict(self.named_parameters(recurse=False))
        for name, values in initial.items():
            if name in own:
                remember_pretrained(own[name], values)


class PromptTuning(_CarriesInitialValues):
    """n learnable virtual tokens prepended to a transformers model's input embeddings.

    Args:
        model: a transformers model (anything with ``get_input_embeddings()`` that accepts
            ``inputs_embeds`` and ``attention_mask``).
        num_virtual_tokens: n >= 1.
        init: "random" (normal with the vocabulary embeddings' std), a sequence / 1-D tensor of
            vocabulary token ids (repeated to fill n, as peft does), or a text (needs ``tokenizer``).
        tokenizer: used when ``init`` is a text.
        keep_virtual_outputs: keep the n virtual positions in ``last_hidden_state`` (default: drop them).
        freeze_model: freeze every parameter of ``model``.

    ``prompt`` [n, H] is the only parameter (float32 when the model is half precision).  Token-level
    ``labels`` [B, L] (language-model heads) get -100 for the virtual positions, as in peft.
    """

    PARAM_CATEGORIES = {"prompt": "prompt"}

    def __init__(self, model: nn.Module, num_virtual_tokens: int, init: Union[str, Sequence[int], Tensor] = "random",
                 *, tokenizer=None, keep_virtual_outputs: bool = False, freeze_model: bool = True):
        super().__init__()
        n = check_positive_int("num_virtual_tokens", num_virtual_tokens)
        emb = _input_embeddings(model)
        if freeze_model:
            _freeze(model)
        self.model = model
        self.num_virtual_tokens = n
        self.keep_virtual_outputs = keep_virtual_outputs
        weight = emb.weight.detach()
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        if isinstance(init, str) and init == "random":
            std = float(weight.float().std())
            prompt = torch.randn(n, weight.shape[1], device=weight.device, dtype=dtype) * std
        else:
            ids = self._init_ids(init, tokenizer, weight.shape[0])
            ids = ids.repeat(math.ceil(n / ids.numel()))[:n].to(weight.device)
            prompt = weight[ids].to(dtype).clone()
        self.prompt = nn.Parameter(prompt)
        remember_pretrained(self.prompt)  # count_parameters: entries that moved from their initial values

    @staticmethod
    def _init_ids(init, tokenizer, vocab: int) -> Tensor:
        if isinstance(init, str):
            if tokenizer is None:
                raise ValueError("init is a text: pass the tokenizer to turn it into token ids "
                                 "(or init='random', or a list of token ids)")
            init = tokenizer(init, add_special_tokens=False)["input_ids"]
        ids = torch.as_tensor(init)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 1 or ids.numel() == 0:
            raise ValueError("init must be 'random', a text, or a non-empty 1-D sequence of integer token ids")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"init token ids must be in [0, {vocab}) (the vocabulary size), got "
                             f"{int(ids.min())}..{int(ids.max())}")
        return ids.long()

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                inputs_embeds: Optional[Tensor] = None, token_type_ids: Optional[Tensor] = None, **kwargs):
        """Run the model with the virtual tokens in front; other keyword arguments pass through."""
        if "position_ids" in kwargs and kwargs["position_ids"] is not None:
            raise ValueError("position_ids cannot be combined with prompt tuning (the virtual tokens take the "
                             "first positions); leave them to the model")
        b = _batch_size(input_ids, inputs_embeds)
        n = self.num_virtual_tokens
        if inputs_embeds is None:
            inputs_embeds = _input_embeddings(self.model)(input_ids)
        prompt = self.prompt.to(inputs_embeds.dtype).unsqueeze(0).expand(b, -1, -1)
        embeds = torch.cat([prompt, inputs_embeds], dim=1)
        length = inputs_embeds.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones(b, length, dtype=torch.long, device=embeds.device)
        if tuple(attention_mask.shape) != (b, length):
            raise ValueError(f"attention_mask must have shape {[b, length]}, got {list(attention_mask.shape)}")
        attention_mask = torch.cat([attention_mask.new_ones(b, n), attention_mask], dim=1)
        if token_type_ids is not None:
            kwargs["token_type_ids"] = torch.cat([token_type_ids.new_zeros(b, n), token_type_ids], dim=1)
        labels = kwargs.get("labels")
        if isinstance(labels, Tensor) and labels.dim() == 2 and labels.shape == (b, length):
            # token-level labels (causal / masked LM): the virtual positions are never scored
            kwargs["labels"] = torch.cat([labels.new_full((b, n), -100), labels], dim=1)
        out = self.model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        if not self.keep_virtual_outputs and hasattr(out, "last_hidden_state"):
            out["last_hidden_state"] = out.last_hidden_state[:, n:]
        return out

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, hidden={self.prompt.shape[1]}"


# ----------------------------------------------------------------------------- prefix tuning
_CACHE_ARGS = ("cache", "past_key_values", "past_key_value")
_KV_NAMES = (("key", "value"), ("k_proj", "v_proj"))


class _PrefixCache:
    """A one-shot stand-in for a transformers Cache: update() prepends this layer's prefix."""

    def __init__(self, key: Tensor, value: Tensor):
        self.key, self.value = key, value

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx=None, *args, **kwargs):
        k = self.key.to(key_states.dtype).expand(key_states.shape[0], -1, -1, -1)
        v = self.value.to(value_states.dtype).expand(value_states.shape[0], -1, -1, -1)
        return torch.cat([k, key_states], dim=-2), torch.cat([v, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # the prefix is not a past: positions do not shift


def extend_attention_mask(mask: Optional[Tensor], n: int) -> Optional[Tensor]:
    """Add n always-attended key columns in front of a 4-D attention mask (bool: True, additive: 0)."""
    if mask is None:
        return None
    if mask.dim() != 4:
        raise ValueError(f"prefix tuning extends 4-D attention masks [B, 1|heads, Lq, Lk]; got shape "
                         f"{list(mask.shape)} (attention implementations with 2-D masks are not supported)")
    fill = torch.ones if mask.dtype == torch.bool else torch.zeros
    pad = fill(*mask.shape[:-1], n, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


def causal_prefix_mask(length: int, n: int, dtype: torch.dtype, device) -> Tensor:
    """The additive mask [1, 1, L, n + L] of a causal layer with n prefix keys: every query attends to
    the prefix and, causally, to the real keys (query i to keys j <= i + n; 0 there, the dtype's
    minimum elsewhere, as transformers writes masks)."""
    allowed = torch.ones(length, n + length, dtype=torch.bool, device=device).tril(diagonal=n)
    mask = torch.zeros(length, n + length, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    found = []
    for name, module in model.named_modules():
        # key/value projections: nn.Linear or a fastpeft layer replacing one (both have out_features)
        if not any(isinstance(getattr(getattr(module, k, None), "out_features", None), int)
                   and isinstance(getattr(module, v, None), nn.Module) for k, v in _KV_NAMES):
            continue
        try:
            params = inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            continue
        arg = next((a for a in _CACHE_ARGS if a in params), None)
        if arg is not None:
            found.append((name, module, arg))
    return found


def _kv_layout(module: nn.Module, config) -> tuple[int, int]:
    """(kv_heads, head_dim) of an attention module."""
    key = getattr(module, "key", None) or module.k_proj
    kv_dim = key.out_features
    head_dim = (getattr(module, "attention_head_size", None) or getattr(module, "head_dim", None)
                or getattr(config, "head_dim", None))
    if not isinstance(head_dim, int):
        heads = getattr(config, "num_attention_heads", None)
        if not isinstance(heads, int):
            raise ValueError("cannot tell the attention head size: the model config has no num_attention_heads")
        head_dim = config.hidden_size // heads
    if kv_dim % head_dim:
        raise ValueError(f"key projection width {kv_dim} is not a multiple of the head size {head_dim}")
    return kv_dim // head_dim, head_dim


class _PrefixHook:
    """Forward pre-hook of one attention layer (a picklable object, not a closure over the wrapper)."""

    def __init__(self, owner: PrefixTuning, index: int, cache_arg: str):
        self.owner, self.index, self.cache_arg = owner, index, cache_arg

    def __call__(self, module, args, kwargs):
        owner = self.owner
        if not owner._active:  # the model was called directly, not through this wrapper
            return None
        if owner._active == _IN_FORWARD and owner._grad_at_entry and not torch.is_grad_enabled():
            raise RuntimeError(
                f"prefix tuning: attention layer {owner.layer_names[self.index]!r} ran with gradients disabled inside "
                "a forward that records them. That is what reentrant activation checkpointing (torch.utils.checkpoint"
                ".checkpoint(..., use_reentrant=True)) does when the model calls it by itself: the layer would be "
                "recomputed without the prefix and the prefixes would get wrong gradients. Enable checkpointing with "
                "the transformers model's gradient_checkpointing_enable() / activation_checkpointing_enable() "
                "(handled, use_reentrant=True or False), or checkpoint the PrefixTuning wrapper as a whole")
        if kwargs.get(self.cache_arg) is not None:
            raise ValueError("prefix tuning cannot be combined with a key/value cache (generation with "
                             "past_key_values is not supported)")
        key, value = owner.layer_states(self.index)
        kwargs = dict(kwargs)
        kwargs[self.cache_arg] = _PrefixCache(key.unsqueeze(0), value.unsqueeze(0))
        n = owner.num_virtual_tokens
        positional = "attention_mask" not in kwargs and len(args) > 1
        mask = args[1] if positional else kwargs.get("attention_mask")
        if mask is None and getattr(module, "is_causal", False):
            # No mask: transformers leaves causality to the attention kernel (SDPA's is_causal), which
            # aligns the causal band to the top-left corner of the now n-longer key axis and would hide
            # the real keys from the queries.  Give it the explicit mask instead.
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            mask = causal_prefix_mask(hidden.shape[-2], n, hidden.dtype, hidden.device)
        elif isinstance(mask, Tensor):
            mask = extend_attention_mask(mask, n)
        if positional:
            args = (args[0], mask, *args[2:])
        elif mask is not None or "attention_mask" in kwargs:
            kwargs["attention_mask"] = mask
        return args, kwargs


# PrefixTuning._active: hooks off / on in the wrapper's forward / on inside a function it checkpoints
_OFF, _IN_FORWARD, _IN_CHECKPOINT = 0, 1, 2


class _Activated:
    """The function a transformers layer checkpoints, with the wrapper's hooks on whenever it runs
    (first pass and recompute); drops the extra inputs (the wrapper's parameters) again."""

    def __init__(self, owner: PrefixTuning, function, n_args: int):
        self.owner, self.function, self.n_args = owner, function, n_args

    def __call__(self, *args, **kwargs):
        owner, before = self.owner, self.owner._active
        owner._active = _IN_CHECKPOINT
        try:
            return self.function(*args[:self.n_args], **kwargs)
        finally:
            owner._active = before


class _CheckpointWithPrefix:
    """Stands in for a layer's ``_gradient_checkpointing_func`` while the wrapper runs."""

    def __init__(self, owner: PrefixTuning, checkpoint):
        self.owner, self.checkpoint = owner, checkpoint

    def __call__(self, function, *args, **kwargs):
        extra = [p for p in self.owner.parameters(recurse=False) if p.requires_grad]
        return self.checkpoint(_Activated(self.owner, function, len(args)), *args, *extra, **kwargs)


class PrefixTuning(_CarriesInitialValues):
    """Learnable key/value prefixes for every attention layer of a transformers model.

    Args:
        model: a transformers model whose attention modules take a ``cache`` / ``past_key_values``
            argument (BERT, RoBERTa, Llama, ...).
        num_virtual_tokens: prefix length n >= 1.
        reparameterize: produce the prefixes with the paper's MLP from n embeddings.
        encoder_hidden_size: the MLP's hidden width (default: the model's hidden size).
        init_std: std of the normal initialisation of the prefixes (or of the MLP's input embeddings).
        freeze_model: freeze every parameter of ``model``.

    Parameters: ``prefix`` — [layers, 2, n, kv_dim] keys/values, or [n, H] MLP input embeddings
    with ``reparameterize``, plus ``mlp_in_weight``, ``mlp_in_bias``, ``mlp_out_weight``, ``mlp_out_bias``.
    Works under transformers' gradient checkpointing (reentrant or not), and copies / pickles
    (``copy.deepcopy``, ``torch.save``) carry the prefixes (see the module docstring).
    """

    PARAM_CATEGORIES = {"prefix": "prompt", "mlp_in_weight": "prompt", "mlp_in_bias": "prompt",
                        "mlp_out_weight": "prompt", "mlp_out_bias": "prompt"}

    def __init__(self, model: nn.Module, num_virtual_tokens: int, *, reparameterize: bool = False,
                 encoder_hidden_size: Optional[int] = None, init_std: float = 0.02, freeze_model: bool = True):
        super().__init__()
        n = check_positive_int("num_virtual_tokens", num_virtual_tokens)
        config = getattr(model, "config", None)
        layers = _attention_modules(model)
        if not layers:
            raise TypeError(f"found no attention module in {type(model).__name__} that takes a cache/past_key_values "
                            "argument and owns key/value projections; prefix tuning needs a transformers model")
        layouts = {_kv_layout(m, config) for _, m, _ in layers}
        if len(layouts) != 1:
            raise ValueError(f"attention layers disagree on (kv_heads, head_dim): {sorted(layouts)}")
        self.kv_heads, self.head_dim = layouts.pop()
        kv_dim = self.kv_heads * self.head_dim
        ref = next(iter(model.parameters()))
        dtype = torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
        kw = {"dtype": dtype, "device": ref.device}
        hidden = getattr(config, "hidden_size", kv_dim)
        inner = hidden
        if reparameterize and encoder_hidden_size is not None:
            inner = check_positive_int("encoder_hidden_size", encoder_hidden_size)
        if freeze_model:
            _freeze(model)
        self.model = model
        self.num_virtual_tokens, self.num_layers, self.reparameterize = n, len(layers), reparameterize
        self.layer_names = [name for name, _, _ in layers]
        if reparameterize:
            self.prefix = nn.Parameter(torch.randn(n, hidden, **kw) * init_std)
            self.mlp_in_weight = nn.Parameter(torch.empty(inner, hidden, **kw))
            self.mlp_in_bias = nn.Parameter(torch.zeros(inner, **kw))
            self.mlp_out_weight = nn.Parameter(torch.empty(len(layers) * 2 * kv_dim, inner, **kw))
            self.mlp_out_bias = nn.Parameter(torch.zeros(len(layers) * 2 * kv_dim, **kw))
            nn.init.kaiming_uniform_(self.mlp_in_weight, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.mlp_out_weight, a=math.sqrt(5))
        else:
            self.prefix = nn.Parameter(torch.randn(len(layers), 2, n, kv_dim, **kw) * init_std)
            self.mlp_in_weight = self.mlp_in_bias = self.mlp_out_weight = self.mlp_out_bias = None
        for p in self.parameters(recurse=False):
            remember_pretrained(p)
        self._active = _OFF
        self._grad_at_entry = False
        self._handles = [module.register_forward_pre_hook(_PrefixHook(self, i, arg), with_kwargs=True)
                         for i, (_, module, arg) in enumerate(layers)]

    def prefix_states(self) -> Tensor:
        """The keys and values every layer sees: [layers, 2, kv_heads, n, head_dim]."""
        n, kv = self.num_virtual_tokens, self.kv_heads * self.head_dim
        if self.reparameterize:
            hidden = torch.tanh(F.linear(self.prefix, self.mlp_in_weight, self.mlp_in_bias))
            flat = F.linear(hidden, self.mlp_out_weight, self.mlp_out_bias)  # [n, layers*2*kv]
            states = flat.view(n, self.num_layers, 2, kv).permute(1, 2, 0, 3)
        else:
            states = self.prefix
        return states.reshape(self.num_layers, 2, n, self.kv_heads, self.head_dim).transpose(2, 3)

    def layer_states(self, index: int) -> tuple[Tensor, Tensor]:
        """Keys and values of attention layer ``index``, each [kv_heads, n, head_dim] (= prefix_states()[index])."""
        n, kv = self.num_virtual_tokens, self.kv_heads * self.head_dim
        if self.reparameterize:  # only this layer's rows of the MLP's output
            rows = slice(index * 2 * kv, (index + 1) * 2 * kv)
            hidden = torch.tanh(F.linear(self.prefix, self.mlp_in_weight, self.mlp_in_bias))
            states = F.linear(hidden, self.mlp_out_weight[rows], self.mlp_out_bias[rows]).view(n, 2, kv).transpose(0, 1)
        else:
            states = self.prefix[index]
        states = states.reshape(2, n, self.kv_heads, self.head_dim).transpose(1, 2)
        return states[0], states[1]

    def _checkpointing_layers(self) -> list[nn.Module]:
        return [m for m in self.model.modules()
                if getattr(m, "gradient_checkpointing", False) is True
                and callable(getattr(m, "_gradient_checkpointing_func", None))]

    def forward(self, *args, **kwargs):
        """Run the model (same arguments as the model) with the prefixes in every attention layer."""
        if self._active != _OFF:
            raise RuntimeError("PrefixTuning.forward is not re-entrant")
        patched = []
        before, grad_before = self._active, self._grad_at_entry
        try:
            for m in self._checkpointing_layers():
                own = "_gradient_checkpointing_func" in m.__dict__
                original = m._gradient_checkpointing_func
                patched.append((m, own, original))
                m._gradient_checkpointing_func = _CheckpointWithPrefix(self, original)
            self._active, self._grad_at_entry = _IN_FORWARD, torch.is_grad_enabled()
            return self.model(*args, **kwargs)
        finally:
            self._active, self._grad_at_entry = before, grad_before
            for m, own, original in reversed(patched):
                if own:
                    m._gradient_checkpointing_func = original
                else:
                    del m._gradient_checkpointing_func

    def remove(self) -> nn.Module:
        """Detach the hooks and return the bare model."""
        for h in self._handles:
            h.remove()
        self._handles = []
        return self.model

    def extra_repr(self) -> str:
        return (f"num_virtual_tokens={self.num_virtual_tokens}, layers={self.num_layers}, kv_heads={self.kv_heads}, "
                f"head_dim={self.head_dim}, reparameterize={self.reparameterize}")
