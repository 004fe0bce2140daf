// The fused op's argument checks (see checks.h): fastpeft/core/validation.py, message for message.
#include "checks.h"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace fastpeft {

const char* const kOnceDifferentiable =
    "fastpeft.peft_linear is once differentiable: its backward is not itself differentiable, so a second "
    "backward through the gradients it computed (create_graph=True: gradient penalties, MAML, "
    "Hessian-vector products) is not supported; use fastpeft.reference.peft_linear for higher-order "
    "gradients";
const char* const kForwardAdUnsupported =
    "fastpeft.peft_linear does not support forward-mode AD (torch.func.jvp, torch.autograd.forward_ad dual "
    "tensors): the tangent would be lost; use fastpeft.reference.peft_linear, which plain PyTorch "
    "differentiates in both modes";

std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    case at::kUInt16: return "torch.uint16";
    case at::kUInt32: return "torch.uint32";
    case at::kUInt64: return "torch.uint64";
    case at::kFloat8_e4m3fn: return "torch.float8_e4m3fn";
    case at::kFloat8_e5m2: return "torch.float8_e5m2";
    case at::kFloat8_e4m3fnuz: return "torch.float8_e4m3fnuz";
    case at::kFloat8_e5m2fnuz: return "torch.float8_e5m2fnuz";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// repr(float): the shortest digits that round-trip, fixed notation for 1e-4 <= |v| < 1e16, else
// d.ddde+XX with at least two exponent digits.
std::string py_float(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific);
  std::string s(buf, res.ptr);  // "-1.5e-05", "1e+16", "0e+00"
  const bool neg = s[0] == '-';
  if (neg) s.erase(0, 1);
  const size_t e = s.find('e');
  const int exp = std::atoi(s.c_str() + e + 1);
  std::string digits;
  for (size_t i = 0; i < e; ++i)
    if (s[i] != '.') digits += s[i];
  const int nd = static_cast<int>(digits.size());
  std::string out;
  if (-4 <= exp && exp < 16) {
    if (exp >= nd - 1) out = digits + std::string(exp - (nd - 1), '0') + ".0";
    else if (exp >= 0) out = digits.substr(0, exp + 1) + "." + digits.substr(exp + 1);
    else out = "0." + std::string(-exp - 1, '0') + digits;
  } else {
    out = digits.substr(0, 1);
    if (nd > 1) out += "." + digits.substr(1);
    char eb[16];
    std::snprintf(eb, sizeof(eb), "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    out += eb;
  }
  return neg ? "-" + out : out;
}

void check_scalars(double p, std::optional<int64_t> seed) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "lora_dropout must be in [0, 1), got ", py_float(p));
  TORCH_CHECK_VALUE(!seed.has_value() || *seed >= 0, "dropout_seed must be in [0, 2**63), got ", seed.value_or(0));
}

namespace {

void check_device(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device(),
                    "; move it to ", x.device());
}

void check_adapter_dtype(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, name,
                   " must have x's dtype (", py_dtype(x.scalar_type()), ") or torch.float32, got ",
                   py_dtype(t.scalar_type()));
}

// A [n]-vector adapter (bias, ia3_in, ia3_out): shape, device, dtype.
void check_vector(const OptTensor& t, int64_t n, const Tensor& x, const char* name) {
  if (!present(t)) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == n, name, " must have shape [", n, "], got ", t->sizes());
  check_device(*t, x, name);
  check_adapter_dtype(*t, x, name);
}

}  // namespace

Dims check_tensors(const Tensor& x, bool is_x, int64_t M, const OpArgs& a) {
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
                   "x must be a floating tensor (float32, bfloat16, float16 or float64), got ", py_dtype(dt));
  TORCH_CHECK_VALUE(a.weight.dim() == 2, "weight must be 2-D [out_features, in_features], got shape ",
                    a.weight.sizes());
  TORCH_CHECK_TYPE(a.weight.scalar_type() == dt, "weight dtype ", py_dtype(a.weight.scalar_type()),
                   " must match x dtype ", py_dtype(dt));
  check_device(a.weight, x, "weight");
  const int64_t N = a.weight.size(0), K = a.weight.size(1);
  if (is_x)
    TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, "x must have shape [..., ", K, "] to match weight [", N,
                      ", ", K, "], got ", x.sizes());
  check_vector(a.bias, N, x, "bias");
  TORCH_CHECK_VALUE(present(a.lora_A) == present(a.lora_B), "lora_A and lora_B must be given together");
  int64_t r = 0;
  if (present(a.lora_A)) {
    TORCH_CHECK_VALUE(a.lora_A->dim() == 2 && a.lora_A->size(1) == K, "lora_A must have shape [r, ", K, "], got ",
                      a.lora_A->sizes());
    r = a.lora_A->size(0);
    TORCH_CHECK_VALUE(a.lora_B->dim() == 2 && a.lora_B->size(0) == N, "lora_B must have shape [", N, ", r], got ",
                      a.lora_B->sizes());
    TORCH_CHECK_VALUE(a.lora_B->size(1) == r, "rank mismatch: lora_A has rank ", r, " ([", r, ", ", K,
                      "]) but lora_B has rank ", a.lora_B->size(1), " ([", N, ", ", a.lora_B->size(1), "])");
    TORCH_CHECK_VALUE(r != 0, "lora rank r must be at least 1, got lora_A of shape [0, K]");
    check_device(*a.lora_A, x, "lora_A");
    check_device(*a.lora_B, x, "lora_B");
    check_adapter_dtype(*a.lora_A, x, "lora_A");
    check_adapter_dtype(*a.lora_B, x, "lora_B");
  }
  check_vector(a.ia3_in, K, x, "ia3_in");
  check_vector(a.ia3_out, N, x, "ia3_out");
  TORCH_CHECK_VALUE(present(a.sparse_index) == present(a.sparse_value),
                    "sparse_index and sparse_value must be given together");
  if (present(a.sparse_index)) {
    const Tensor& si = *a.sparse_index;
    const Tensor& sv = *a.sparse_value;
    TORCH_CHECK_TYPE(si.scalar_type() == at::kLong, "sparse_index must be int64, got ", py_dtype(si.scalar_type()));
    TORCH_CHECK_VALUE(si.dim() == 1, "sparse_index must be 1-D [nnz], got shape ", si.sizes());
    TORCH_CHECK_VALUE(sv.dim() == 1 && sv.size(0) == si.size(0), "sparse_value must have shape [", si.size(0),
                      "] like sparse_index, got ", sv.sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(sv.scalar_type()), "sparse_value must be a floating tensor, got ",
                     py_dtype(sv.scalar_type()));
    check_device(si, x, "sparse_index");
    check_device(sv, x, "sparse_value");
    check_adapter_dtype(sv, x, "sparse_value");
  }
  // DoRA's output scale (fastpeft.core.dora computes it; DoRA is not combined with IA3 or a sparse delta,
  // which fastpeft.core.validation.check_dora_args rejects first on the public route).
  check_vector(a.dora_scale, N, x, "dora_scale");
  TORCH_CHECK_VALUE(!present(a.dora_scale) || !present(a.ia3_out),
                    "dora_scale cannot be combined with ia3_out (both would use the saved pre-scale output)");
  // What only this backend asks (unreachable through fastpeft.peft_linear, which routes float64 and
  // non-CPU tensors elsewhere): CPU tensors in float32, bfloat16 or float16.
  TORCH_CHECK_TYPE(dt != at::kDouble, "x must be float32, bfloat16 or float16 for the C++ backend "
                   "(float64 runs on the 'reference' backend), got torch.float64");
  TORCH_CHECK_VALUE(x.device().is_cpu() || x.is_meta(), "x must be a CPU tensor for the C++ backend, got one on ",
                    x.device());
  return {M, K, N, r};
}

void check_no_tangent(const OpArgs& a) {
  for_each_tensor(a, [](int i, const char*, const Tensor& t) {
    TORCH_CHECK_NOT_IMPLEMENTED(kGradOf[i] == kNoGrad || !t.defined() || !t._fw_grad(/*level=*/0).defined(),
                                kForwardAdUnsupported);
  });
}

}  // namespace fastpeft
