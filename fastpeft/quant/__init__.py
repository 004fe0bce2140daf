"""Quantized frozen bases: NF4 in bitsandbytes' layout and row-wise int8 (bnb CB/SCB).

    qw = quantize_weight(w, "nf4", blocksize=64, double_quant=True)   # -> QuantizedWeight
    qw.dequantize(); qw.dequantize_rows(start, stop); qw.nbytes; qw.tensors()
    QuantizedWeight.from_bnb(param)                                   # shares bnb's storage
    quant_linear(x, qw) = x @ W^T;  quant_linear_grad_input(gy, qw) = gy @ W   (W = qw dequantized)

The products dequantize one cache-sized panel of W at a time (C++ kernels ``fastpeft_cpp::quant_*``
when the extension is built, else a pure-torch panel loop), so no dense [N, K] ever exists.
"""
from fastpeft.quant.dynamic import dynamic_map
from fastpeft.quant.linear import cpp_available, dequantize_rows_cpp, panel_rows, quant_linear, quant_linear_grad_input
from fastpeft.quant.nf4 import BLOCKSIZES, NF4_CODE
from fastpeft.quant.weight import FORMATS, QuantizedWeight, bytes_per_weight, quantize_weight

__all__ = ["QuantizedWeight", "quantize_weight", "quant_linear", "quant_linear_grad_input", "dequantize_rows_cpp",
           "cpp_available", "panel_rows", "bytes_per_weight", "dynamic_map", "NF4_CODE", "BLOCKSIZES", "FORMATS"]
