// fastpeft_cpp::peft_linear: the fused op with its autograd in C++, for eager CPU calls.
//
// fastpeft.ops wraps every backend in a Python torch.library custom op; its per-call dispatch
// (argument filling, alias checks, a Python autograd.Function) costs ~0.3 ms per forward+backward,
// a few percent of a 512x1024x1024 layer on two cores.  This op runs the same two kernels
// (peft_linear_forward / peft_linear_backward) under a C++ autograd::Function and saves exactly
// what fastpeft.ops saves: x only if a gradient reads it, xa only if lora_B trains, z only if
// ia3_out trains, never a mask (the seed is an integer).  torch.compile still goes through the
// Python custom op.
#include <torch/csrc/autograd/custom_function.h>

#include "dense.h"

namespace fastpeft {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool trains(const OptTensor& t) { return present(t) && t->requires_grad(); }

class PeftLinearFunction : public torch::autograd::Function<PeftLinearFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                        const OptTensor& lora_A, const OptTensor& lora_B, const OptTensor& ia3_in,
                        const OptTensor& ia3_out, const OptTensor& sparse_index, const OptTensor& sparse_value,
                        double lora_scale, double p, int64_t seed) {
    const std::array<bool, 8> needs = {x.requires_grad(), weight.requires_grad(), trains(bias), trains(lora_A),
                                       trains(lora_B),    trains(ia3_in),         trains(ia3_out),
                                       trains(sparse_value)};
    const bool need_out = needs[6];
    // The Autograd key sees both; on_rows has checked the arguments of a real call already.
    auto fwd = x.is_meta() ? &peft_linear_forward_meta : &peft_linear_forward_prechecked;
    auto [y, xa, z] = fwd(x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, lora_scale,
                          p, seed, /*save_z=*/need_out);
    const bool keep_x = needs[1] || needs[3] || needs[5] || needs[7];
    auto opt = [](const OptTensor& t) { return present(t) ? *t : Tensor(); };
    ctx->save_for_backward({keep_x ? x : Tensor(), weight, opt(bias), opt(lora_A), opt(lora_B), opt(ia3_in),
                            opt(ia3_out), opt(sparse_index), opt(sparse_value), needs[4] ? xa : Tensor(),
                            need_out ? z : Tensor()});
    ctx->saved_data["lora_scale"] = lora_scale;
    ctx->saved_data["p"] = p;
    ctx->saved_data["seed"] = seed;
    int64_t need_bits = 0;
    for (int i = 0; i < 8; ++i) need_bits |= static_cast<int64_t>(needs[i]) << i;
    ctx->saved_data["needs"] = need_bits;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    auto opt = [](const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
    const int64_t need_bits = ctx->saved_data["needs"].toInt();
    std::array<bool, 8> needs{};
    for (int i = 0; i < 8; ++i) needs[i] = (need_bits >> i) & 1;
    variable_list out(12);
    Tensor grad_y = grad_outputs[0];
    if (!grad_y.defined()) return out;
    auto bwd = grad_y.is_meta() ? &peft_linear_backward_meta : &peft_linear_backward;
    auto grads = bwd(grad_y.contiguous(), opt(saved[0]), saved[1], opt(saved[2]), opt(saved[3]),
                                      opt(saved[4]), opt(saved[5]), opt(saved[6]), opt(saved[7]), opt(saved[8]),
                                      opt(saved[9]), opt(saved[10]), ctx->saved_data["lora_scale"].toDouble(),
                                      ctx->saved_data["p"].toDouble(), ctx->saved_data["seed"].toInt(), needs);
    // Inputs: x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, scale, p, seed.
    const int slot[8] = {0, 1, 2, 3, 4, 5, 6, 8};
    for (int i = 0; i < 8; ++i)
      if (needs[i]) out[slot[i]] = grads[i];
    return out;
  }
};

// The op's public form: x [..., K] of any strides, an optional seed.  Shapes the call into the
// [M, K] contiguous form the kernels take, checks every argument, then draws the seed when dropout
// needs one and none is given (from torch's default generator: the draw fastpeft.ops makes, and
// only for a call that will run), runs `run` and reshapes y back to [..., N].
template <typename Run>
Tensor on_rows(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& lora_A,
               const OptTensor& lora_B, const OptTensor& ia3_in, const OptTensor& ia3_out,
               const OptTensor& sparse_index, const OptTensor& sparse_value, double p, std::optional<int64_t> seed,
               bool check, Run&& run) {
  TORCH_CHECK(weight.dim() == 2, "fastpeft_cpp: weight must be 2-D [out_features, in_features], got shape ",
              weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "fastpeft_cpp: x must have shape [..., ", K, "] to match weight [",
              N, ", ", K, "], got ", x.sizes());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fastpeft_cpp: lora_dropout p must be in [0, 1), got ", p);
  if (!present(lora_A)) p = 0.0;  // dropout acts on the LoRA branch only
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  int64_t M = 1;
  for (int64_t v : out_shape) M *= v;  // not numel / K: K may be 0
  out_shape.push_back(N);
  Tensor x2 = x.reshape({M, K}).contiguous();
  if (check)
    check_forward_args(x2, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, p,
                       seed.value_or(0));
  int64_t s = 0;
  if (p > 0.0) {
    s = seed.has_value() ? *seed
                         : at::randint(0, int64_t{1} << 62, {}, at::TensorOptions().dtype(at::kLong)).item<int64_t>();
  }
  Tensor y = run(x2, p, s);
  return y.view(out_shape);
}

}  // namespace

Tensor peft_linear_autograd(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& lora_A,
                            const OptTensor& lora_B, const OptTensor& ia3_in, const OptTensor& ia3_out,
                            const OptTensor& sparse_index, const OptTensor& sparse_value, double lora_scale, double p,
                            std::optional<int64_t> seed) {
  return on_rows(x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, p, seed,
                 /*check=*/true, [&](const Tensor& x2, double p2, int64_t s) {
    return PeftLinearFunction::apply(x2, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value,
                                     lora_scale, p2, s);
  });
}

Tensor peft_linear_inference(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& lora_A,
                             const OptTensor& lora_B, const OptTensor& ia3_in, const OptTensor& ia3_out,
                             const OptTensor& sparse_index, const OptTensor& sparse_value, double lora_scale,
                             double p, std::optional<int64_t> seed) {
  return on_rows(x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, p, seed,
                 /*check=*/true, [&](const Tensor& x2, double p2, int64_t s) {
    return std::get<0>(peft_linear_forward_prechecked(x2, weight, bias, lora_A, lora_B, ia3_in, ia3_out,
                                                      sparse_index, sparse_value, lora_scale, p2, s, false));
  });
}

Tensor peft_linear_meta(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& lora_A,
                        const OptTensor& lora_B, const OptTensor& ia3_in, const OptTensor& ia3_out,
                        const OptTensor& sparse_index, const OptTensor& sparse_value, double lora_scale, double p,
                        std::optional<int64_t> seed) {
  return on_rows(x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, p,
                 seed.has_value() ? seed : std::optional<int64_t>(0), /*check=*/false, [&](const Tensor& x2, double p2, int64_t s) {
                   return std::get<0>(peft_linear_forward_meta(x2, weight, bias, lora_A, lora_B, ia3_in, ia3_out,
                                                               sparse_index, sparse_value, lora_scale, p2, s, false));
                 });
}

}  // namespace fastpeft
