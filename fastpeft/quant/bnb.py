"""bitsandbytes interop: the tensors of a bnb ``Params4bit`` / ``Int8Params``, shared (no copy).

bitsandbytes is not imported: the parameter is read through its documented attributes
(``quant_state`` for 4-bit, ``CB`` / ``SCB`` for int8), so this works wherever such a parameter
exists.
"""
from __future__ import annotations

import torch

from fastpeft.quant import dynamic, nf4


def tensors_from_bnb(param, dtype=None):
    """(format, shape, dtype, tensors, blocksize, absmax_blocksize) viewing ``param``'s storage."""
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"param must be a bitsandbytes Params4bit or Int8Params, got {type(param).__name__}")
    state = getattr(param, "quant_state", None)
    if state is not None:
        return _from_4bit(param, state, dtype)
    if hasattr(param, "CB") and hasattr(param, "SCB"):
        return _from_int8(param, dtype)
    raise TypeError(f"param must be a bitsandbytes Params4bit (with a quant_state) or Int8Params (with CB/SCB), "
                    f"got {type(param).__name__}; a Params4bit that is not yet quantized has no quant_state "
                    f"(move it to a device first)")


def _from_4bit(param, state, dtype):
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError("param: bitsandbytes repacked this 4-bit weight for its CPU inference kernel "
                         "(quant_state.packing_format_for_cpu, set by an eval-mode CPU forward without gradients); "
                         "fastpeft reads bitsandbytes' standard NF4 layout only: convert before such a forward, or "
                         "reload the weight")
    if state.quant_type != "nf4":
        raise ValueError(f"param: only NF4 4-bit weights are supported, got quant_type={state.quant_type!r}")
    shape = torch.Size(state.shape)
    if len(shape) != 2:
        raise ValueError(f"param: the quantized weight must be 2-D, its quant_state.shape is {list(shape)}")
    if state.code is not None and not torch.equal(state.code.detach().float().cpu(), nf4.NF4_CODE):
        raise ValueError("param: quant_state.code is not bitsandbytes' NF4 code")
    data = param.data
    if not data.is_contiguous():
        raise ValueError("param: the packed 4-bit data must be contiguous")
    packed = data.view(torch.uint8).reshape(-1)  # a view: the same storage (any quant_storage dtype)
    tensors = {"packed": packed, "absmax": state.absmax}
    absmax_blocksize = dynamic.ABSMAX_BLOCKSIZE
    if state.nested:
        s2 = state.state2
        offset = state.offset
        if not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=packed.device)
        tensors.update(absmax2=s2.absmax, absmax_code=s2.code, absmax_offset=offset.reshape(()))
        absmax_blocksize = int(s2.blocksize)
    return "nf4", shape, dtype or state.dtype, tensors, int(state.blocksize), absmax_blocksize


def _from_int8(param, dtype):
    cb, scb = param.CB, param.SCB
    if cb is None or scb is None or cb.dtype != torch.int8:
        raise ValueError("param: the Int8Params is not quantized (CB/SCB missing; has_fp16_weights=True or "
                         "not yet moved to a device)")
    if cb.dim() != 2:
        raise ValueError(f"param: CB must be 2-D [N, K], got {list(cb.shape)}")
    # bnb's int8 dequantization (int8_vectorwise_dequant) is float32.
    return "int8", cb.shape, dtype or torch.float32, {"CB": cb, "SCB": scb}, None, dynamic.ABSMAX_BLOCKSIZE
