// Registers the fastpeft_cpp ops (torch.ops.fastpeft_cpp.*).  Other csrc/ files may add ops to the
// same namespace with TORCH_LIBRARY_FRAGMENT(fastpeft_cpp, m); this is the one TORCH_LIBRARY block.
#include <torch/library.h>

#include "dense.h"
#include "lowrank.h"
#include "sparse.h"

TORCH_LIBRARY(fastpeft_cpp, m) {
  m.def(
      "forward(Tensor x, Tensor weight, Tensor? bias, Tensor? lora_A, Tensor? lora_B, Tensor? ia3_in, "
      "Tensor? ia3_out, Tensor? sparse_index, Tensor? sparse_value, float lora_scale, float p, int seed, "
      "bool save_z) -> (Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor grad_y, Tensor? x, Tensor weight, Tensor? bias, Tensor? lora_A, Tensor? lora_B, "
      "Tensor? ia3_in, Tensor? ia3_out, Tensor? sparse_index, Tensor? sparse_value, Tensor? xa, Tensor? z, "
      "float lora_scale, float p, int seed, bool[8] needs) -> Tensor[]");
  // backward returns an empty [0] tensor for every gradient that needs[i] does not ask for.
  // The same op with autograd in C++ (y only): the eager CPU path of fastpeft.peft_linear.  x is
  // [..., K] of any strides; seed None draws one from torch's default generator when dropout is on.
  m.def(
      "peft_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? lora_A, Tensor? lora_B, Tensor? ia3_in, "
      "Tensor? ia3_out, Tensor? sparse_index, Tensor? sparse_value, float lora_scale, float p, int? seed) -> Tensor");
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
  // No tensor arguments to dispatch on: one implementation for every key.
  // first_row: the mask of rows [first_row, first_row + rows) of a [*, cols] x (tests offsets >= 2^32).
  m.def("keep_mask(int seed, float p, int rows, int cols, int first_row=0) -> Tensor", &fastpeft::keep_mask);
}

TORCH_LIBRARY_IMPL(fastpeft_cpp, CPU, m) {
  m.impl("forward", &fastpeft::peft_linear_forward);
  m.impl("backward", &fastpeft::peft_linear_backward);
  m.impl("peft_linear", &fastpeft::peft_linear_inference);
  m.impl("dropout", &fastpeft::dropout);
  m.impl("lowrank_forward", &fastpeft::lowrank_forward_op);
  m.impl("lowrank_backward", &fastpeft::lowrank_backward_op);
  m.impl("sparse_matmul", &fastpeft::sparse_matmul_op);
  m.impl("sparse_matmul_t", &fastpeft::sparse_matmul_t_op);
  m.impl("sddmm", &fastpeft::sddmm_op);
}

TORCH_LIBRARY_IMPL(fastpeft_cpp, Autograd, m) {
  m.impl("peft_linear", &fastpeft::peft_linear_autograd);
}

// Under torch.autocast("cpu") the op casts its inputs as F.linear does, then runs with autocast off.
TORCH_LIBRARY_IMPL(fastpeft_cpp, AutocastCPU, m) {
  m.impl("peft_linear", &fastpeft::peft_linear_autocast);
}

TORCH_LIBRARY_IMPL(fastpeft_cpp, Meta, m) {
  m.impl("peft_linear", &fastpeft::peft_linear_meta);
  m.impl("forward", &fastpeft::peft_linear_forward_meta);
  m.impl("backward", &fastpeft::peft_linear_backward_meta);
}
