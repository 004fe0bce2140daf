// The fused PEFT linear op on CPU (DESIGN.md section 1):
//
//   h = x * ia3_in;   z = h (W + S)^T + bias;   y = z * ia3_out + s * (drop(x) A^T) B^T
//
// The frozen GEMMs go to at::addmm / at::mm (MKL / oneDNN; nothing hand-written beats them), and
// the work around them is fused.  Without IA3 on the output, LoRA's branch and the bias are written
// into y first by the rank-r kernels of lowrank.cpp (r <= 64; MKL above) and the frozen GEMM
// accumulates onto y (beta = 1); likewise dX starts as LoRA's term and the dX GEMM adds onto it.
// The dropout mask is regenerated inside the loops that apply it (never stored), and each backward
// elementwise step (IA3 scaling, bias / IA3 reductions) is one pass over data the pass already reads.
#include "dense.h"

#include <type_traits>
#include <vector>

#include "checks.h"
#include "dropout_mask.h"
#include "lowrank.h"
#include "sparse.h"

namespace fastpeft {

namespace {

template <typename F>
void bool_dispatch(bool v, F&& f) {
  if (v) f(std::true_type{});
  else f(std::false_type{});
}

// ---- dropout -----------------------------------------------------------------------------------

// out[m, k] = (ADD ? out[m, k] : 0) + dropped(src[m, k], keep(m*K + k), scale).  src may be out itself
// (an in-place masked scale): the loop reads and writes the same index only.  NaN in a dropped element
// propagates, as in torch's dropout (dropout_mask.h).
template <typename T, bool ADD>
void masked_scale_kernel(const T* src, T* out, int64_t M, int64_t K, DropoutKey key, float scale) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const uint64_t base = static_cast<uint64_t>(m) * static_cast<uint64_t>(K);
      const T* sr = src + m * K;
      T* o = out + m * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) {
        const float kept = dropped(to_float(sr[k]), key.keep(base + k), scale);
        if constexpr (ADD) o[k] = static_cast<T>(to_float(o[k]) + kept);
        else o[k] = static_cast<T>(kept);
      }
    }
  });
}

// xa[m, j] = sum_k drop(x)[m, k] * A[j, k]: the LoRA down-projection with the mask applied while
// x is read (no dropped copy of x in memory).  RB rows of x are dropped into an L1/L2-resident
// float buffer, then each pair of A rows is dotted against them with RB x 2 vector accumulators
// (one load of A feeds RB FMAs).
constexpr int64_t RB = 4;
constexpr int64_t VW = 16;  // floats per accumulator vector

template <typename T, bool DROP>
void lora_down_dropout_kernel(const T* __restrict__ x, const float* __restrict__ a, T* __restrict__ xa, int64_t M,
                              int64_t K, int64_t r, DropoutKey key, float scale) {
  const int64_t blocks = (M + RB - 1) / RB;
  const int64_t k_main = K - K % VW;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> xb(static_cast<size_t>(RB * K));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * RB, rows = std::min(RB, M - m0);
      for (int64_t i = 0; i < RB; ++i) {
        float* dst = xb.data() + i * K;
        if (i >= rows) {
          std::fill(dst, dst + K, 0.f);
          continue;
        }
        const uint64_t base = static_cast<uint64_t>(m0 + i) * static_cast<uint64_t>(K);
        const T* src = x + (m0 + i) * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) {
          if constexpr (DROP) dst[k] = dropped(to_float(src[k]), key.keep(base + k), scale);
          else dst[k] = to_float(src[k]) * scale;
        }
      }
      for (int64_t j0 = 0; j0 < r; j0 += 2) {
        const int64_t nj = std::min<int64_t>(2, r - j0);
        const float* a0 = a + j0 * K;
        const float* a1 = a + (j0 + nj - 1) * K;  // == a0 when r is odd: computed, not stored
        float acc[RB][2][VW] = {};
        for (int64_t k0 = 0; k0 < k_main; k0 += VW) {
#pragma GCC unroll 4
          for (int64_t i = 0; i < RB; ++i) {
            const float* xr = xb.data() + i * K + k0;
#pragma omp simd
            for (int64_t l = 0; l < VW; ++l) {
              acc[i][0][l] += xr[l] * a0[k0 + l];
              acc[i][1][l] += xr[l] * a1[k0 + l];
            }
          }
        }
        for (int64_t i = 0; i < rows; ++i) {
          float s0 = 0.f, s1 = 0.f;
          for (int64_t l = 0; l < VW; ++l) {
            s0 += acc[i][0][l];
            s1 += acc[i][1][l];
          }
          const float* xr = xb.data() + i * K;
          for (int64_t k = k_main; k < K; ++k) {
            s0 += xr[k] * a0[k];
            s1 += xr[k] * a1[k];
          }
          xa[(m0 + i) * r + j0] = static_cast<T>(s0);
          if (nj == 2) xa[(m0 + i) * r + j0 + 1] = static_cast<T>(s1);
        }
      }
    }
  });
}

// ---- backward passes over [M, N] and [M, K] ------------------------------------------------------

// One pass over grad_y for every output-side gradient:
//   gz = gy * l_out;   g_out[n] = sum_m gy[m, n] z[m, n];   g_bias[n] = sum_m gz[m, n]
// (IA3-out: the bias joins before the scale) or, with bias_of_gy, sum_m gy[m, n] (DoRA's scale l:
// the bias joins after it).
// Column sums go to per-chunk float partials (chunk c owns rows [c*M/C, (c+1)*M/C)) that are
// added in a fixed order afterwards, so results do not depend on thread scheduling.
template <typename T, bool HAS_L, bool WANT_GZ, bool WANT_OUT, bool WANT_B>
void output_side_kernel(const T* gy, const float* l, const T* z, T* gz, float* partial, int64_t M, int64_t N,
                        int64_t chunks, bool bias_of_gy) {
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float* acc_out = partial + (2 * c) * N;
      float* acc_b = partial + (2 * c + 1) * N;
      for (int64_t m = c * M / chunks; m < (c + 1) * M / chunks; ++m) {
        const T* g = gy + m * N;
        const T* zr = WANT_OUT ? z + m * N : nullptr;
        T* gzr = WANT_GZ ? gz + m * N : nullptr;
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) {
          const float gv = to_float(g[n]);
          const float gzv = HAS_L ? gv * l[n] : gv;
          if constexpr (WANT_GZ) gzr[n] = static_cast<T>(gzv);
          if constexpr (WANT_OUT) acc_out[n] += gv * to_float(zr[n]);
          if constexpr (WANT_B) acc_b[n] += bias_of_gy ? gv : gzv;
        }
      }
    }
  });
}

// One pass over dh = dL/dh for the input-side gradients of IA3-in:
//   g_in[k] = sum_m dh[m, k] x[m, k];   dx = dh * l_in (written over dh)
template <typename T, bool WANT_GIN, bool WANT_GX>
void input_side_kernel(T* dh, const T* x, const float* l, float* partial, int64_t M, int64_t K, int64_t chunks) {
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float* acc = partial + c * K;
      for (int64_t m = c * M / chunks; m < (c + 1) * M / chunks; ++m) {
        T* d = dh + m * K;
        const T* xr = WANT_GIN ? x + m * K : nullptr;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) {
          const float dv = to_float(d[k]);
          if constexpr (WANT_GIN) acc[k] += dv * to_float(xr[k]);
          if constexpr (WANT_GX) d[k] = static_cast<T>(dv * l[k]);
        }
      }
    }
  });
}

// Sum of the [chunks, rows_per, width] partials' slot `slot` over chunks -> float [width].
Tensor reduce_partials(const Tensor& partial, int64_t chunks, int64_t slots, int64_t slot, int64_t width) {
  return partial.view({chunks, slots, width}).select(1, slot).sum(0);
}

struct OutputGrads {
  Tensor gz, g_out, g_bias;
};

OutputGrads output_side_backward(const Tensor& gy, const OptTensor& l_out, const OptTensor& z, bool want_gz,
                                 bool want_out, bool want_b, bool bias_of_gy = false) {
  const int64_t M = gy.size(0), N = gy.size(1);
  const bool has_l = present(l_out);
  OutputGrads r;
  want_gz = want_gz && has_l;  // without IA3-out, gz is grad_y itself
  if (!want_gz && !want_out && !want_b) return r;
  const int64_t chunks = reduction_chunks(M);
  Tensor partial = at::zeros({chunks, 2, N}, gy.options().dtype(at::kFloat));
  Tensor lf = has_l ? as_float_in(*l_out, gy.scalar_type()) : Tensor();
  Tensor zc = want_out ? z->contiguous() : Tensor();
  if (want_gz) r.gz = at::empty_like(gy);
  FASTPEFT_DISPATCH(gy.scalar_type(), "output_side_backward", [&] {
    bool_dispatch(has_l, [&](auto HL) {
      bool_dispatch(want_gz, [&](auto GZ) {
        bool_dispatch(want_out, [&](auto GO) {
          bool_dispatch(want_b, [&](auto GB) {
            output_side_kernel<scalar_t, decltype(HL)::value, decltype(GZ)::value, decltype(GO)::value,
                               decltype(GB)::value>(
                gy.data_ptr<scalar_t>(), has_l ? lf.data_ptr<float>() : nullptr,
                want_out ? zc.data_ptr<scalar_t>() : nullptr, want_gz ? r.gz.data_ptr<scalar_t>() : nullptr,
                partial.data_ptr<float>(), M, N, chunks, bias_of_gy);
          });
        });
      });
    });
  });
  if (want_out) r.g_out = reduce_partials(partial, chunks, 2, 0, N);
  if (want_b) r.g_bias = reduce_partials(partial, chunks, 2, 1, N);
  return r;
}

// Applies IA3-in's backward to dh in place (dh becomes dx when want_gx); returns g_in (float) if wanted.
Tensor input_side_backward(Tensor& dh, const OptTensor& x, const Tensor& l_in, bool want_gin, bool want_gx) {
  const int64_t M = dh.size(0), K = dh.size(1);
  if (!want_gin && !want_gx) return Tensor();
  const int64_t chunks = reduction_chunks(M);
  Tensor partial = at::zeros({want_gin ? chunks : 1, K}, dh.options().dtype(at::kFloat));
  Tensor lf = as_float_in(l_in, dh.scalar_type());
  Tensor xc = want_gin ? x->contiguous() : Tensor();
  FASTPEFT_DISPATCH(dh.scalar_type(), "input_side_backward", [&] {
    bool_dispatch(want_gin, [&](auto GI) {
      bool_dispatch(want_gx, [&](auto GX) {
        input_side_kernel<scalar_t, decltype(GI)::value, decltype(GX)::value>(
            dh.data_ptr<scalar_t>(), want_gin ? xc.data_ptr<scalar_t>() : nullptr, lf.data_ptr<float>(),
            partial.data_ptr<float>(), M, K, chunks);
      });
    });
  });
  return want_gin ? partial.sum(0) : Tensor();
}

// out = beta * out + scale * (a @ b), beta 0 or 1 (beta = 0: out's contents are not read).  BLAS skips
// the product when alpha = 0, which would hide a NaN or Inf in a or b; plain PyTorch's
// scale * (a @ b) does not, so lora_scale = 0 takes the product and multiplies it by 0.
void addmm_scaled_(Tensor& out, const Tensor& a, const Tensor& b, double beta, double scale) {
  if (scale != 0.0) {
    out.addmm_(a, b, beta, scale);
    return;
  }
  Tensor zeroed = at::mm(a, b).mul_(0.0);
  if (beta == 0.0) out.copy_(zeroed);
  else out.add_(zeroed);
}

// dX += scale * drop(t) (mask regenerated inside the add).
void dropout_add_(Tensor& out, const Tensor& t, double scale, double p, int64_t seed) {
  const int64_t M = out.size(0), K = out.size(1);
  const DropoutKey key(seed, p);
  const float s = static_cast<float>(scale / (1.0 - p));
  FASTPEFT_DISPATCH(out.scalar_type(), "dropout_add", [&] {
    masked_scale_kernel<scalar_t, true>(t.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), M, K, key, s);
  });
}

// [M, r] = drop(x) A^T with the mask applied in the loop that reads x.
Tensor lora_down_dropout(const Tensor& x, const Tensor& lora_A, double p, int64_t seed) {
  const int64_t M = x.size(0), K = x.size(1), r = lora_A.size(0);
  Tensor af = as_float_in(lora_A, x.scalar_type());
  Tensor xa = at::empty({M, r}, x.options());
  const DropoutKey key(seed, p);
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  FASTPEFT_DISPATCH(x.scalar_type(), "lora_down_dropout", [&] {
    bool_dispatch(p > 0.0, [&](auto DROP) {
      lora_down_dropout_kernel<scalar_t, decltype(DROP)::value>(x.data_ptr<scalar_t>(), af.data_ptr<float>(),
                                                                xa.data_ptr<scalar_t>(), M, K, r, key, scale);
    });
  });
  return xa;
}

// [M, r] = drop(x) A^T in x's dtype: the register-blocked kernel up to kMaxKernelRank; above it MKL,
// or with dropout the dot-product kernel above (both mask x as they read it: no dropped copy).
Tensor lora_down(const Tensor& x, const Tensor& lora_A, double p, int64_t seed) {
  if (lora_A.size(0) <= kMaxKernelRank) return lowrank_down(x, lora_A, p, seed);
  if (p > 0.0) return lora_down_dropout(x, lora_A, p, seed);
  return at::mm(x, lora_A.to(x.scalar_type()).t());
}

// The LoRA term of dX as a fresh [M, K] tensor: scale * drop(gyb A), gyb [M, r] and a [r, K] in x's dtype.
Tensor lora_grad_x_term(const Tensor& gyb, const Tensor& a, double scale, double p, int64_t seed) {
  Tensor t = at::empty({gyb.size(0), a.size(1)}, a.options());
  if (p > 0.0) {
    t.addmm_(gyb, a, 0.0, 1.0);  // beta = 0: t's uninitialised contents are not read
    const DropoutKey key(seed, p);
    const float s = static_cast<float>(scale / (1.0 - p));
    FASTPEFT_DISPATCH(t.scalar_type(), "dropout_scale", [&] {
      scalar_t* tp = t.data_ptr<scalar_t>();
      masked_scale_kernel<scalar_t, false>(tp, tp, t.size(0), t.size(1), key, s);  // in place
    });
  } else {
    addmm_scaled_(t, gyb, a, 0.0, scale);
  }
  return t;
}

// ---- argument checks (csrc/checks.h; shared by the CPU and Meta implementations) ---------------

// Every given tensor argument on the CPU.
void check_cpu_args(const OpArgs& a) {
  for_each_tensor(a, [](int, const char* name, const Tensor& t) {
    if (t.defined()) check_cpu(t, name);
  });
}

}  // namespace

// ---- ops ------------------------------------------------------------------------------------------

Tensor keep_mask(int64_t seed, double p, int64_t rows, int64_t cols, int64_t first_row) {
  TORCH_CHECK(rows >= 0 && cols >= 0 && first_row >= 0,
              "fastpeft_cpp: keep_mask: rows, cols and first_row must be >= 0, got ", rows, ", ", cols, ", ", first_row);
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fastpeft_cpp: keep_mask: p must be in [0, 1), got ", p);
  TORCH_CHECK(seed >= 0, "fastpeft_cpp: keep_mask: seed must be in [0, 2**63), got ", seed);
  Tensor out = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool));
  bool* o = out.data_ptr<bool>();
  const DropoutKey key(seed, p);
  at::parallel_for(0, rows, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const uint64_t base = static_cast<uint64_t>(first_row + m) * static_cast<uint64_t>(cols);
      for (int64_t k = 0; k < cols; ++k) o[m * cols + k] = key.keep(base + k);
    }
  });
  return out;
}

Tensor dropout(const Tensor& x_in, double p, int64_t seed) {
  TORCH_CHECK(x_in.dim() == 2, "fastpeft_cpp: dropout: x must be 2-D [M, K], got shape ", x_in.sizes());
  check_compute_dtype(x_in, "x");
  check_cpu(x_in, "x");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fastpeft_cpp: dropout: p must be in [0, 1), got ", p);
  TORCH_CHECK(seed >= 0, "fastpeft_cpp: dropout: seed must be in [0, 2**63), got ", seed);
  Tensor x = x_in.contiguous();
  Tensor out = at::empty_like(x);
  const DropoutKey key(seed, p);
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  FASTPEFT_DISPATCH(x.scalar_type(), "dropout", [&] {
    masked_scale_kernel<scalar_t, false>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.size(0), x.size(1),
                                         key, scale);
  });
  return out;
}

void check_forward_args(const OpArgs& a, std::optional<int64_t> seed, bool check_values) {
  check_scalars(a.p, seed);
  const int64_t M = a.x.dim() == 2 ? a.x.size(0) : 0;
  const Dims d = check_tensors(a.x, /*is_x=*/true, M, a);
  if (a.x.is_meta()) return;  // the Meta kernels: shapes only (every tensor is on x's device, checked above)
  check_cpu_args(a);
  if (check_values && present(a.sparse_index)) check_sparse_values(*a.sparse_index, d.N, d.K);
}

std::tuple<Tensor, Tensor, Tensor> peft_linear_forward(const OpArgs& a, bool save_z) {
  TORCH_CHECK_VALUE(a.x.dim() == 2, "x must be 2-D [M, K] (fastpeft.peft_linear makes it so), got shape ", a.x.sizes());
  TORCH_CHECK_VALUE(a.x.is_contiguous(), "x must be contiguous (fastpeft.peft_linear makes it so)");
  check_forward_args(a, a.seed, /*check_values=*/true);
  return peft_linear_forward_prechecked(a, save_z);
}

namespace {

// DoRA's output scale: y = c * u + bias, in the one pass that writes y (u is kept as z when save_z).
std::tuple<Tensor, Tensor, Tensor> scale_output(const OpArgs& a, Tensor u, Tensor xa, bool save_z) {
  const auto dt = u.scalar_type();
  Tensor c = a.dora_scale->to(dt);
  if (save_z) {
    Tensor y = present(a.bias) ? at::addcmul(a.bias->to(dt), u, c) : u * c;
    return {y, xa, u};
  }
  if (present(a.bias)) at::addcmul_out(u, a.bias->to(dt), u, c);
  else u.mul_(c);
  return {u, xa, u.new_empty({0})};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> peft_linear_forward_prechecked(const OpArgs& a, bool save_z) {
  if (present(a.dora_scale)) {
    // u = the op without its bias and scale; then y = c * u + bias.
    OpArgs inner = a;
    inner.bias = std::nullopt;
    inner.dora_scale = std::nullopt;
    auto [u, xa, unused] = peft_linear_forward_prechecked(inner, false);
    return scale_output(a, u, xa, save_z);
  }
  const Dims d{a.x.size(0), a.x.size(1), a.weight.size(0), present(a.lora_A) ? a.lora_A->size(0) : 0};
  const auto dt = a.x.scalar_type();

  Tensor h = present(a.ia3_in) ? a.x * a.ia3_in->to(dt) : a.x;
  const bool has_lora = present(a.lora_A);
  Tensor y, xa, z_saved = a.x.new_empty({0});
  if (has_lora && !present(a.ia3_out)) {
    // y = (bias + s * xa B^T) + h W^T: the LoRA branch writes y (with the bias) and the frozen GEMM
    // accumulates onto it (beta = 1), so y takes no extra pass for LoRA.
    if (d.r <= kMaxKernelRank) {
      std::tie(y, xa) = lowrank_forward(a.x, *a.lora_A, *a.lora_B, a.bias, a.lora_scale, a.p, a.seed);
    } else {
      xa = lora_down(a.x, *a.lora_A, a.p, a.seed);
      Tensor b = a.lora_B->to(dt);
      if (present(a.bias)) {
        y = a.bias->to(dt).expand({d.M, d.N}).contiguous();
        addmm_scaled_(y, xa, b.t(), 1.0, a.lora_scale);
      } else {
        y = at::empty({d.M, d.N}, a.x.options());
        addmm_scaled_(y, xa, b.t(), 0.0, a.lora_scale);  // beta = 0: y's uninitialised contents are not read
      }
    }
    y.addmm_(h, a.weight.t());
    if (present(a.sparse_index)) {
      Tensor rowptr = build_row_pointers(*a.sparse_index, d.N, d.K);  // the index was checked by the caller
      sparse_matmul_add_(y, h.contiguous(), *a.sparse_index, as_float_in(*a.sparse_value, dt), rowptr);
    }
    return {y, xa, z_saved};
  }
  // With IA3 on the output, z = h W^T + bias (+ h S^T) is scaled before LoRA joins.
  xa = has_lora ? lora_down(a.x, *a.lora_A, a.p, a.seed) : a.x.new_empty({0});
  Tensor z = present(a.bias) ? at::addmm(a.bias->to(dt), h, a.weight.t()) : at::mm(h, a.weight.t());
  if (present(a.sparse_index)) {
    Tensor rowptr = build_row_pointers(*a.sparse_index, d.N, d.K);
    sparse_matmul_add_(z, h.contiguous(), *a.sparse_index, as_float_in(*a.sparse_value, dt), rowptr);
  }
  if (save_z) {
    z_saved = z;
    y = present(a.ia3_out) ? z * a.ia3_out->to(dt) : z.clone();
  } else {
    y = z;
    if (present(a.ia3_out)) y.mul_(a.ia3_out->to(dt));
  }
  if (has_lora) addmm_scaled_(y, xa, a.lora_B->to(dt).t(), 1.0, a.lora_scale);  // in place (beta = 1)
  return {y, xa, z_saved};
}

std::vector<Tensor> peft_linear_backward(const Tensor& grad_y_in, const OpArgs& a, const OptTensor& xa,
                                         const OptTensor& z, const Needs& needs) {
  TORCH_CHECK(grad_y_in.dim() == 2, "fastpeft_cpp: grad_y must be 2-D [M, N], got shape ", grad_y_in.sizes());
  check_cpu(grad_y_in, "grad_y");
  check_scalars(a.p, a.seed);
  const Dims d = check_tensors(grad_y_in, /*is_x=*/false, grad_y_in.size(0), a);
  check_cpu_args(a);
  if (present(xa)) check_cpu(*xa, "xa");
  if (present(z)) check_cpu(*z, "z");
  const int64_t M = d.M, K = d.K, N = d.N;
  const auto dt = grad_y_in.scalar_type();
  TORCH_CHECK(grad_y_in.size(1) == N, "fastpeft_cpp: grad_y must have shape [M, ", N, "], got ", grad_y_in.sizes());
  const bool need_h = needs[g_weight] || needs[g_lora_A] || needs[g_ia3_in] || needs[g_sparse_value];
  if (need_h) {
    TORCH_CHECK(present(a.x), "fastpeft_cpp: x is required for the gradients of weight, lora_A, ia3_in or "
                            "sparse_value");
    TORCH_CHECK(a.x.sizes() == at::IntArrayRef({M, K}) && a.x.scalar_type() == dt,
                "fastpeft_cpp: x must be [", M, ", ", K, "] in ", dt, ", got ", a.x.scalar_type(), " ", a.x.sizes());
  }
  TORCH_CHECK(!needs[g_bias] || present(a.bias), "fastpeft_cpp: needs asks for the bias gradient but bias is None");
  TORCH_CHECK(!(needs[g_lora_A] || needs[g_lora_B]) || present(a.lora_A),
              "fastpeft_cpp: needs asks for LoRA gradients but lora_A/lora_B are None");
  TORCH_CHECK(!needs[g_ia3_in] || present(a.ia3_in), "fastpeft_cpp: needs asks for the ia3_in gradient but ia3_in is None");
  TORCH_CHECK(!needs[g_ia3_out] || present(a.ia3_out), "fastpeft_cpp: needs asks for the ia3_out gradient but ia3_out is None");
  TORCH_CHECK(!needs[g_sparse_value] || present(a.sparse_value),
              "fastpeft_cpp: needs asks for the sparse_value gradient but sparse_value is None");
  if (needs[g_lora_B]) {
    TORCH_CHECK(present(xa) && xa->sizes() == at::IntArrayRef({M, d.r}) && xa->scalar_type() == dt,
                "fastpeft_cpp: xa (the saved [M, r] product drop(x) A^T) must be [", M, ", ", d.r, "] in ", dt);
  }
  TORCH_CHECK(!needs[g_dora_scale] || present(a.dora_scale),
              "fastpeft_cpp: needs asks for the dora_scale gradient but dora_scale is None");
  if (needs[g_ia3_out] || needs[g_dora_scale]) {
    TORCH_CHECK(present(z) && z->sizes() == at::IntArrayRef({M, N}) && z->scalar_type() == dt,
                "fastpeft_cpp: z (the saved pre-IA3 / pre-scale output) must be [", M, ", ", N, "] in ", dt);
  }
  Tensor gy = grad_y_in.contiguous();
  std::vector<Tensor> grads(kNumGrads);
  bool need_bias = needs[g_bias];
  if (present(a.dora_scale)) {
    // y = c * u + bias, one pass: c * gy (what everything before the scale reads), dc = sum gy * u,
    // d bias = sum gy.
    OutputGrads sg = output_side_backward(gy, a.dora_scale, z, /*want_gz=*/true, needs[g_dora_scale], need_bias,
                                          /*bias_of_gy=*/true);
    if (needs[g_dora_scale]) grads[g_dora_scale] = sg.g_out.to(a.dora_scale->scalar_type());
    if (need_bias) grads[g_bias] = sg.g_bias.to(a.bias->scalar_type());
    gy = sg.gz;
    need_bias = false;
  }

  // Output side: gz = gy * ia3_out plus the ia3_out and bias reductions, one pass.
  const bool need_gz = needs[g_x] || needs[g_ia3_in] || needs[g_weight] || needs[g_sparse_value];
  OutputGrads og = output_side_backward(gy, a.ia3_out, z, need_gz, needs[g_ia3_out], need_bias);
  Tensor gz = og.gz.defined() ? og.gz : gy;
  if (needs[g_ia3_out]) grads[g_ia3_out] = og.g_out.to(a.ia3_out->scalar_type());
  if (need_bias) grads[g_bias] = og.g_bias.to(a.bias->scalar_type());

  // LoRA's rank-sized products first (the dX GEMM may accumulate onto LoRA's term):
  //   gyb = gy B [M, r];   dB = s gy^T xa;   dA = s gyb^T drop(x);   dX += s drop(gyb A)
  const bool has_lora = present(a.lora_A);
  Tensor a_dt, gyb;  // lora_A in x's dtype
  if (has_lora && (needs[g_x] || needs[g_lora_A] || needs[g_lora_B])) {
    a_dt = a.lora_A->to(dt);
    if (d.r <= kMaxKernelRank) {
      // One pass over gy and x for gyb, dB and dA, in float32 (gyb rounded to x's dtype for MKL).
      LowRankGrads lg = lowrank_backward(gy, *a.lora_B, needs[g_lora_B] ? *xa : Tensor(),
                                         needs[g_lora_A] ? a.x : Tensor(), a.lora_scale, a.p, a.seed,
                                         needs[g_lora_B], needs[g_lora_A]);
      gyb = lg.gyb.to(dt);
      if (needs[g_lora_B]) grads[g_lora_B] = lg.dB.to(a.lora_B->scalar_type());
      if (needs[g_lora_A]) grads[g_lora_A] = lg.dA.to(a.lora_A->scalar_type());
    } else {
      // dB = s * gy^T xa as (xa^T gy)^T: MKL is ~2.5x faster on the wide [r, N] output than on the
      // tall-skinny [N, r] one (same FLOPs), and the [N, r] transpose copy is tiny.
      if (needs[g_lora_B])
        grads[g_lora_B] = at::mm(xa->t(), gy).mul_(a.lora_scale).t().contiguous().to(a.lora_B->scalar_type());
      if (needs[g_x] || needs[g_lora_A]) gyb = at::mm(gy, a.lora_B->to(dt));
      if (needs[g_lora_A]) {
        Tensor xd = a.p > 0.0 ? dropout(a.x, a.p, a.seed) : a.x.contiguous();
        grads[g_lora_A] = at::mm(gyb.t(), xd).mul_(a.lora_scale).to(a.lora_A->scalar_type());
      }
    }
  }

  Tensor rowptr, value_f;
  if (present(a.sparse_index) && (needs[g_x] || needs[g_ia3_in] || needs[g_sparse_value]))
    rowptr = sparse_row_pointers(*a.sparse_index, N, K);
  if (present(a.sparse_index) && (needs[g_x] || needs[g_ia3_in])) value_f = as_float_in(*a.sparse_value, dt);

  if (needs[g_x] || needs[g_ia3_in]) {
    const bool lora_in_dx = has_lora && needs[g_x];
    // Without IA3 on the input, dX = s drop(gyb A) + gz W (+ gz S): LoRA's term is written first and
    // the frozen GEMM accumulates onto it (beta = 1).  With IA3-in, dh = gz W is scaled first.
    const bool lora_first = lora_in_dx && !present(a.ia3_in);
    Tensor dh;
    if (lora_first) {
      dh = lora_grad_x_term(gyb, a_dt, a.lora_scale, a.p, a.seed);
      dh.addmm_(gz, a.weight);
    } else {
      dh = at::mm(gz, a.weight);
    }
    if (present(a.sparse_index)) sparse_matmul_t_add_(dh, gz, *a.sparse_index, value_f, rowptr);
    if (present(a.ia3_in)) {
      Tensor gin = input_side_backward(dh, a.x, *a.ia3_in, needs[g_ia3_in], needs[g_x]);
      if (needs[g_ia3_in]) grads[g_ia3_in] = gin.to(a.ia3_in->scalar_type());
    }
    if (needs[g_x]) {
      if (lora_in_dx && !lora_first) {
        if (a.p > 0.0) dropout_add_(dh, at::mm(gyb, a_dt), a.lora_scale, a.p, a.seed);  // mask applied in the add
        else addmm_scaled_(dh, gyb, a_dt, 1.0, a.lora_scale);                         // in place (beta = 1)
      }
      grads[g_x] = dh;
    }
  }
  if (needs[g_weight]) {
    Tensor h = present(a.ia3_in) ? a.x * a.ia3_in->to(dt) : a.x;
    grads[g_weight] = at::mm(gz.t(), h).to(a.weight.scalar_type());
  }
  if (needs[g_sparse_value]) {
    OptTensor scale = present(a.ia3_in) ? OptTensor(as_float_in(*a.ia3_in, dt)) : std::nullopt;
    grads[g_sparse_value] =
        sddmm(gz, a.x.contiguous(), scale, *a.sparse_index, N).to(a.sparse_value->scalar_type());
  }
  for (auto& g : grads)
    if (!g.defined()) g = gy.new_empty({0});
  return grads;
}

// ---- Meta (shape-only) --------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> peft_linear_forward_meta(const OpArgs& a, bool save_z) {
  TORCH_CHECK_VALUE(a.x.dim() == 2, "x must be 2-D [M, K] (fastpeft.peft_linear makes it so), got shape ", a.x.sizes());
  check_scalars(a.p, a.seed);
  const Dims d = check_tensors(a.x, /*is_x=*/true, a.x.size(0), a);
  Tensor y = a.x.new_empty({d.M, d.N});
  Tensor xa = present(a.lora_A) ? a.x.new_empty({d.M, d.r}) : a.x.new_empty({0});
  Tensor z = save_z ? a.x.new_empty({d.M, d.N}) : a.x.new_empty({0});
  return {y, xa, z};
}

std::vector<Tensor> peft_linear_backward_meta(const Tensor& grad_y, const OpArgs& a, const OptTensor& xa,
                                              const OptTensor& z, const Needs& needs) {
  TORCH_CHECK(grad_y.dim() == 2, "fastpeft_cpp: grad_y must be 2-D [M, N], got shape ", grad_y.sizes());
  check_scalars(a.p, a.seed);
  const Dims d = check_tensors(grad_y, /*is_x=*/false, grad_y.size(0), a);
  std::vector<Tensor> grads(kNumGrads);
  for_each_tensor(a, [&](int i, const char*, const Tensor& t) {
    const int g = kGradOf[i];
    if (g == kNoGrad || !needs[g]) return;
    if (g == g_x) {
      grads[g] = grad_y.new_empty({d.M, d.K});  // x itself is not saved when only dX is needed
      return;
    }
    TORCH_CHECK(t.defined(), "fastpeft_cpp: needs asks for a gradient of an argument that is None");
    grads[g] = at::empty_like(t);
  });
  for (auto& g : grads)
    if (!g.defined()) g = grad_y.new_empty({0});
  return grads;
}

}  // namespace fastpeft
