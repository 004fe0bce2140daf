// The fused op's forward and backward (dense paths + the sparse delta) and the dropout-mask ops.
#pragma once

#include <array>

#include "common.h"

namespace fastpeft {

// Backend contract of fastpeft/core/backends/__init__.py: returns (y, xa, z).
std::tuple<Tensor, Tensor, Tensor> peft_linear_forward(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                                       const OptTensor& lora_A, const OptTensor& lora_B,
                                                       const OptTensor& ia3_in, const OptTensor& ia3_out,
                                                       const OptTensor& sparse_index, const OptTensor& sparse_value,
                                                       double lora_scale, double p, int64_t seed, bool save_z);

// Gradients for (x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_value), each in its
// argument's dtype; an empty [0] tensor where needs[i] is false.
std::vector<Tensor> peft_linear_backward(const Tensor& grad_y, const OptTensor& x, const Tensor& weight,
                                         const OptTensor& bias, const OptTensor& lora_A, const OptTensor& lora_B,
                                         const OptTensor& ia3_in, const OptTensor& ia3_out,
                                         const OptTensor& sparse_index, const OptTensor& sparse_value,
                                         const OptTensor& xa, const OptTensor& z, double lora_scale, double p,
                                         int64_t seed, std::array<bool, 8> needs);

// Shape-only versions for the Meta dispatch key (same checks, no data).
std::tuple<Tensor, Tensor, Tensor> peft_linear_forward_meta(const Tensor& x, const Tensor& weight,
                                                            const OptTensor& bias, const OptTensor& lora_A,
                                                            const OptTensor& lora_B, const OptTensor& ia3_in,
                                                            const OptTensor& ia3_out, const OptTensor& sparse_index,
                                                            const OptTensor& sparse_value, double lora_scale,
                                                            double p, int64_t seed, bool save_z);
std::vector<Tensor> peft_linear_backward_meta(const Tensor& grad_y, const OptTensor& x, const Tensor& weight,
                                              const OptTensor& bias, const OptTensor& lora_A,
                                              const OptTensor& lora_B, const OptTensor& ia3_in,
                                              const OptTensor& ia3_out, const OptTensor& sparse_index,
                                              const OptTensor& sparse_value, const OptTensor& xa, const OptTensor& z,
                                              double lora_scale, double p, int64_t seed, std::array<bool, 8> needs);

// Every check of fastpeft.core.validation, in its order and with its messages (csrc/checks.h), plus
// CPU placement; x is [..., K] of any shape.  check_values: also the sparse index's values (reads it).
void check_forward_args(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& lora_A,
                        const OptTensor& lora_B, const OptTensor& ia3_in, const OptTensor& ia3_out,
                        const OptTensor& sparse_index, const OptTensor& sparse_value, double p,
                        std::optional<int64_t> seed, bool check_values);

// peft_linear_forward without its argument checks, for callers that ran check_forward_args already.
std::tuple<Tensor, Tensor, Tensor> peft_linear_forward_prechecked(
    const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& lora_A, const OptTensor& lora_B,
    const OptTensor& ia3_in, const OptTensor& ia3_out, const OptTensor& sparse_index, const OptTensor& sparse_value,
    double lora_scale, double p, int64_t seed, bool save_z);

// The whole op as one differentiable C++ op (csrc/autograd.cpp): y only, autograd in C++.
Tensor peft_linear_autograd(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& lora_A,
                            const OptTensor& lora_B, const OptTensor& ia3_in, const OptTensor& ia3_out,
                            const OptTensor& sparse_index, const OptTensor& sparse_value, double lora_scale, double p,
                            std::optional<int64_t> seed);
Tensor peft_linear_inference(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& lora_A,
                             const OptTensor& lora_B, const OptTensor& ia3_in, const OptTensor& ia3_out,
                             const OptTensor& sparse_index, const OptTensor& sparse_value, double lora_scale,
                             double p, std::optional<int64_t> seed);
Tensor peft_linear_autocast(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& lora_A,
                            const OptTensor& lora_B, const OptTensor& ia3_in, const OptTensor& ia3_out,
                            const OptTensor& sparse_index, const OptTensor& sparse_value, double lora_scale, double p,
                            std::optional<int64_t> seed);
Tensor peft_linear_meta(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& lora_A,
                        const OptTensor& lora_B, const OptTensor& ia3_in, const OptTensor& ia3_out,
                        const OptTensor& sparse_index, const OptTensor& sparse_value, double lora_scale, double p,
                        std::optional<int64_t> seed);

// Bool [rows, cols]: true where dropout keeps the element (fastpeft.mask.keep_mask), for rows
// [first_row, first_row + rows) of a [*, cols] input.
Tensor keep_mask(int64_t seed, double p, int64_t rows, int64_t cols, int64_t first_row);
// Inverted dropout of a 2-D x with the counter-based mask: x * keep / (1 - p).
Tensor dropout(const Tensor& x, double p, int64_t seed);

}  // namespace fastpeft
