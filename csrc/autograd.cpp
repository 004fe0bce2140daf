// fastpeft_cpp::peft_linear: the fused op with its autograd in C++, for eager CPU calls.
//
// fastpeft.ops wraps every backend in a Python torch.library custom op; its per-call dispatch
// (argument filling, alias checks, a Python autograd.Function) costs ~0.3 ms per forward+backward,
// a few percent of a 512x1024x1024 layer on two cores.  This op runs the same two kernels
// (peft_linear_forward / peft_linear_backward) under a C++ autograd::Function and saves exactly
// what fastpeft.ops saves: x only if a gradient reads it, xa only if lora_B trains, z only if
// ia3_out trains, never a mask (the seed is an integer).  torch.compile still goes through the
// Python custom op.
//
// Like that route it checks every argument (csrc/checks.h: fastpeft.core.validation's checks and
// messages) before it draws a seed or computes anything, follows torch.autocast as F.linear does
// (AutocastCPU kernel below), refuses forward-mode AD, and is once differentiable: differentiating
// the gradients it returned raises kOnceDifferentiable (torch's once_differentiable mechanism).
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>

#include "checks.h"
#include "dense.h"
#include "sparse.h"

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
    // Grad mode is on here only under create_graph=True.  The kernels are not differentiable (some
    // aten ops in them would record a partial, wrong graph): compute without recording, then hand
    // back gradients that raise if anything differentiates them (see once_differentiable_ below).
    const bool create_graph = at::GradMode::is_enabled();
    std::vector<Tensor> grads;
    {
      at::AutoGradMode no_grad(false);
      // A backward run inside an autocast region must not recast what the forward computed in.
      c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
      auto bwd = grad_y.is_meta() ? &peft_linear_backward_meta : &peft_linear_backward;
      grads = bwd(grad_y.contiguous(), opt(saved[0]), saved[1], opt(saved[2]), opt(saved[3]), opt(saved[4]),
                  opt(saved[5]), opt(saved[6]), opt(saved[7]), opt(saved[8]), opt(saved[9]), opt(saved[10]),
                  ctx->saved_data["lora_scale"].toDouble(), ctx->saved_data["p"].toDouble(),
                  ctx->saved_data["seed"].toInt(), needs);
    }
    if (create_graph) {
      variable_list inputs(saved.begin(), saved.end());
      inputs.push_back(grad_y);
      bool differentiable = false;
      for (const Tensor& t : inputs) differentiable = differentiable || (t.defined() && t.requires_grad());
      if (differentiable) once_differentiable_(grads, needs, inputs);
    }
    // Inputs: x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, scale, p, seed.
    const int slot[8] = {0, 1, 2, 3, 4, 5, 6, 8};
    for (int i = 0; i < 8; ++i)
      if (needs[i]) out[slot[i]] = grads[i];
    return out;
  }

 private:
  // As Python's @once_differentiable, but connected to what the gradients depend on (grad_y and the
  // saved tensors): the gradients' grad_fn is an Error node, so any second backward that reaches them
  // (backward() or autograd.grad with respect to an adapter) raises kOnceDifferentiable.
  static void once_differentiable_(std::vector<Tensor>& grads, const std::array<bool, 8>& needs,
                                   const variable_list& inputs) {
    auto error = c10::make_intrusive<torch::autograd::Error>(kOnceDifferentiable,
                                                             torch::autograd::collect_next_edges(inputs));
    for (int i = 0; i < 8; ++i)
      if (needs[i] && grads[i].defined()) torch::autograd::set_history(grads[i], error);
  }
};

// The op's public form: x [..., K] of any strides, an optional seed.  Shapes the call into the
// [M, K] contiguous form the kernels take, checks every argument, then draws the seed when dropout
// needs one and none is given (from torch's default generator: the draw fastpeft.ops makes, and
// only for a call that will run), runs `run` and reshapes y back to [..., N].
template <typename Extra, typename Run>
Tensor on_rows(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& lora_A,
               const OptTensor& lora_B, const OptTensor& ia3_in, const OptTensor& ia3_out,
               const OptTensor& sparse_index, const OptTensor& sparse_value, double p, std::optional<int64_t> seed,
               bool check_values, Extra&& extra_checks, Run&& run) {
  // Every check first, in fastpeft.core.validation's order (scalars, tensors, then what reads data;
  // the Meta kernel skips only that last step): a rejected call has drawn no seed and computed nothing.
  check_forward_args(x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, p, seed,
                     /*check_values=*/false);
  extra_checks();
  if (check_values && present(sparse_index)) check_sparse_values(*sparse_index, weight.size(0), weight.size(1));
  const int64_t N = weight.size(0), K = weight.size(1);
  if (!present(lora_A)) p = 0.0;  // dropout acts on the LoRA branch only
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  int64_t M = 1;
  for (int64_t v : out_shape) M *= v;  // not numel / K: K may be 0
  out_shape.push_back(N);
  Tensor x2 = x.reshape({M, K}).contiguous();
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
  const auto no_tangent = [&] {
    const OptTensor xo(x), wo(weight);
    check_no_tangent({&xo, &wo, &bias, &lora_A, &lora_B, &ia3_in, &ia3_out, &sparse_value});
  };
  return on_rows(x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, p, seed,
                 /*check_values=*/true, no_tangent, [&](const Tensor& x2, double p2, int64_t s) {
    return PeftLinearFunction::apply(x2, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value,
                                     lora_scale, p2, s);
  });
}

Tensor peft_linear_inference(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& lora_A,
                             const OptTensor& lora_B, const OptTensor& ia3_in, const OptTensor& ia3_out,
                             const OptTensor& sparse_index, const OptTensor& sparse_value, double lora_scale,
                             double p, std::optional<int64_t> seed) {
  return on_rows(x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, p, seed,
                 /*check_values=*/true, [] {}, [&](const Tensor& x2, double p2, int64_t s) {
    return std::get<0>(peft_linear_forward_prechecked(x2, weight, bias, lora_A, lora_B, ia3_in, ia3_out,
                                                      sparse_index, sparse_value, lora_scale, p2, s, false));
  });
}

Tensor peft_linear_meta(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& lora_A,
                        const OptTensor& lora_B, const OptTensor& ia3_in, const OptTensor& ia3_out,
                        const OptTensor& sparse_index, const OptTensor& sparse_value, double lora_scale, double p,
                        std::optional<int64_t> seed) {
  return on_rows(x, weight, bias, lora_A, lora_B, ia3_in, ia3_out, sparse_index, sparse_value, p,
                 seed.has_value() ? seed : std::optional<int64_t>(0), /*check_values=*/false, [] {},
                 [&](const Tensor& x2, double p2, int64_t s) {
                   return std::get<0>(peft_linear_forward_meta(x2, weight, bias, lora_A, lora_B, ia3_in, ia3_out,
                                                               sparse_index, sparse_value, lora_scale, p2, s, false));
                 });
}

// AutocastCPU: F.linear's rule (floating tensors other than float64 to the autocast dtype, casts of
// fp32 leaf parameters cached for the autocast region), then the op with autocast off.
Tensor peft_linear_autocast(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& lora_A,
                            const OptTensor& lora_B, const OptTensor& ia3_in, const OptTensor& ia3_out,
                            const OptTensor& sparse_index, const OptTensor& sparse_value, double lora_scale, double p,
                            std::optional<int64_t> seed) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
  const auto dt = at::autocast::get_autocast_dtype(at::kCPU);
  const auto cast = [&](const Tensor& t) { return at::autocast::cached_cast(dt, t, c10::DeviceType::CPU); };
  const auto cast_opt = [&](const OptTensor& t) { return present(t) ? OptTensor(cast(*t)) : t; };
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastpeft_cpp::peft_linear", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                     const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                     const OptTensor&, double, double, std::optional<int64_t>)>();
  return op.call(cast(x), cast(weight), cast_opt(bias), cast_opt(lora_A), cast_opt(lora_B), cast_opt(ia3_in),
                 cast_opt(ia3_out), sparse_index, cast_opt(sparse_value), lora_scale, p, seed);
}

}  // namespace fastpeft
