// Shared helpers for the fastpeft C++ CPU kernels: dtype dispatch, argument checks, conversions.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <optional>
#include <string>

namespace fastpeft {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// x's dtypes the kernels compute in; float64 stays on the reference backend.
#define FASTPEFT_DISPATCH(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                            \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

inline bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// Rows per chunk of the column reductions: enough work per chunk to amortise the partial sums,
// few enough chunks that every thread gets one.
inline int64_t reduction_chunks(int64_t rows) {
  int64_t by_work = std::max<int64_t>(1, rows / 16);
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), by_work));
}

inline void check_compute_dtype(const Tensor& t, const char* name) {
  auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, "fastpeft_cpp: ", name,
              " must be float32, bfloat16 or float16 (float64 runs on the 'reference' backend), got ", d);
}

inline void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastpeft_cpp: ", name, " must be a CPU tensor, got one on ", t.device());
}

inline void check_same_device(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "fastpeft_cpp: ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

// An adapter tensor: the given shape, x's dtype or float32, x's device.
inline void check_adapter(const OptTensor& t, at::IntArrayRef shape, const Tensor& x, const char* name) {
  if (!present(t)) return;
  TORCH_CHECK(t->sizes() == shape, "fastpeft_cpp: ", name, " must have shape ", shape, ", got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == x.scalar_type() || t->scalar_type() == at::kFloat, "fastpeft_cpp: ", name,
              " must have x's dtype (", x.scalar_type(), ") or float32, got ", t->scalar_type());
  check_same_device(*t, x, name);
}

// An adapter vector used in x's precision, handed to the loops as contiguous float32.
inline Tensor as_float_in(const Tensor& t, at::ScalarType dt) {
  return t.to(dt).to(at::kFloat).contiguous();
}

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

}  // namespace fastpeft
