"""``QuantizedWeight``: a frozen [N, K] weight stored as NF4 (bitsandbytes' layout) or row-wise int8.

It holds only the quantized tensors (``tensors()``), never a dense copy; ``dequantize_rows`` gives
a dense panel of rows, the primitive the panel GEMMs (``fastpeft.quant.linear``) are built on.

Tensors, by format (names are the keys of ``tensors()`` and the arguments of ``from_tensors``):

    "nf4"  packed        uint8 [(N*K + 1) // 2]  two 4-bit codes per byte, first in the high nibble
           absmax        fp32 [nblocks]           (no double quant) the per-block absmax
                         uint8 [nblocks]          (double quant) its 8-bit dynamic codes, with
           absmax2       fp32 [ceil(nblocks / absmax_blocksize)]  second-level absmax
           absmax_code   fp32 [256]               the dynamic code (bnb's ``nested_quant_map``)
           absmax_offset fp32 []                  the mean subtracted before (bnb's ``offset``)
    "int8" CB            int8 [N, K]              codes
           SCB           fp32 [N]                 row absmax

nblocks = ceil(N*K / blocksize).  ``dequantize()`` equals bitsandbytes' dequantization of the same
data bit for bit (``fastpeft.quant.nf4`` / ``fastpeft.quant.int8`` state the formulas).

On a layer (``fastpeft.quantize``, ``from_peft``): the tensors are the layer's registered buffers
``weight_<name>`` (so ``state_dict`` / ``load_state_dict`` carry them) and ``layer.weight`` is the
QuantizedWeight over those very tensors.  Moving the module (``.to(device)``, ``.cuda()``,
``.to(dtype)``, ``.half()``, ``to_empty``) goes through ``PEFTLinear._apply``, which hands the base
to ``module_apply``: the buffers are kept out of nn.Module's own conversion (it would cast the fp32
absmax / SCB to the new float dtype), each is moved by the same function with its own dtype kept
(its format), the buffers are re-registered and ``layer.weight`` is rebuilt over them.  A float
dtype move to float32 / bfloat16 / float16 sets the dtype the base dequantizes to (the op needs it
equal to x's), so ``model.to(torch.bfloat16)`` computes in bf16 over the same 4-bit codes; any
other target dtype (float64) leaves the dequantized dtype as it was (the op then names the
mismatch).  Derived data cached on a QuantizedWeight (DoRA's ‖W‖²_row) is keyed on its tensors'
versions and storages, so a load or a move recomputes it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fastpeft.quant import dynamic, int8, nf4

FORMATS = ("nf4", "int8")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NF4_PLAIN = ("packed", "absmax")
_NF4_NESTED = ("packed", "absmax", "absmax2", "absmax_code", "absmax_offset")
_INT8 = ("CB", "SCB")
BUFFER_PREFIX = "weight_"  # a layer's buffer of tensor <name> is "weight_<name>"


def _check_format(fmt) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}, got {fmt!r}")
    return fmt


class QuantizedWeight:
    """A quantized frozen weight [N, K] that dequantizes to ``dtype``.

    Build one with ``fastpeft.quant.quantize_weight``, ``QuantizedWeight.from_bnb`` (shares a
    bitsandbytes parameter's storage) or ``QuantizedWeight.from_tensors`` (e.g. from a state_dict).
    """

    __slots__ = ("format", "shape", "dtype", "blocksize", "absmax_blocksize", "_t", "_cache")

    def __init__(self, fmt: str, shape, dtype: torch.dtype, tensors: dict, blocksize: Optional[int] = None,
                 absmax_blocksize: int = dynamic.ABSMAX_BLOCKSIZE):
        # Internal: from_tensors validates; quantize_weight / from_bnb build valid tensors.
        self.format = fmt
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = blocksize if fmt == "nf4" else None
        self.absmax_blocksize = absmax_blocksize if fmt == "nf4" and "absmax2" in tensors else None
        self._t = dict(tensors)
        self._cache = {}  # derived data (fastpeft.quant.dora's row norms), keyed on the tensors' versions

    # ----------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_tensors(cls, format: str, shape, dtype: torch.dtype, tensors: dict, blocksize: Optional[int] = None,
                     absmax_blocksize: int = dynamic.ABSMAX_BLOCKSIZE) -> QuantizedWeight:
        """The inverse of ``tensors()``: a QuantizedWeight over the given tensors (no copy).

        ``format`` "nf4" needs ``blocksize`` and the keys packed + absmax (+ absmax2, absmax_code,
        absmax_offset for double quant); "int8" needs CB + SCB.  Shapes, dtypes and devices are
        checked; a ValueError / TypeError names the offending argument.
        """
        _check_format(format)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of float32, bfloat16, float16, got {dtype}")
        try:
            shape = torch.Size(shape)
        except TypeError:
            raise TypeError(f"shape must be a sequence of two ints [N, K], got {shape!r}") from None
        if len(shape) != 2 or min(shape) < 0:
            raise ValueError(f"shape must be [N, K] with N, K >= 0, got {tuple(shape)}")
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise TypeError("tensors must be a dict of name -> Tensor")
        n, k = shape
        numel = n * k
        if format == "nf4":
            blocksize = nf4.check_blocksize(blocksize)
            nested = "absmax2" in tensors
            need = _NF4_NESTED if nested else _NF4_PLAIN
            _check_keys(tensors, need, "nf4" + (" with double quant" if nested else ""))
            nblocks = -(-numel // blocksize)
            want = {"packed": (torch.uint8, ((numel + 1) // 2,)),
                    "absmax": (torch.uint8 if nested else torch.float32, (nblocks,))}
            if nested:
                if isinstance(absmax_blocksize, bool) or not isinstance(absmax_blocksize, int) or absmax_blocksize < 1:
                    raise ValueError(f"absmax_blocksize must be a positive int, got {absmax_blocksize!r}")
                want.update(absmax2=(torch.float32, (-(-nblocks // absmax_blocksize),)),
                            absmax_code=(torch.float32, (256,)), absmax_offset=(torch.float32, ()))
        else:
            _check_keys(tensors, _INT8, "int8")
            want = {"CB": (torch.int8, (n, k)), "SCB": (torch.float32, (n,))}
        device = tensors[next(iter(want))].device
        for name, (dt, shp) in want.items():
            t = tensors[name]
            if t.dtype != dt:
                raise TypeError(f"tensors[{name!r}] must be {dt}, got {t.dtype}")
            if tuple(t.shape) != shp:
                raise ValueError(f"tensors[{name!r}] must have shape {list(shp)} for a {list(shape)} weight, "
                                 f"got {list(t.shape)}")
            if t.device != device:
                raise ValueError(f"tensors[{name!r}] is on {t.device}, the others on {device}")
            if not t.is_contiguous():
                raise ValueError(f"tensors[{name!r}] must be contiguous")
        return cls(format, shape, dtype, {k: tensors[k] for k in want}, blocksize, absmax_blocksize)

    @classmethod
    def from_bnb(cls, param, dtype: Optional[torch.dtype] = None) -> QuantizedWeight:
        """A QuantizedWeight over a bitsandbytes ``Params4bit`` (nf4) or ``Int8Params``, sharing its storage.

        Nothing is copied: ``tensors()["packed"]`` (or "CB") views the parameter's data and the
        absmax tensors are the quant_state's own.  The parameter must already be quantized.
        ``dtype`` (the dequantized dtype) defaults to the quant_state's dtype for 4-bit and to
        float32 (what bnb's int8 dequantization returns) for Int8Params.
        """
        from fastpeft.quant.bnb import tensors_from_bnb

        fmt, shape, dtype, tensors, blocksize, absmax_blocksize = tensors_from_bnb(param, dtype)
        return cls.from_tensors(fmt, shape, dtype, tensors, blocksize, absmax_blocksize)

    # ----------------------------------------------------------------------------------------
    # what it holds

    def tensors(self) -> dict:
        """name -> Tensor of everything it holds (register them as buffers; ``from_tensors`` rebuilds)."""
        return dict(self._t)

    @property
    def double_quant(self) -> bool:
        return "absmax2" in self._t

    @property
    def device(self) -> torch.device:
        return next(iter(self._t.values())).device

    @property
    def nbytes(self) -> int:
        """Resident bytes of every tensor it holds."""
        return sum(t.numel() * t.element_size() for t in self._t.values())

    def to(self, device) -> QuantizedWeight:
        """A copy on ``device`` (self when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return self._with({k: v.to(device) for k, v in self._t.items()}, self.dtype)

    def _with(self, tensors: dict, dtype: torch.dtype) -> QuantizedWeight:
        return QuantizedWeight(self.format, self.shape, dtype, tensors, self.blocksize,
                               self.absmax_blocksize or dynamic.ABSMAX_BLOCKSIZE)

    def apply(self, fn) -> QuantizedWeight:
        """The QuantizedWeight after an ``nn.Module._apply`` function ``fn`` (a move, a cast, to_empty).

        Each tensor goes through ``fn`` when ``fn`` keeps its dtype (a device move, to_empty), else
        only to the device ``fn`` sends it to: the storage keeps its format.  The dequantized dtype
        becomes what ``fn`` makes of a ``dtype`` tensor when that is float32 / bfloat16 / float16.
        """
        def probe(dtype):
            return fn(torch.empty(0, dtype=dtype, device=self.device))

        moved = {}
        for k, v in self._t.items():
            p = probe(v.dtype)
            moved[k] = fn(v) if p.dtype == v.dtype else v.to(p.device)
        target = probe(self.dtype).dtype
        return self._with(moved, target if target in FLOAT_DTYPES else self.dtype)

    def module_apply(self, layer, fn, apply):
        """``layer._apply(fn)`` for a layer whose base is this QuantizedWeight (see the module docstring).

        ``apply(fn)`` is nn.Module's own ``_apply`` of the layer; it runs with the base's buffers
        set aside, then the moved tensors are registered and ``layer.weight`` is rebuilt over them.
        Returns the layer.
        """
        names = [BUFFER_PREFIX + k for k in self._t]
        held = {name: layer._buffers.get(name) for name in names}
        for name in names:
            layer._buffers[name] = None  # nn.Module._apply skips None buffers
        try:
            apply(fn)
        finally:
            layer._buffers.update(held)
        moved = self.apply(fn)
        for k, t in moved._t.items():
            layer._buffers[BUFFER_PREFIX + k] = t
        object.__setattr__(layer, "weight", moved)
        return layer

    def __repr__(self) -> str:
        n, k = self.shape
        extra = f", blocksize={self.blocksize}, double_quant={self.double_quant}" if self.format == "nf4" else ""
        per = self.nbytes / max(1, n * k)
        return (f"QuantizedWeight(format={self.format!r}, shape=[{n}, {k}], dtype={self.dtype}{extra}, "
                f"nbytes={self.nbytes} ({per:.4f} per weight), device={self.device})")

    # ----------------------------------------------------------------------------------------
    # dequantization (pure torch: any device)

    def dequantize(self) -> torch.Tensor:
        """The dense [N, K] weight in ``dtype`` (bit for bit bitsandbytes' dequantization)."""
        return self.dequantize_rows(0, self.shape[0])

    def dequantize_rows(self, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows [start, stop) as a dense [stop - start, K] panel (in ``dtype``, or into ``out``).

        Rows need not align with quantization blocks.  ``out``: a contiguous float tensor of that
        shape on this device; it receives ``dequantize()[start:stop]`` cast to its dtype.
        """
        n, k = self.shape
        for name, v in (("start", start), ("stop", stop)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if not 0 <= start <= stop <= n:
            raise ValueError(f"rows [start, stop) must satisfy 0 <= start <= stop <= {n}, got [{start}, {stop})")
        rows = stop - start
        if out is None:
            out = torch.empty(rows, k, dtype=self.dtype, device=self.device)
        else:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"out must be a Tensor, got {type(out).__name__}")
            if tuple(out.shape) != (rows, k) or out.dtype not in FLOAT_DTYPES or not out.is_contiguous() \
                    or out.device != self.device:
                raise ValueError(f"out must be a contiguous float32/bfloat16/float16 [{rows}, {k}] tensor on "
                                 f"{self.device}, got {out.dtype} {list(out.shape)} on {out.device}")
        if rows == 0 or k == 0:
            return out
        # values are computed in fp32; a 16-bit weight's panel in another dtype goes through it
        via = self.dtype if self.dtype not in (torch.float32, out.dtype) else None
        if self.format == "nf4":
            nf4.dequantize_flat(self._t, start * k, stop * k, self.blocksize, out.view(-1), n * k,
                                self.absmax_blocksize or dynamic.ABSMAX_BLOCKSIZE, via)
        else:
            int8.dequantize_rows(self._t, start, stop, out, via)
        return out


def _check_keys(tensors: dict, need, what: str) -> None:
    missing = [k for k in need if k not in tensors]
    extra = [k for k in tensors if k not in need]
    if missing or extra:
        raise ValueError(f"tensors for {what} must have exactly the keys {list(need)}; "
                         f"missing {missing}, unexpected {extra}")


def quantize_weight(w: torch.Tensor, format: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True) -> QuantizedWeight:
    """Quantize a 2-D float weight [N, K] to ``format`` ("nf4" or "int8"); returns a QuantizedWeight.

    nf4: bitsandbytes' NF4 with ``blocksize`` in 32..4096 (powers of two) and, with
    ``double_quant``, the 8-bit absmax (bnb ``compress_statistics``).  int8: one absmax scale per
    output row (``blocksize`` and ``double_quant`` do not apply).  A weight that requires grad
    is detached; the weight itself is never modified.  Non-finite weights are an error.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"w must be a float32, bfloat16 or float16 tensor, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [N, K], got shape {list(w.shape)}")
    _check_format(format)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    if format == "nf4":
        nf4.check_blocksize(blocksize)
    w = w.detach()
    if w.numel() and not bool(torch.isfinite(w).all()):
        raise ValueError("w has non-finite values (inf or nan); they cannot be quantized")
    if format == "nf4":
        t = nf4.quantize(w, blocksize, double_quant)
        return QuantizedWeight("nf4", w.shape, w.dtype, t, blocksize)
    return QuantizedWeight("int8", w.shape, w.dtype, int8.quantize(w))


def bytes_per_weight(qw: QuantizedWeight) -> float:
    """Resident bytes per weight value."""
    return qw.nbytes / max(1, math.prod(qw.shape))
