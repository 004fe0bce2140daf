// Registers the fastpeft_cpp ops (torch.ops.fastpeft_cpp.*).  Other csrc/ files may add ops to the
// same namespace with TORCH_LIBRARY_FRAGMENT(fastpeft_cpp, m); this is the one TORCH_LIBRARY block.
//
// The fused op's three schemas below are the one C++ spelling of its arguments; they equal
// fastpeft.core.spec.schema("forward" / "backward" / "autograd") (tests/test_spec.py).  Their
// kernels are boxed: they read the stack in schema order into an OpArgs (csrc/op_args.h), so no
// typed signature repeats the argument list.
#include <torch/library.h>

#include "dense.h"
#include "embedding.h"
#include "lowrank.h"
#include "op_args.h"
#include "sparse.h"

namespace fastpeft {
namespace {

// The op's arguments: the last `schema arguments` values of the stack.
const c10::IValue* arguments(const c10::OperatorHandle& op, const torch::jit::Stack* stack, size_t* n) {
  *n = op.schema().arguments().size();
  return stack->data() + (stack->size() - *n);
}

// forward(tensors..., lora_scale, p, seed, save_z) -> (y, xa, z)
template <bool META>
void forward_kernel(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  size_t n;
  const c10::IValue* v = arguments(op, stack, &n);
  const c10::IValue* scalars = v + kNumTensors;
  const OpArgs a = op_args(v, scalars, scalars[2].toInt());
  const bool save_z = scalars[kNumScalars].toBool();
  auto out = META ? peft_linear_forward_meta(a, save_z) : peft_linear_forward(a, save_z);
  torch::jit::drop(*stack, n);
  torch::jit::push(*stack, std::move(std::get<0>(out)), std::move(std::get<1>(out)), std::move(std::get<2>(out)));
}

// backward(grad_y, tensors..., xa, z, lora_scale, p, seed, needs) -> one tensor per Grad
template <bool META>
void backward_kernel(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  size_t n;
  const c10::IValue* v = arguments(op, stack, &n);
  const Tensor grad_y = v[0].toTensor();
  const c10::IValue* saved = v + 1 + kNumTensors;
  const c10::IValue* scalars = saved + 2;
  const OpArgs a = op_args(v + 1, scalars, scalars[2].toInt());
  const OptTensor xa = saved[0].toOptional<Tensor>(), z = saved[1].toOptional<Tensor>();
  const auto list = scalars[kNumScalars].toBoolList();
  TORCH_CHECK(list.size() == kNumGrads, "fastpeft_cpp: needs must have size ", int(kNumGrads),
              " (one bool per gradient), got ", list.size());
  Needs needs{};
  for (int i = 0; i < kNumGrads; ++i) needs[i] = list[i];
  auto grads = META ? peft_linear_backward_meta(grad_y, a, xa, z, needs)
                    : peft_linear_backward(grad_y, a, xa, z, needs);
  torch::jit::drop(*stack, n);
  torch::jit::push(*stack, std::move(grads));
}

template <void (*F)(const c10::OperatorHandle&, torch::jit::Stack*)>
torch::CppFunction boxed() {
  return torch::CppFunction::makeFromBoxedFunction<F>();
}

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY(fastpeft_cpp, m) {
  m.def(
      "forward(Tensor x, Tensor weight, Tensor? bias, Tensor? lora_A, Tensor? lora_B, Tensor? ia3_in, "
      "Tensor? ia3_out, Tensor? sparse_index, Tensor? sparse_value, Tensor? dora_scale, float lora_scale, float p, int seed, "
      "bool save_z) -> (Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor grad_y, Tensor? x, Tensor weight, Tensor? bias, Tensor? lora_A, Tensor? lora_B, "
      "Tensor? ia3_in, Tensor? ia3_out, Tensor? sparse_index, Tensor? sparse_value, Tensor? dora_scale, Tensor? xa, Tensor? z, "
      "float lora_scale, float p, int seed, bool[9] needs) -> Tensor[]");
  // backward returns an empty [0] tensor for every gradient that needs[i] does not ask for.
  // The same op with autograd in C++ (y only): the eager CPU path of fastpeft.peft_linear.  x is
  // [..., K] of any strides; seed None draws one from torch's default generator when dropout is on.
  m.def(
      "peft_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? lora_A, Tensor? lora_B, Tensor? ia3_in, "
      "Tensor? ia3_out, Tensor? sparse_index, Tensor? sparse_value, Tensor? dora_scale, float lora_scale, float p, int? seed) -> Tensor");
  m.def("dropout(Tensor x, float p, int seed) -> Tensor");
  // The rank-r kernels alone (r <= 64): y = bias + scale * drop(x) A^T B^T and xa = drop(x) A^T; and
  // float32 (grad_y B, scale * grad_y^T xa, scale * (grad_y B)^T drop(x)), the last two only if xa / x given.
  m.def("lowrank_forward(Tensor x, Tensor lora_A, Tensor lora_B, Tensor? bias, float scale, float p, int seed) "
        "-> (Tensor, Tensor)");
  m.def("lowrank_backward(Tensor grad_y, Tensor lora_B, Tensor? xa, Tensor? x, float scale, float p, int seed) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("sparse_matmul(Tensor h, Tensor sparse_index, Tensor sparse_value, int n) -> Tensor");
  m.def("sparse_matmul_t(Tensor g, Tensor sparse_index, Tensor sparse_value, int k) -> Tensor");
  m.def("sddmm(Tensor g, Tensor h, Tensor sparse_index) -> Tensor");
  // LoRA on an embedding table (csrc/embedding.cpp): y = weight[ids] + scale * A[:, ids]^T B^T, and
  // (dA, dB) in lora_A's / lora_B's dtype (an empty [0] tensor where needs[i] is false).
  m.def("embedding_lora_fwd(Tensor ids, Tensor weight, Tensor lora_A, Tensor lora_B, float scale) -> Tensor");
  m.def("embedding_lora_bwd(Tensor grad_y, Tensor ids, Tensor lora_A, Tensor lora_B, float scale, int padding_idx, "
        "bool scale_grad_by_freq, bool[2] needs) -> (Tensor, Tensor)");
  // No tensor arguments to dispatch on: one implementation for every key.
  // first_row: the mask of rows [first_row, first_row + rows) of a [*, cols] x (tests offsets >= 2^32).
  m.def("keep_mask(int seed, float p, int rows, int cols, int first_row=0) -> Tensor", &fastpeft::keep_mask);
}

TORCH_LIBRARY_IMPL(fastpeft_cpp, CPU, m) {
  m.impl("forward", fastpeft::boxed<&fastpeft::forward_kernel<false>>());
  m.impl("backward", fastpeft::boxed<&fastpeft::backward_kernel<false>>());
  m.impl("peft_linear", fastpeft::boxed<&fastpeft::peft_linear_inference>());
  m.impl("dropout", &fastpeft::dropout);
  m.impl("lowrank_forward", &fastpeft::lowrank_forward_op);
  m.impl("lowrank_backward", &fastpeft::lowrank_backward_op);
  m.impl("sparse_matmul", &fastpeft::sparse_matmul_op);
  m.impl("sparse_matmul_t", &fastpeft::sparse_matmul_t_op);
  m.impl("sddmm", &fastpeft::sddmm_op);
  m.impl("embedding_lora_fwd", &fastpeft::embedding_lora_forward);
  m.impl("embedding_lora_bwd", &fastpeft::embedding_lora_backward);
}

TORCH_LIBRARY_IMPL(fastpeft_cpp, Autograd, m) {
  m.impl("peft_linear", fastpeft::boxed<&fastpeft::peft_linear_autograd>());
}

// Under torch.autocast("cpu") the op casts its inputs as F.linear does, then runs with autocast off.
TORCH_LIBRARY_IMPL(fastpeft_cpp, AutocastCPU, m) {
  m.impl("peft_linear", fastpeft::boxed<&fastpeft::peft_linear_autocast>());
}

TORCH_LIBRARY_IMPL(fastpeft_cpp, Meta, m) {
  m.impl("peft_linear", fastpeft::boxed<&fastpeft::peft_linear_meta>());
  m.impl("forward", fastpeft::boxed<&fastpeft::forward_kernel<true>>());
  m.impl("backward", fastpeft::boxed<&fastpeft::backward_kernel<true>>());
}
