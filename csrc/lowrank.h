// The rank-sized products of the LoRA path on CPU (r <= kMaxKernelRank), register-blocked.
#pragma once

#include <utility>

#include "common.h"

namespace fastpeft {

// Up to this rank the products below run in our kernels; above it they go to MKL, which is
// efficient once the rank dimension fills its micro-kernel (r = 64 runs near the base GEMM's rate).
constexpr int64_t kMaxKernelRank = 64;

// [M, r] in x's dtype: drop(x)[M, K] A^T, A = lora_A [r, K] (x's dtype or float32).  p = 0: no mask.
Tensor lowrank_down(const Tensor& x, const Tensor& lora_A, double p, int64_t seed);

// The LoRA branch of the forward in one pass over x: returns (y, xa) with
//   xa = drop(x) A^T [M, r]   and   y = bias + scale * xa B^T [M, N]   (both in x's dtype)
// so the frozen GEMM can accumulate onto y (beta = 1) and y is written once.
std::pair<Tensor, Tensor> lowrank_forward(const Tensor& x, const Tensor& lora_A, const Tensor& lora_B,
                                          const OptTensor& bias, double scale, double p, int64_t seed);

struct LowRankGrads {
  Tensor gyb, dB, dA;  // float32 [M, r], [N, r], [r, K]; dB / dA undefined unless asked for
};

// One pass over grad_y [M, N] and x [M, K] for the three products that read them
// (B = lora_B [N, r], xa = the saved drop(x) A^T [M, r], mask from (seed, p) as in the forward):
//   gyb = grad_y B;   dB = scale * grad_y^T xa (want_dB);   dA = scale * gyb^T drop(x) (want_dA)
LowRankGrads lowrank_backward(const Tensor& grad_y, const Tensor& lora_B, const Tensor& xa, const Tensor& x,
                              double scale, double p, int64_t seed, bool want_dB, bool want_dA);

// The two kernels as checked standalone ops (torch.ops.fastpeft_cpp.lowrank_forward / _backward):
// forward -> (y, xa); backward -> float32 (gyb, dB, dA), dB / dA empty [0] when xa / x is None.
std::tuple<Tensor, Tensor> lowrank_forward_op(const Tensor& x, const Tensor& lora_A, const Tensor& lora_B,
                                              const OptTensor& bias, double scale, double p, int64_t seed);
std::tuple<Tensor, Tensor, Tensor> lowrank_backward_op(const Tensor& grad_y, const Tensor& lora_B, const OptTensor& xa,
                                                       const OptTensor& x, double scale, double p, int64_t seed);

}  // namespace fastpeft
