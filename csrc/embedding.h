// LoRA on an embedding table (fastpeft.LoRAEmbedding): the fused gather + rank-r product.
#pragma once

#include <array>
#include <tuple>

#include "common.h"

namespace fastpeft {

// y[m, :] = E[ids[m], :] + scale * sum_k A[k, ids[m]] B[:, k]   (y in E's dtype, float32 accumulation)
// ids int64 [M] in [0, V); E = weight [V, N]; A = lora_A [r, V], B = lora_B [N, r] (E's dtype or float32).
Tensor embedding_lora_forward(const Tensor& ids, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
                              double scale);

// (dA [r, V] in A's dtype, dB [N, r] in B's dtype), an empty [0] tensor where needs[i] is false:
//   u = grad_y B;  dA[:, j] = scale * sum_{m: ids[m] = j, j != padding_idx} u[m, :] (/ count(j) with freq)
//   dB = scale * grad_y^T A[:, ids]^T
std::tuple<Tensor, Tensor> embedding_lora_backward(const Tensor& grad_y, const Tensor& ids, const Tensor& lora_A,
                                                   const Tensor& lora_B, double scale, int64_t padding_idx,
                                                   bool scale_grad_by_freq, std::array<bool, 2> needs);

}  // namespace fastpeft
