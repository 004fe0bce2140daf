// Bottleneck adapter on the CPU (fastpeft.adapters):  y = h + act(h W_dᵀ + b_d) W_uᵀ + b_u.
//
// The GEMMs are at::addmm / at::mm (MKL / oneDNN); what is fused is everything around them:
//   forward   a = addmm(b_d, h, W_dᵀ)          the down bias rides in addmm's beta term
//             g = act(a)                       one pass over the [M, m] result (in place when a is not kept)
//             y = h + b_u, then y += g W_uᵀ    the residual and the up bias are written once, then the up GEMM
//                                              accumulates into y (addmm_ with beta = 1): no [M, d] temporary
//   backward  da = (dy W_u) ⊙ act'(a)          one pass over [M, m] that also forms g = act(a) for dW_u
//             dh = addmm(dy, da, W_d)          the residual's gradient rides in beta
//             dW_u = dyᵀ g, dW_d = daᵀ h, db_u = Σ dy, db_d = Σ da
// Only a (the [M, m] pre-activation) and h are saved by the caller; g is recomputed.
// Activation codes match fastpeft.adapters.ACTIVATIONS: 0 identity, 1 relu, 2 gelu (erf), 3 silu, 4 tanh.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <tuple>
#include <type_traits>

namespace fastpeft_adapter {

using at::Tensor;

constexpr int64_t kGrain = 1 << 14;  // elements per parallel chunk: amortises thread start-up on small M

template <int ACT, typename T>
inline T act_fwd(T x) {
  if constexpr (ACT == 1) return x < T(0) ? T(0) : x;  // torch.relu: NaN stays NaN (and -0 stays -0)
  else if constexpr (ACT == 2) return T(0.5) * x * (T(1) + std::erf(x * T(0.7071067811865476)));
  else if constexpr (ACT == 3) return x / (T(1) + std::exp(-x));
  else if constexpr (ACT == 4) return std::tanh(x);
  else return x;
}

template <int ACT, typename T>
inline T act_grad(T x) {
  if constexpr (ACT == 1) return x <= T(0) ? T(0) : T(1);  // torch's threshold_backward: NaN passes the gradient
  else if constexpr (ACT == 2)  // Φ(x) + x φ(x)
    return T(0.5) * (T(1) + std::erf(x * T(0.7071067811865476))) + x * std::exp(T(-0.5) * x * x) * T(0.3989422804014327);
  else if constexpr (ACT == 3) {
    T s = T(1) / (T(1) + std::exp(-x));
    return s * (T(1) + x * (T(1) - s));
  } else if constexpr (ACT == 4) {
    T t = std::tanh(x);
    return T(1) - t * t;
  } else return T(1);
}

// Calls f(std::integral_constant<int, ACT>) so every loop is compiled per activation (vectorisable).
template <typename F>
inline void dispatch_act(int64_t act, F&& f) {
  switch (act) {
    case 0: f(std::integral_constant<int, 0>{}); break;
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: TORCH_CHECK(false, "fastpeft_cpp.adapter: activation code must be 0..4, got ", act);
  }
}

#define ADAPTER_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

void check_args(const Tensor& h, const Tensor& down_weight, const Tensor& up_weight, const char* hname) {
  TORCH_CHECK(h.dim() == 2, "fastpeft_cpp.adapter: ", hname, " must be 2-D [M, d], got ", h.sizes());
  TORCH_CHECK(h.device().is_cpu(), "fastpeft_cpp.adapter: ", hname, " must be a CPU tensor, got ", h.device());
  TORCH_CHECK(at::isFloatingType(h.scalar_type()), "fastpeft_cpp.adapter: ", hname,
              " must be a floating tensor, got ", h.scalar_type());
  const int64_t d = h.size(1);
  TORCH_CHECK(down_weight.dim() == 2 && down_weight.size(1) == d && down_weight.size(0) >= 1,
              "fastpeft_cpp.adapter: down_weight must be [m, ", d, "] with m >= 1, got ", down_weight.sizes());
  const int64_t m = down_weight.size(0);
  TORCH_CHECK(up_weight.dim() == 2 && up_weight.size(0) == d && up_weight.size(1) == m,
              "fastpeft_cpp.adapter: up_weight must be [", d, ", ", m, "], got ", up_weight.sizes());
  for (const Tensor* t : {&down_weight, &up_weight}) {
    TORCH_CHECK(t->scalar_type() == h.scalar_type(), "fastpeft_cpp.adapter: adapter weights must have ", hname,
                "'s dtype ", h.scalar_type(), " (cast fp32 adapters first), got ", t->scalar_type());
    TORCH_CHECK(t->device().is_cpu(), "fastpeft_cpp.adapter: adapter weights must be CPU tensors");
  }
}

void check_vector(const std::optional<Tensor>& t, int64_t n, const Tensor& h, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "fastpeft_cpp.adapter: ", name, " must be [", n, "], got ",
              t->sizes());
  TORCH_CHECK(t->scalar_type() == h.scalar_type() && t->device().is_cpu(), "fastpeft_cpp.adapter: ", name,
              " must be a CPU tensor of dtype ", h.scalar_type());
}

std::tuple<Tensor, Tensor> adapter_fwd(const Tensor& h_in, const Tensor& down_weight,
                                       const std::optional<Tensor>& down_bias, const Tensor& up_weight,
                                       const std::optional<Tensor>& up_bias, int64_t activation, bool save_pre) {
  check_args(h_in, down_weight, up_weight, "h");
  const int64_t M = h_in.size(0), d = h_in.size(1), m = down_weight.size(0);
  check_vector(down_bias, m, h_in, "down_bias");
  check_vector(up_bias, d, h_in, "up_bias");
  const Tensor h = h_in.contiguous();
  const bool has_bd = down_bias.has_value() && down_bias->defined();
  const bool has_bu = up_bias.has_value() && up_bias->defined();

  // The loops below index row-major: GEMM results may come back with other strides for transposed inputs.
  Tensor pre = (has_bd ? at::addmm(*down_bias, h, down_weight.t()) : at::mm(h, down_weight.t())).contiguous();
  Tensor g = save_pre ? at::empty_like(pre, at::MemoryFormat::Contiguous) : pre;
  Tensor y = at::empty_like(h);
  const Tensor bu_c = has_bu ? up_bias->contiguous() : Tensor();  // owned here: its pointer outlives the loop
  ADAPTER_DISPATCH(h.scalar_type(), "fastpeft_adapter_fwd", [&] {
    using opmath = at::opmath_type<scalar_t>;
    const scalar_t* a = pre.const_data_ptr<scalar_t>();
    scalar_t* gp = g.data_ptr<scalar_t>();
    dispatch_act(activation, [&](auto tag) {
      constexpr int ACT = decltype(tag)::value;
      at::parallel_for(0, M * m, kGrain, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) gp[i] = static_cast<scalar_t>(act_fwd<ACT>(static_cast<opmath>(a[i])));
      });
    });
    // y = h + b_u, row by row; the up GEMM then accumulates into y.
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* bu = has_bu ? bu_c.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, kGrain / std::max<int64_t>(d, 1)), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* hr = hp + r * d;
        scalar_t* yr = yp + r * d;
        if (bu != nullptr) {
          for (int64_t j = 0; j < d; ++j) yr[j] = static_cast<scalar_t>(static_cast<opmath>(hr[j]) + static_cast<opmath>(bu[j]));
        } else {
          for (int64_t j = 0; j < d; ++j) yr[j] = hr[j];
        }
      }
    });
  });
  if (M > 0) y.addmm_(g, up_weight.t());
  return {y, save_pre ? pre : at::empty({0}, h.options())};
}

std::vector<Tensor> adapter_bwd(const Tensor& grad_y_in, const Tensor& h_in, const Tensor& pre_in,
                                const Tensor& down_weight, const Tensor& up_weight, int64_t activation,
                                std::array<bool, 5> needs) {
  check_args(grad_y_in, down_weight, up_weight, "grad_y");
  const bool need_h = needs[0], need_wd = needs[1], need_bd = needs[2], need_wu = needs[3], need_bu = needs[4];
  const int64_t M = grad_y_in.size(0), m = down_weight.size(0);
  TORCH_CHECK(pre_in.dim() == 2 && pre_in.size(0) == M && pre_in.size(1) == m,
              "fastpeft_cpp.adapter: pre (the saved pre-activation) must be [", M, ", ", m, "], got ", pre_in.sizes());
  TORCH_CHECK(pre_in.scalar_type() == grad_y_in.scalar_type(), "fastpeft_cpp.adapter: pre must have grad_y's dtype");
  if (need_wd) {
    TORCH_CHECK(h_in.dim() == 2 && h_in.sizes() == grad_y_in.sizes() && h_in.scalar_type() == grad_y_in.scalar_type(),
                "fastpeft_cpp.adapter: h must be [", M, ", ", grad_y_in.size(1), "] of grad_y's dtype to compute "
                "down_weight's gradient, got ", h_in.sizes());
  }
  const Tensor dy = grad_y_in.contiguous();
  const Tensor pre = pre_in.contiguous();
  const auto empty = at::empty({0}, dy.options());
  const auto wide = at::toOpMathType(dy.scalar_type());
  std::vector<Tensor> out(5, empty);

  if (need_h || need_wd || need_bd || need_wu) {
    Tensor da = at::mm(dy, up_weight).contiguous();  // becomes (dy W_u) ⊙ act'(a) in the pass below
    Tensor g = need_wu ? at::empty_like(pre, at::MemoryFormat::Contiguous) : Tensor();
    ADAPTER_DISPATCH(dy.scalar_type(), "fastpeft_adapter_bwd", [&] {
      using opmath = at::opmath_type<scalar_t>;
      const scalar_t* a = pre.const_data_ptr<scalar_t>();
      scalar_t* dap = da.data_ptr<scalar_t>();
      scalar_t* gp = need_wu ? g.data_ptr<scalar_t>() : nullptr;
      dispatch_act(activation, [&](auto tag) {
        constexpr int ACT = decltype(tag)::value;
        at::parallel_for(0, M * m, kGrain, [&](int64_t lo, int64_t hi) {
          if (gp != nullptr) {
            for (int64_t i = lo; i < hi; ++i) {
              const opmath x = static_cast<opmath>(a[i]);
              dap[i] = static_cast<scalar_t>(static_cast<opmath>(dap[i]) * act_grad<ACT>(x));
              gp[i] = static_cast<scalar_t>(act_fwd<ACT>(x));
            }
          } else {
            for (int64_t i = lo; i < hi; ++i)
              dap[i] = static_cast<scalar_t>(static_cast<opmath>(dap[i]) * act_grad<ACT>(static_cast<opmath>(a[i])));
          }
        });
      });
    });
    if (need_h) out[0] = at::addmm(dy, da, down_weight);
    if (need_wd) out[1] = at::mm(da.t(), h_in.contiguous());
    if (need_bd) out[2] = at::sum(da, {0}, false, wide);
    if (need_wu) out[3] = at::mm(dy.t(), g);
  }
  if (need_bu) out[4] = at::sum(dy, {0}, false, wide);
  return out;
}

}  // namespace fastpeft_adapter

TORCH_LIBRARY_FRAGMENT(fastpeft_cpp, m) {
  m.def(
      "adapter_fwd(Tensor h, Tensor down_weight, Tensor? down_bias, Tensor up_weight, Tensor? up_bias, "
      "int activation, bool save_pre) -> (Tensor, Tensor)");
  // Gradients for (h, down_weight, down_bias, up_weight, up_bias) in grad_y's dtype (bias sums in its
  // accumulation dtype); an empty [0] tensor where needs[i] is False.  h may be empty unless needs[1].
  m.def(
      "adapter_bwd(Tensor grad_y, Tensor h, Tensor pre, Tensor down_weight, Tensor up_weight, int activation, "
      "bool[5] needs) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastpeft_cpp, CPU, m) {
  m.impl("adapter_fwd", &fastpeft_adapter::adapter_fwd);
  m.impl("adapter_bwd", &fastpeft_adapter::adapter_bwd);
}
