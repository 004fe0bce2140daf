// The fused op's forward and backward (dense paths + the sparse delta) and the dropout-mask ops.
#pragma once

#include <array>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include "common.h"
#include "op_args.h"

namespace fastpeft {

// Backend contract of fastpeft/core/backends/__init__.py: returns (y, xa, z); a.x is [M, K] contiguous.
std::tuple<Tensor, Tensor, Tensor> peft_linear_forward(const OpArgs& a, bool save_z);

// One gradient per Grad (op_args.h), each in its argument's dtype; an empty [0] tensor where needs
// is false.  a.x is undefined when no gradient reads it.
std::vector<Tensor> peft_linear_backward(const Tensor& grad_y, const OpArgs& a, const OptTensor& xa,
                                         const OptTensor& z, const Needs& needs);

// Shape-only versions for the Meta dispatch key (same checks, no data).
std::tuple<Tensor, Tensor, Tensor> peft_linear_forward_meta(const OpArgs& a, bool save_z);
std::vector<Tensor> peft_linear_backward_meta(const Tensor& grad_y, const OpArgs& a, const OptTensor& xa,
                                              const OptTensor& z, const Needs& needs);

// Every check of fastpeft.core.validation, in its order and with its messages (csrc/checks.h), plus
// CPU placement; a.x is [..., K] of any shape; seed is the given one (a.seed is not read).
// check_values: also the sparse index's values (reads it).
void check_forward_args(const OpArgs& a, std::optional<int64_t> seed, bool check_values);

// peft_linear_forward without its argument checks, for callers that ran check_forward_args already.
std::tuple<Tensor, Tensor, Tensor> peft_linear_forward_prechecked(const OpArgs& a, bool save_z);

// fastpeft_cpp::peft_linear (csrc/autograd.cpp), boxed kernels over its schema: the whole op as one
// differentiable C++ op (y only, autograd in C++; Autograd key), without autograd (CPU), shapes
// only (Meta), and F.linear's autocast rule (AutocastCPU).
void peft_linear_autograd(const c10::OperatorHandle& op, torch::jit::Stack* stack);
void peft_linear_inference(const c10::OperatorHandle& op, torch::jit::Stack* stack);
void peft_linear_meta(const c10::OperatorHandle& op, torch::jit::Stack* stack);
void peft_linear_autocast(const c10::OperatorHandle& op, torch::jit::Stack* stack);

// Bool [rows, cols]: true where dropout keeps the element (fastpeft.mask.keep_mask), for rows
// [first_row, first_row + rows) of a [*, cols] input.
Tensor keep_mask(int64_t seed, double p, int64_t rows, int64_t cols, int64_t first_row);
// Inverted dropout of a 2-D x with the counter-based mask: x * keep / (1 - p).
Tensor dropout(const Tensor& x, double p, int64_t seed);

}  // namespace fastpeft
