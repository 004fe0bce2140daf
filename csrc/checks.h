// Argument checks of the fused op: the C++ twin of fastpeft/core/validation.py.
//
// Same checks, same order, same messages (Python's spelling of dtypes, shapes and floats), raised as
// ValueError / TypeError (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE), so a bad call fails alike on every
// route; tests/test_validation.py compares them case by case.  The order:
//   1. scalars (check_scalars), 2. tensors' dtypes, shapes, devices (check_tensors),
//   3. what reads data: the sparse index's values (check_sparse_values in sparse.h).
// Nothing is computed and no seed is drawn before all three have passed.
#pragma once

#include <string>

#include "common.h"
#include "op_args.h"

namespace fastpeft {

// The messages fastpeft.core.validation defines as ONCE_DIFFERENTIABLE / FORWARD_AD_UNSUPPORTED.
extern const char* const kOnceDifferentiable;
extern const char* const kForwardAdUnsupported;

// A dtype as Python prints it ("torch.float32"); a float as Python's repr prints it ("1.0", "1e-05").
std::string py_dtype(at::ScalarType t);
std::string py_float(double v);

struct Dims {
  int64_t M, K, N, r;
};

// lora_dropout in [0, 1); a given dropout_seed in [0, 2**63).
void check_scalars(double p, std::optional<int64_t> seed);

// The tensor checks of fastpeft.core.validation.check_peft_linear_args.  x_like is x itself ([..., K],
// any shape; is_x) or, for the backward, grad_y (only its dtype and device are read); M is its row count.
// a.x is not read (the backward may have none).
Dims check_tensors(const Tensor& x_like, bool is_x, int64_t M, const OpArgs& a);

// NotImplementedError (kForwardAdUnsupported) when a differentiable argument carries a forward-AD tangent.
void check_no_tangent(const OpArgs& a);

}  // namespace fastpeft
