// The fused op's arguments and gradients in C++: the twin of fastpeft/core/spec.py.
//
// FASTPEFT_TENSOR_ARGS lists the tensor arguments in spec.TENSORS order (name, C++ type, gradient
// slot); OpArgs holds them plus the scalars (spec.SCALARS); Grad numbers the gradients in
// spec.GRAD_NAMES order.  tests/test_spec.py parses this file and checks both lists against the
// spec, and the op schemas in registration.cpp against spec.schema().  Everything generic over the
// arguments (reading a boxed stack, a TensorList for autograd, device / tangent checks, autocast)
// goes through the helpers here, so adding a PEFT path's tensor is one row below plus its math.
#pragma once

#include <ATen/core/ivalue.h>

#include <array>
#include <vector>

#include "common.h"

namespace fastpeft {

// The gradients, in spec.GRAD_NAMES order: the index of each in a backward's result.
enum Grad : int {
  g_x,
  g_weight,
  g_bias,
  g_lora_A,
  g_lora_B,
  g_ia3_in,
  g_ia3_out,
  g_sparse_value,
  g_dora_scale,
  kNumGrads
};
constexpr int kNoGrad = -1;

// X(name, type, gradient slot): the tensor arguments in spec.TENSORS order.  x and weight are plain
// Tensors (undefined where a backward does not get x); the rest are optional.
#define FASTPEFT_TENSOR_ARGS(X)            \
  X(x, Tensor, g_x)                        \
  X(weight, Tensor, g_weight)              \
  X(bias, OptTensor, g_bias)               \
  X(lora_A, OptTensor, g_lora_A)           \
  X(lora_B, OptTensor, g_lora_B)           \
  X(ia3_in, OptTensor, g_ia3_in)           \
  X(ia3_out, OptTensor, g_ia3_out)         \
  X(sparse_index, OptTensor, kNoGrad)      \
  X(sparse_value, OptTensor, g_sparse_value) \
  X(dora_scale, OptTensor, g_dora_scale)

#define FASTPEFT_COUNT_ARG(name, type, grad) +1
constexpr int kNumTensors = 0 FASTPEFT_TENSOR_ARGS(FASTPEFT_COUNT_ARG);
constexpr int kNumScalars = 3;  // lora_scale, p, seed
#undef FASTPEFT_COUNT_ARG

#define FASTPEFT_GRAD_SLOT(name, type, grad) grad,
// For each tensor argument, its Grad (kNoGrad for sparse_index).
constexpr int kGradOf[kNumTensors] = {FASTPEFT_TENSOR_ARGS(FASTPEFT_GRAD_SLOT)};
#undef FASTPEFT_GRAD_SLOT

struct OpArgs {
#define FASTPEFT_FIELD(name, type, grad) type name;
  FASTPEFT_TENSOR_ARGS(FASTPEFT_FIELD)
#undef FASTPEFT_FIELD
  double lora_scale = 1.0;
  double p = 0.0;
  int64_t seed = 0;
};

// Which gradients a backward computes, by Grad.
using Needs = std::array<bool, kNumGrads>;

inline bool present(const Tensor& t) { return t.defined(); }
inline const Tensor& as_tensor(const Tensor& t) { return t; }
inline const Tensor& as_tensor(const OptTensor& t) {
  static const Tensor none;  // undefined
  return present(t) ? *t : none;
}

namespace detail {
inline void assign(Tensor& field, const Tensor& t) { field = t; }
inline void assign(OptTensor& field, const Tensor& t) { field = t.defined() ? OptTensor(t) : std::nullopt; }
inline Tensor from_ivalue(const c10::IValue& v) { return v.isNone() ? Tensor() : v.toTensor(); }
}  // namespace detail

// f(index, name, const Tensor& t) for each tensor argument in spec order (t undefined when absent).
template <typename F>
void for_each_tensor(const OpArgs& a, F&& f) {
  int i = 0;
#define FASTPEFT_VISIT(name, type, grad) f(i++, #name, as_tensor(a.name));
  FASTPEFT_TENSOR_ARGS(FASTPEFT_VISIT)
#undef FASTPEFT_VISIT
}

// The tensor arguments as a list in spec order (undefined tensors for absent ones): what the C++
// autograd Function takes, so its backward returns one gradient per element.
inline std::vector<Tensor> to_tensors(const OpArgs& a) {
  std::vector<Tensor> out;
  out.reserve(kNumTensors);
  for_each_tensor(a, [&](int, const char*, const Tensor& t) { out.push_back(t); });
  return out;
}

// OpArgs from kNumTensors tensors in spec order (undefined: absent) and the scalars.
inline OpArgs op_args(const Tensor* tensors, double lora_scale, double p, int64_t seed) {
  OpArgs a;
  int i = 0;
#define FASTPEFT_ASSIGN(name, type, grad) detail::assign(a.name, tensors[i++]);
  FASTPEFT_TENSOR_ARGS(FASTPEFT_ASSIGN)
#undef FASTPEFT_ASSIGN
  a.lora_scale = lora_scale;
  a.p = p;
  a.seed = seed;
  return a;
}

// OpArgs from a boxed stack: kNumTensors values (Tensor or None) at `tensors`, and lora_scale, p
// at `scalars` (the seed is read by the caller: `int` in some schemas, `int?` in one).
inline OpArgs op_args(const c10::IValue* tensors, const c10::IValue* scalars, int64_t seed) {
  std::array<Tensor, kNumTensors> t;
  for (int i = 0; i < kNumTensors; ++i) t[i] = detail::from_ivalue(tensors[i]);
  return op_args(t.data(), scalars[0].toDouble(), scalars[1].toDouble(), seed);
}

// The save policy of spec.saved_for_backward: x only when a gradient reads it, xa only when lora_B
// trains, z only when ia3_out or dora_scale trains (never a dropout mask).
struct SavePolicy {
  bool x, xa, z;
};
inline SavePolicy saved_for_backward(const Needs& n) {
  return {n[g_weight] || n[g_lora_A] || n[g_ia3_in] || n[g_sparse_value], n[g_lora_B],
          n[g_ia3_out] || n[g_dora_scale]};
}

}  // namespace fastpeft
