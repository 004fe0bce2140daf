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
#include "op_args.h"
#include "sparse.h"

namespace fastpeft {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int kArgX = 0;  // x is spec.TENSORS[0]

// The op under a C++ autograd Function.  Its inputs are the tensor arguments in spec order (the
// parameter list is generated from FASTPEFT_TENSOR_ARGS, op_args.h) plus the scalars, so its
// backward returns one gradient per input: input i gets the gradient kGradOf[i].  (One TensorList
// input would need a placeholder for each absent argument: torch records every list element's
// metadata, which an undefined tensor has not, and that costs ~5 us a call.)
class PeftLinearFunction : public torch::autograd::Function<PeftLinearFunction> {
 public:
#define FASTPEFT_PARAM(name, type, grad) const type& name,
#define FASTPEFT_SET(name, type, grad) a.name = name;
  static Tensor forward(AutogradContext* ctx, FASTPEFT_TENSOR_ARGS(FASTPEFT_PARAM) double lora_scale, double p,
                        int64_t seed) {
    OpArgs a;
    FASTPEFT_TENSOR_ARGS(FASTPEFT_SET)
    a.lora_scale = lora_scale;
    a.p = p;
    a.seed = seed;
#undef FASTPEFT_SET
#undef FASTPEFT_PARAM
    Needs needs{};
    for_each_tensor(a, [&](int i, const char*, const Tensor& t) {
      if (kGradOf[i] != kNoGrad) needs[kGradOf[i]] = t.defined() && t.requires_grad();
    });
    const SavePolicy keep = saved_for_backward(needs);
    // The Autograd key sees both; on_rows has checked the arguments of a real call already.
    auto fwd = a.x.is_meta() ? &peft_linear_forward_meta : &peft_linear_forward_prechecked;
    auto [y, xa, z] = fwd(a, /*save_z=*/keep.z);
    std::vector<Tensor> saved = to_tensors(a);  // absent arguments as undefined tensors
    if (!keep.x) saved[kArgX] = Tensor();
    saved.push_back(keep.xa ? xa : Tensor());
    saved.push_back(keep.z ? z : Tensor());
    ctx->save_for_backward(saved);
    ctx->saved_data["lora_scale"] = lora_scale;
    ctx->saved_data["p"] = p;
    ctx->saved_data["seed"] = seed;
    int64_t need_bits = 0;
    for (int i = 0; i < kNumGrads; ++i) need_bits |= static_cast<int64_t>(needs[i]) << i;
    ctx->saved_data["needs"] = need_bits;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();  // the tensors, then xa and z
    const int64_t need_bits = ctx->saved_data["needs"].toInt();
    Needs needs{};
    for (int i = 0; i < kNumGrads; ++i) needs[i] = (need_bits >> i) & 1;
    variable_list out(kNumTensors + kNumScalars);  // one per forward input: the tensors, the scalars
    Tensor grad_y = grad_outputs[0];
    if (!grad_y.defined()) return out;
    const OpArgs a = op_args(saved.data(), ctx->saved_data["lora_scale"].toDouble(),
                             ctx->saved_data["p"].toDouble(), ctx->saved_data["seed"].toInt());
    auto opt = [](const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
    const OptTensor xa = opt(saved[kNumTensors]), z = opt(saved[kNumTensors + 1]);
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
      grads = bwd(grad_y.contiguous(), a, xa, z, needs);
    }
    if (create_graph) {
      variable_list inputs(saved.begin(), saved.end());
      inputs.push_back(grad_y);
      bool differentiable = false;
      for (const Tensor& t : inputs) differentiable = differentiable || (t.defined() && t.requires_grad());
      if (differentiable) once_differentiable_(grads, needs, inputs);
    }
    for (int i = 0; i < kNumTensors; ++i)
      if (kGradOf[i] != kNoGrad && needs[kGradOf[i]]) out[i] = grads[kGradOf[i]];
    return out;
  }

 private:
  // As Python's @once_differentiable, but connected to what the gradients depend on (grad_y and the
  // saved tensors): the gradients' grad_fn is an Error node, so any second backward that reaches them
  // (backward() or autograd.grad with respect to an adapter) raises kOnceDifferentiable.
  static void once_differentiable_(std::vector<Tensor>& grads, const Needs& needs, const variable_list& inputs) {
    auto error = c10::make_intrusive<torch::autograd::Error>(kOnceDifferentiable,
                                                             torch::autograd::collect_next_edges(inputs));
    for (int i = 0; i < kNumGrads; ++i)
      if (needs[i] && grads[i].defined()) torch::autograd::set_history(grads[i], error);
  }
};

// The arguments of fastpeft_cpp::peft_linear on a boxed stack (spec.schema("autograd")): the
// tensors, lora_scale, p, and seed as `int?`.
struct Call {
  OpArgs args;
  std::optional<int64_t> seed;
  size_t n;  // stack values to drop
};

Call read_call(const c10::OperatorHandle& op, const torch::jit::Stack* stack) {
  Call c;
  c.n = op.schema().arguments().size();
  const c10::IValue* v = stack->data() + (stack->size() - c.n);
  const c10::IValue* scalars = v + kNumTensors;
  c.seed = scalars[2].toOptional<int64_t>();
  c.args = op_args(v, scalars, c.seed.value_or(0));
  return c;
}

// The op's public form: x [..., K] of any strides, an optional seed.  Shapes the call into the
// [M, K] contiguous form the kernels take, checks every argument, then draws the seed when dropout
// needs one and none is given (from torch's default generator: the draw fastpeft.ops makes, and
// only for a call that will run), runs `run` on the [M, K] OpArgs and reshapes y back to [..., N].
template <typename Extra, typename Run>
void on_rows(const c10::OperatorHandle& op, torch::jit::Stack* stack, bool check_values, Extra&& extra_checks,
             Run&& run) {
  Call c = read_call(op, stack);
  OpArgs& a = c.args;
  // Every check first, in fastpeft.core.validation's order (scalars, tensors, then what reads data;
  // the Meta kernel skips only that last step): a rejected call has drawn no seed and computed nothing.
  check_forward_args(a, c.seed, /*check_values=*/false);
  extra_checks(a);
  if (check_values && present(a.sparse_index)) check_sparse_values(*a.sparse_index, a.weight.size(0), a.weight.size(1));
  const int64_t N = a.weight.size(0), K = a.weight.size(1);
  if (!present(a.lora_A)) a.p = 0.0;  // dropout acts on the LoRA branch only
  std::vector<int64_t> out_shape(a.x.sizes().begin(), a.x.sizes().end() - 1);
  int64_t M = 1;
  for (int64_t v : out_shape) M *= v;  // not numel / K: K may be 0
  out_shape.push_back(N);
  a.x = a.x.reshape({M, K}).contiguous();
  a.seed = 0;
  if (a.p > 0.0) {
    a.seed = c.seed.has_value()
                 ? *c.seed
                 : at::randint(0, int64_t{1} << 62, {}, at::TensorOptions().dtype(at::kLong)).item<int64_t>();
  }
  Tensor y = run(a).view(out_shape);
  torch::jit::drop(*stack, c.n);
  torch::jit::push(*stack, std::move(y));
}

}  // namespace

void peft_linear_autograd(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  on_rows(op, stack, /*check_values=*/true, [](const OpArgs& a) { check_no_tangent(a); }, [](const OpArgs& a) {
#define FASTPEFT_ARG(name, type, grad) a.name,
    return PeftLinearFunction::apply(FASTPEFT_TENSOR_ARGS(FASTPEFT_ARG) a.lora_scale, a.p, a.seed);
#undef FASTPEFT_ARG
  });
}

void peft_linear_inference(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  on_rows(op, stack, /*check_values=*/true, [](const OpArgs&) {},
          [](const OpArgs& a) { return std::get<0>(peft_linear_forward_prechecked(a, false)); });
}

void peft_linear_meta(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  // A given seed or not, the Meta kernel draws nothing: seed 0 stands in.
  c10::IValue& seed = (*stack)[stack->size() - 1];
  if (seed.isNone()) seed = int64_t{0};
  on_rows(op, stack, /*check_values=*/false, [](const OpArgs&) {},
          [](const OpArgs& a) { return std::get<0>(peft_linear_forward_meta(a, false)); });
}

// AutocastCPU: F.linear's rule (floating tensors other than float64 to the autocast dtype, casts of
// fp32 leaf parameters cached for the autocast region), then the op with autocast off.
void peft_linear_autocast(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
  const auto dt = at::autocast::get_autocast_dtype(at::kCPU);
  const size_t n = op.schema().arguments().size();
  c10::IValue* v = stack->data() + (stack->size() - n);
  for (int i = 0; i < kNumTensors; ++i)  // cached_cast leaves integer tensors (sparse_index) as they are
    if (v[i].isTensor()) v[i] = at::autocast::cached_cast(dt, v[i].toTensor(), c10::DeviceType::CPU);
  op.callBoxed(stack);
}

}  // namespace fastpeft
