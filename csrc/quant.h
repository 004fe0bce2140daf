// Quantized frozen weights (NF4 in bitsandbytes' layout, row-wise int8 CB/SCB): panel dequantization
// and the panel GEMMs y = x W^T and dX = gy W that never hold a dense [N, K] (csrc/quant.cpp).
//
// NF4: the [N, K] weight flattened row-major, blocks of `blocksize` consecutive values (blocks need
// not align with rows; the last block may be partial), two 4-bit codes per byte (first value in the
// HIGH nibble).  value = NF4[code] * absmax[block], in fp32; with double quantization
// absmax[b] = (absmax_code[absmax_q[b]] * absmax2[b / absmax_blocksize]) + absmax_offset, rounded
// after the product and after the sum (as bitsandbytes).  int8: value = (CB[r, c] * SCB[r]) * (1/127)
// with bnb's fp32 constant 7.874015718698502e-3.  A panel is then rounded to the weight's dtype
// (when 16-bit) and to the buffer's type, so panels equal QuantizedWeight.dequantize() bit for bit.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string_view>

namespace fastpeft {
namespace quant {

enum class Format { kNF4, kInt8 };

// Raw pointers of one quantized weight (views of tensors that outlive it).
struct QuantWeight {
  Format format;
  int64_t n = 0, k = 0, blocksize = 0, absmax_blocksize = 256;
  const uint8_t* packed = nullptr;    // nf4: [(n*k + 1) / 2]
  const float* absmax = nullptr;      // nf4 plain: [nblocks]
  const uint8_t* absmax_q = nullptr;  // nf4 double quant: [nblocks] codes ...
  const float* absmax2 = nullptr;     // ... second-level absmax [ceil(nblocks / absmax_blocksize)]
  const float* absmax_code = nullptr; // ... the 256-entry dynamic code
  float absmax_offset = 0.f;
  const int8_t* cb = nullptr;         // int8: [n, k]
  const float* scb = nullptr;         // int8: [n]
  at::ScalarType weight_dtype = at::kFloat;
};

// Checks the tensors (dtypes, sizes, contiguity, CPU) and returns their view.
QuantWeight make_view(const at::Tensor& data, const at::Tensor& absmax, const std::optional<at::Tensor>& absmax2,
                      const std::optional<at::Tensor>& absmax_code, const std::optional<at::Tensor>& absmax_offset,
                      std::string_view format, int64_t n, int64_t k, int64_t blocksize, int64_t absmax_blocksize,
                      at::ScalarType weight_dtype);

// W[r0:r1, c0:c1] into out (row stride ld) of type T (float, c10::BFloat16, c10::Half).
template <typename T>
void dequantize_block(const QuantWeight& q, int64_t r0, int64_t r1, int64_t c0, int64_t c1, T* out, int64_t ld);

// y [M, N] = x [M, K] W^T and dX [M, K] = gy [M, N] W, a panel of ~panel_bytes (0: 1 MiB) at a time.
at::Tensor linear(const at::Tensor& x, const QuantWeight& q, int64_t panel_bytes);
at::Tensor linear_grad_input(const at::Tensor& grad_y, const QuantWeight& q, int64_t panel_bytes);
// out += a W^T (forward) or a W: the frozen product accumulated onto the fused op's other terms.
void linear_add_(at::Tensor& out, const at::Tensor& a, const QuantWeight& q, bool forward, int64_t panel_bytes);

}  // namespace quant
}  // namespace fastpeft
