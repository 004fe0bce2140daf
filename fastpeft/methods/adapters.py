"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021): math, op, module, config.

An adapter placed after a layer with output h [..., d] computes

    a = h W_downᵀ + b_down          [..., m]   (m = bottleneck size, m << d)
    y = h + act(a) W_upᵀ + b_up     [..., d]

``bottleneck_adapter`` is the public op.  It is a ``torch.library`` custom op pair
(``fastpeft::adapter_fwd`` / ``fastpeft::adapter_bwd``) with a fake implementation and registered
autograd, so ``torch.compile(fullgraph=True)`` traces it, dispatching by backend name:

- "reference": plain torch ops with the hand-written backward below;
- "cpp": ``csrc/adapter.cpp`` — at::addmm GEMMs; the bias rides in the down GEMM's ``beta``
  term, the activation is one pass over the [M, m] result, and the residual plus up bias are
  written once into the output that the up GEMM then accumulates into (``beta = 1``);
- "triton": ``kernels/adapter.py`` — the activation is the down GEMM's epilogue and the residual
  add is the up GEMM's epilogue; the backward's act'(a) product and its residual (dh = dy + ...)
  are epilogues too, the bias gradients ride along the weight-gradient GEMMs.

What is saved for backward: h (only when W_down trains) and the [M, m] pre-activation a;
act(a) is recomputed from a (never saved).

Adapter tensors may be float32 while h is bfloat16/float16 (as peft keeps adapters); they are
used in h's precision with fp32 accumulation and their gradients come back in their own dtype.

``BottleneckAdapter`` is the module; ``AdapterConfig(...).inject(model)`` (also reached through
``fastpeft.inject(model, config)``) places one after every module whose name matches
``target_modules`` using a forward hook: the adapted module stays where it was (state_dict
names of the pre-trained weights do not change) and owns its adapter as the child ``adapter``.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastpeft.core import backends as _backends
from fastpeft.core.validation import check_positive_int
from fastpeft.nn.config import TargetModules, check_targets, matches
from fastpeft.nn.pretrained import freeze_all_but_adapters, remember_pretrained

# Activation codes shared with the C++ and Triton kernels (keep in sync with csrc/adapter.cpp).
ACTIVATIONS = {"identity": 0, "relu": 1, "gelu": 2, "silu": 3, "tanh": 4}
_FLOAT = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def activation_code(activation) -> int:
    """The integer code of an activation name (``ACTIVATIONS``); raises ValueError for others."""
    if isinstance(activation, str) and activation in ACTIVATIONS:
        return ACTIVATIONS[activation]
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")


# ----------------------------------------------------------------------------- reference math
def act_forward(x: Tensor, code: int) -> Tensor:
    """act(x) for an activation code, in x's dtype (gelu is the exact erf form)."""
    if code == 1:
        return torch.relu(x)
    if code == 2:
        return F.gelu(x)
    if code == 3:
        return F.silu(x)
    if code == 4:
        return torch.tanh(x)
    return x


def act_grad(x: Tensor, code: int) -> Tensor:
    """act'(x), computed in fp32 for half types."""
    w = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    if code == 1:
        return (w > 0).to(w.dtype)
    if code == 2:  # d/dx x Φ(x) = Φ(x) + x φ(x)
        return 0.5 * (1.0 + torch.erf(w * 0.7071067811865476)) + w * torch.exp(-0.5 * w * w) * 0.3989422804014327
    if code == 3:
        s = torch.sigmoid(w)
        return s * (1.0 + w * (1.0 - s))
    if code == 4:
        t = torch.tanh(w)
        return 1.0 - t * t
    return torch.ones_like(w)


def reference_bottleneck_adapter(h: Tensor, down_weight: Tensor, down_bias: Optional[Tensor], up_weight: Tensor,
                                 up_bias: Optional[Tensor], activation: str = "relu") -> Tensor:
    """The adapter's definition in plain PyTorch (autograd does the backward): the ground truth.

    y = h + act(h W_downᵀ + b_down) W_upᵀ + b_up, adapters used in h's dtype.
    """
    code = activation_code(activation)
    dt = h.dtype
    a = F.linear(h, down_weight.to(dt), down_bias.to(dt) if down_bias is not None else None)
    return h + F.linear(act_forward(a, code), up_weight.to(dt), up_bias.to(dt) if up_bias is not None else None)


# ----------------------------------------------------------------------------- backends
class AdapterBackend(NamedTuple):
    """One implementation of the adapter on 2-D contiguous h [M, d], adapters already in h's dtype.

    forward(h, wd, bd, wu, bu, act, save_pre) -> (y [M, d], pre [M, m] or empty [0])
    backward(dy, h, pre, wd, wu, act, needs) -> [dh, d_wd, d_bd, d_wu, d_bu] (None where not needed;
        weight and bias gradients may come back in fp32 when h is half: the caller casts).
    """

    name: str
    forward: Callable
    backward: Callable


def _ref_forward(h, wd, bd, wu, bu, act, save_pre):
    pre = torch.addmm(bd, h, wd.t()) if bd is not None else h @ wd.t()
    y = torch.addmm(h + bu if bu is not None else h, act_forward(pre, act), wu.t())
    return y, (pre if save_pre else h.new_empty(0))


def _ref_backward(dy, h, pre, wd, wu, act, needs):
    need_h, need_wd, need_bd, need_wu, need_bu = needs
    wide = torch.float32 if dy.dtype in (torch.bfloat16, torch.float16) else dy.dtype
    da = ((dy @ wu).to(wide) * act_grad(pre, act)).to(dy.dtype)
    dh = torch.addmm(dy, da, wd) if need_h else None
    d_wd = (da.t() @ h) if need_wd else None
    d_bd = da.sum(0, dtype=wide) if need_bd else None
    d_wu = (dy.t() @ act_forward(pre, act)) if need_wu else None
    d_bu = dy.sum(0, dtype=wide) if need_bu else None
    return [dh, d_wd, d_bd, d_wu, d_bu]


_REFERENCE = AdapterBackend("reference", _ref_forward, _ref_backward)


def _cpp_forward(h, wd, bd, wu, bu, act, save_pre):
    return torch.ops.fastpeft_cpp.adapter_fwd(h, wd, bd, wu, bu, act, save_pre)


def _cpp_backward(dy, h, pre, wd, wu, act, needs):
    grads = torch.ops.fastpeft_cpp.adapter_bwd(dy, h if h is not None else dy.new_empty(0), pre, wd, wu, act,
                                               list(needs))
    return [g if need else None for g, need in zip(grads, needs)]


_CPP = AdapterBackend("cpp", _cpp_forward, _cpp_backward)


def _triton_impl() -> AdapterBackend:
    from fastpeft.kernels import adapter as kernels

    return AdapterBackend("triton", kernels.adapter_forward, kernels.adapter_backward)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_unavailable(name: str, device: torch.device) -> Optional[str]:
    """None when the adapter can run on ``backend=name`` for tensors on ``device``, else why not."""
    if name == "reference":
        return None
    if name == "cpp":
        if device.type != "cpu":
            return f"the C++ adapter kernels run on CPU tensors only, got {device}"
        reason = _backends.unavailable_reason("cpp")
        if reason is not None:
            return reason
        try:
            torch.ops.fastpeft_cpp.adapter_fwd  # noqa: B018 - existence check
        except (AttributeError, RuntimeError):
            return ("the fastpeft C++ extension was built without csrc/adapter.cpp; rebuild it "
                    "(pip install --no-build-isolation -e .)")
        return None
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "backend 'triton' needs the missing package 'triton'"
        if device.type == "cpu" and not _interpreting():
            return ("Triton runs CPU tensors only under the interpreter: set TRITON_INTERPRET=1 before "
                    "importing fastpeft")
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels do not run on {device}"
        return None
    return f"unknown backend {name!r}; expected one of {', '.join(_backends.KNOWN)} or 'auto'"


def _resolve(name: Optional[str], device: torch.device) -> AdapterBackend:
    if name is None or name == "auto":
        name = _backends.get_backend()
    if name is None or name == "auto":
        for candidate in (("triton", "reference") if device.type == "cuda" else ("cpp", "reference")):
            if backend_unavailable(candidate, device) is None:
                return _impl(candidate)
        raise RuntimeError(f"no adapter backend supports tensors on {device}")
    reason = backend_unavailable(name, device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available for the adapter: {reason}")
    return _impl(name)


def _impl(name: str) -> AdapterBackend:
    return {"reference": lambda: _REFERENCE, "cpp": lambda: _CPP, "triton": _triton_impl}[name]()


# ----------------------------------------------------------------------------- custom ops
def _in(t: Optional[Tensor], dt: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dt)


@torch.library.custom_op("fastpeft::adapter_fwd", mutates_args=())
def _adapter_fwd(h: Tensor, down_weight: Tensor, down_bias: Optional[Tensor], up_weight: Tensor,
                 up_bias: Optional[Tensor], activation: int, save_pre: bool, backend: str) -> tuple[Tensor, Tensor]:
    impl = _resolve(backend, h.device)
    dt = h.dtype
    y, pre = impl.forward(h, down_weight.to(dt), _in(down_bias, dt), up_weight.to(dt), _in(up_bias, dt),
                          activation, save_pre)
    return y, pre


@_adapter_fwd.register_fake
def _(h, down_weight, down_bias, up_weight, up_bias, activation, save_pre, backend):
    pre = h.new_empty(h.shape[0], down_weight.shape[0]) if save_pre else h.new_empty(0)
    return torch.empty_like(h), pre


@torch.library.custom_op("fastpeft::adapter_bwd", mutates_args=())
def _adapter_bwd(grad_y: Tensor, h: Optional[Tensor], pre: Tensor, down_weight: Tensor, down_bias: Optional[Tensor],
                 up_weight: Tensor, up_bias: Optional[Tensor], activation: int, needs: list[bool],
                 backend: str) -> list[Tensor]:
    impl = _resolve(backend, grad_y.device)
    dt = grad_y.dtype
    grads = impl.backward(grad_y, h, pre, down_weight.to(dt), up_weight.to(dt), activation, needs)
    like = (grad_y, down_weight, down_bias, up_weight, up_bias)
    # Each gradient in its argument's dtype (fp32 adapters keep fp32 gradients).
    return [g.to(t.dtype) if need else grad_y.new_empty(0) for g, t, need in zip(grads, like, needs)]


@_adapter_bwd.register_fake
def _(grad_y, h, pre, down_weight, down_bias, up_weight, up_bias, activation, needs, backend):
    like = (grad_y, down_weight, down_bias, up_weight, up_bias)
    return [torch.empty_like(t) if need else grad_y.new_empty(0) for t, need in zip(like, needs)]


def _setup_context(ctx, inputs, output):
    h, down_weight, down_bias, up_weight, up_bias, activation, save_pre, backend = inputs
    needs = [t is not None and t.requires_grad for t in (h, down_weight, down_bias, up_weight, up_bias)]
    ctx.save_for_backward(h if needs[1] else None, output[1], down_weight, down_bias, up_weight, up_bias)
    ctx.needs, ctx.activation, ctx.backend = needs, activation, backend
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, grad_pre):
    h, pre, down_weight, down_bias, up_weight, up_bias = ctx.saved_tensors
    if not any(ctx.needs):
        return (None,) * 8
    grads = _adapter_bwd(grad_y.contiguous(), h, pre, down_weight, down_bias, up_weight, up_bias, ctx.activation,
                         list(ctx.needs), ctx.backend)
    out = [g if need else None for g, need in zip(grads, ctx.needs)]
    return (*out, None, None, None)


_adapter_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_args(h, down_weight, down_bias, up_weight, up_bias) -> None:
    if not isinstance(h, Tensor):
        raise TypeError(f"h must be a torch.Tensor, got {type(h).__name__}")
    if h.dtype not in _FLOAT:
        raise TypeError(f"h must be a floating tensor (float32, bfloat16, float16 or float64), got {h.dtype}")
    if h.dim() < 1:
        raise ValueError("h must have at least one dimension (its last is the feature size)")
    d = h.shape[-1]
    for name, t in (("down_weight", down_weight), ("up_weight", up_weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {list(t.shape)}")
    m = down_weight.shape[0]
    if m == 0:
        raise ValueError("down_weight has 0 rows: the bottleneck size must be at least 1")
    expected = {"down_weight": (m, d), "up_weight": (d, m), "down_bias": (m,), "up_bias": (d,)}
    for name, t in (("down_weight", down_weight), ("down_bias", down_bias), ("up_weight", up_weight),
                    ("up_bias", up_bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {list(expected[name])} for h with {d} features and "
                             f"bottleneck {m}, got {list(t.shape)}")
        if t.device != h.device:
            raise ValueError(f"{name} is on {t.device} but h is on {h.device}; move it to {h.device}")
        if t.dtype not in (h.dtype, torch.float32):
            raise TypeError(f"{name} must have h's dtype ({h.dtype}) or torch.float32, got {t.dtype}")


def bottleneck_adapter(h: Tensor, down_weight: Tensor, down_bias: Optional[Tensor], up_weight: Tensor,
                       up_bias: Optional[Tensor], *, activation: str = "relu", backend: Optional[str] = None) -> Tensor:
    """Bottleneck adapter with its residual: y = h + act(h W_downᵀ + b_down) W_upᵀ + b_up.

    Args:
        h: [..., d] output of the adapted layer (any leading dims, any strides).
        down_weight: [m, d] down projection (m >= 1 is the bottleneck size); down_bias: [m] or None.
        up_weight: [d, m] up projection; up_bias: [d] or None.
        activation: "relu", "gelu" (exact erf form), "silu", "tanh" or "identity".
        backend: "reference", "cpp", "triton", or None/"auto" (see fastpeft.set_backend).

    Adapter tensors have h's dtype or float32; the output has h's dtype and shape.
    """
    _check_args(h, down_weight, down_bias, up_weight, up_bias)
    code = activation_code(activation)
    if torch.compiler.is_compiling():
        backend = backend or "auto"  # resolved inside the (opaque) op: availability checks do not trace
    else:
        backend = _resolve(backend, h.device).name  # the clear error, before entering the op
    lead, d = h.shape[:-1], h.shape[-1]
    h2d = h.reshape(-1, d).contiguous()
    trains = any(t is not None and t.requires_grad for t in (h, down_weight, down_bias, up_weight, up_bias))
    y, _ = _adapter_fwd(h2d, down_weight, down_bias, up_weight, up_bias, code,
                        torch.is_grad_enabled() and trains, backend)
    return y.reshape(*lead, d)


# ----------------------------------------------------------------------------- module
class BottleneckAdapter(nn.Module):
    """y = h + act(h W_downᵀ + b_down) W_upᵀ + b_up, applied to a layer's output h [..., features].

    Initialised like peft / AdapterHub so it starts as the identity: W_down Kaiming-uniform (as an
    nn.Linear), b_down uniform, W_up and b_up zero.  Parameters are float32 when ``dtype`` is a
    half type (as peft keeps adapters), else ``dtype``.
    """

    PARAM_CATEGORIES = {"down_weight": "adapter", "down_bias": "adapter", "up_weight": "adapter", "up_bias": "adapter"}

    def __init__(self, features: int, bottleneck: int, activation: str = "relu", bias: bool = True, *,
                 dtype: Optional[torch.dtype] = None, device=None, backend: Optional[str] = None):
        super().__init__()
        check_positive_int("features", features)
        check_positive_int("bottleneck", bottleneck)
        activation_code(activation)
        dtype = dtype or torch.get_default_dtype()
        if dtype in (torch.bfloat16, torch.float16):
            dtype = torch.float32
        self.features, self.bottleneck, self.activation, self.backend = features, bottleneck, activation, backend
        kw = {"dtype": dtype, "device": device}
        self.down_weight = nn.Parameter(torch.empty(bottleneck, features, **kw))
        self.down_bias = nn.Parameter(torch.empty(bottleneck, **kw)) if bias else None
        self.up_weight = nn.Parameter(torch.zeros(features, bottleneck, **kw))
        self.up_bias = nn.Parameter(torch.zeros(features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's init for the down projection, zeros for the up projection (identity adapter)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
            if self.down_bias is not None:
                bound = 1.0 / math.sqrt(self.features)
                nn.init.uniform_(self.down_bias, -bound, bound)
            self.up_weight.zero_()
            if self.up_bias is not None:
                self.up_bias.zero_()
        for p in self.parameters():  # count_parameters reports entries that moved from these values
            remember_pretrained(p)

    def forward(self, h: Tensor) -> Tensor:
        return bottleneck_adapter(h, self.down_weight, self.down_bias, self.up_weight, self.up_bias,
                                  activation=self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"features={self.features}, bottleneck={self.bottleneck}, activation={self.activation}, "
                f"bias={self.down_bias is not None}, backend={self.backend or 'auto'}")


# ----------------------------------------------------------------------------- placement
# Placement presets for BERT-style (attention.output.dense / output.dense), Llama-style
# (o_proj / down_proj) and OPT/Whisper-style (out_proj / fc2) names.  Houlsby: after the
# attention output projection and after the feed-forward output; Pfeiffer: after the
# feed-forward output only.  MultiheadAttention's out_proj is excluded by type below.
VARIANT_TARGETS = {
    "houlsby": r"(.*\.)?(attention\.output\.dense|output\.dense|o_proj|down_proj|out_proj|fc2)",
    "pfeiffer": r"(.*\.)?((?<!attention\.)output\.dense|down_proj|fc2)",
}


def _adapter_hook(module: nn.Module, args, output):
    if not isinstance(output, Tensor):
        raise TypeError(f"a bottleneck adapter needs a module that returns a Tensor, {type(module).__name__} "
                        f"returned {type(output).__name__}")
    return module.adapter(output)


def attach_adapter(module: nn.Module, adapter: BottleneckAdapter) -> None:
    """Make ``adapter`` the child ``adapter`` of ``module`` and apply it to ``module``'s output (a hook)."""
    module.adapter = adapter
    module.register_forward_hook(_adapter_hook)


def adapter_of(module: nn.Module) -> Optional[BottleneckAdapter]:
    """The bottleneck adapter ``attach_adapter`` put on ``module``, or None."""
    adapter = module._modules.get("adapter")
    if isinstance(adapter, BottleneckAdapter) and _adapter_hook in module._forward_hooks.values():
        return adapter
    return None


def is_adapter_hook(hook) -> bool:
    """Whether ``hook`` is the forward hook that applies an attached bottleneck adapter."""
    return hook is _adapter_hook


def _output_size(module: nn.Module) -> Optional[int]:
    for attr in ("out_features", "nf", "embed_dim", "hidden_size"):
        v = getattr(module, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _placement(name: str, module: nn.Module) -> str:
    """Where the adapter for target ``name`` goes: the module itself when it has an output size; for a
    block without one that holds exactly one linear layer (BERT's ``attention.output`` / ``output``:
    dense, dropout, residual + LayerNorm), after that layer, where Houlsby et al. place it (before the
    residual and the LayerNorm).  Anything else raises a ValueError that says what to target."""
    if _output_size(module) is not None:
        return name
    linears = [n for n, c in module.named_children() if _output_size(c) is not None]
    if len(linears) == 1:
        return f"{name}.{linears[0]}"
    inner = [f"{name}.{n}" for n, c in module.named_modules() if n and _output_size(c) is not None][:6]
    hint = (f"target one of the linear layers inside it, e.g. {inner}" if inner else
            "target a module with an out_features attribute (nn.Linear and fastpeft layers)")
    raise ValueError(f"cannot tell the output size of {name!r} ({type(module).__name__}): a bottleneck adapter goes "
                     f"after a linear layer; {hint}, or leave target_modules=None for the {', '.join(VARIANT_TARGETS)} "
                     "placement (after attention.output.dense and output.dense in BERT)")


@dataclass
class AdapterConfig:
    """Bottleneck adapters after every module that ``target_modules`` selects.

    bottleneck: the adapter's hidden size m (>= 1); activation: see ``bottleneck_adapter``.
    variant: "houlsby" (after attention output and feed-forward output projections) or
    "pfeiffer" (after the feed-forward output only); it only chooses the default targets, so
    ``target_modules`` (names or a regex, matched like peft) overrides it.  A target without an
    output size that holds exactly one linear layer (BERT's ``attention.output`` and ``output``
    blocks) gets its adapter after that layer, where Houlsby places it: on BERT,
    ``target_modules=["output"]`` is the Houlsby placement.
    modules_to_save: extra module names kept trainable (e.g. a task head).

    ``inject(model)`` freezes every parameter except the adapters (and trainable fastpeft layers
    injected earlier, and ``modules_to_save``), attaches one ``BottleneckAdapter`` as the child
    ``adapter`` of each target and a forward hook that applies it, and returns the model.  Every
    target is checked before anything changes: when it raises, the model is as it was.  Methods
    that replace nn.Linear layers (``fastpeft.inject``) may come before or after, on the same layers.
    """

    bottleneck: int = 64
    activation: str = "relu"
    variant: str = "houlsby"
    target_modules: TargetModules = None
    bias: bool = True
    modules_to_save: Optional[list[str]] = None
    backend: Optional[str] = None

    def __post_init__(self):
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck < 1:
            raise ValueError(f"bottleneck (the adapter size) must be a positive int, got {self.bottleneck!r}")
        activation_code(self.activation)
        if self.variant not in VARIANT_TARGETS:
            raise ValueError(f"variant must be one of {', '.join(VARIANT_TARGETS)}, got {self.variant!r}")
        check_targets(self.target_modules)

    @property
    def targets(self) -> TargetModules:
        """``target_modules`` or, when None, the variant's default placement regex."""
        return self.target_modules if self.target_modules is not None else VARIANT_TARGETS[self.variant]

    def placements(self, model: nn.Module) -> list[str]:
        """Names of the modules ``inject(model)`` would put an adapter after (raises what inject raises)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        matched = [(name, module) for name, module in model.named_modules()
                   if name and not isinstance(module, BottleneckAdapter) and not name.endswith(".adapter")
                   and matches(name, self.targets)]
        if not matched:
            sample = [n for n, _ in model.named_modules() if n][:8]
            raise ValueError(f"target_modules={self.targets!r} matched no module of the model (module names look "
                             f"like {sample})")
        names = list(dict.fromkeys(_placement(name, module) for name, module in matched))
        for name in names:
            module = model.get_submodule(name)
            if type(module).__name__ == "NonDynamicallyQuantizableLinear":
                raise ValueError(f"{name!r} is MultiheadAttention's out_proj, whose forward MHA never calls: "
                                 "an adapter there would be skipped; target the attention module instead")
            if isinstance(module._modules.get("adapter"), BottleneckAdapter):
                raise ValueError(f"{name!r} already has a bottleneck adapter")
        return names

    def inject(self, model: nn.Module) -> nn.Module:
        """Attach adapters in place after the matching modules; return ``model`` (see class doc)."""
        names = self.placements(model)  # every check, before anything changes
        adapters = {}
        for name in names:
            module = model.get_submodule(name)
            ref = next(iter(module.parameters()), None)
            adapters[name] = BottleneckAdapter(
                _output_size(module), self.bottleneck, self.activation, self.bias,
                dtype=ref.dtype if ref is not None else None, device=ref.device if ref is not None else None,
                backend=self.backend)
        freeze_all_but_adapters(model)
        for name, adapter in adapters.items():
            attach_adapter(model.get_submodule(name), adapter)
        if self.modules_to_save:
            for name, module in model.named_modules():
                if name and matches(name, self.modules_to_save):
                    for p in module.parameters():
                        if not p.requires_grad:
                            remember_pretrained(p)
                        p.requires_grad_(True)
        return model


def adapters_of(model: nn.Module) -> dict[str, BottleneckAdapter]:
    """{qualified name: adapter} for every BottleneckAdapter in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BottleneckAdapter)}

