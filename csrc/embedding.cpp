// LoRA on an embedding table (fastpeft.LoRAEmbedding, peft's lora.Embedding layout):
//
//   forward    y[m, :]  = E[ids[m], :] + s * sum_k A[k, ids[m]] * B[:, k]       E [V, N], A [r, V], B [N, r]
//   backward   u[m, :]  = sum_n gy[m, n] * B[n, :]                              (grad_y B, [M, r])
//              dA[:, j] = s * sum_{m : ids[m] = j} u[m, :]   (j = padding_idx gets nothing; / count(j) with
//                                                             scale_grad_by_freq, as F.embedding)
//              dB       = s * gyᵀ xa,  xa[m, :] = A[:, ids[m]]
//   The frozen table gets no gradient here (the caller adds one if it trains).
//
// Forward: one pass that gathers the rows' r-vectors xa (r strided loads per id), then writes each
// output row once: E's row converted to float, plus xa·(s Bᵀ) from a float [r, N] copy of s Bᵀ
// kept in L2, MR rows at a time so every loaded vector of s Bᵀ feeds MR FMAs.  No [M, N]
// temporary (the unfused form writes E[ids], xa Bᵀ, its scaled copy and their sum).
// Backward: u and dB in one pass over grad_y (lowrank.cpp's backward kernel, r <= 64; MKL above),
// then dA is a scatter-add of s u into the columns ids, parallel over the r rows of dA (each row
// owned by one thread: no atomics, a fixed order, deterministic).
#include "embedding.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "lowrank.h"

namespace fastpeft {

namespace {

typedef float vec16 __attribute__((vector_size(64)));
typedef float vec16u __attribute__((vector_size(64), aligned(4), may_alias));
constexpr int64_t kLanes = 16;
inline vec16 load16(const float* p) { return *reinterpret_cast<const vec16u*>(p); }
inline void store16(float* p, vec16 v) { *reinterpret_cast<vec16u*>(p) = v; }

#ifdef __AVX512F__
constexpr int kRows = 6;  // 6 x 2 accumulators + 2 operands of 32 zmm
#else
constexpr int kRows = 3;  // 16 ymm: 3 x 2 x 2 accumulators + 2 x 2 operands
#endif

void check_ids(const Tensor& ids, int64_t V) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, "fastpeft_cpp.embedding_lora: ids must be int64, got ",
                   ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 1, "fastpeft_cpp.embedding_lora: ids must be 1-D [M], got ", ids.sizes());
  check_cpu(ids, "ids");
  if (ids.numel() == 0) return;
  const auto mm = at::aminmax(ids);
  const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi < V, "ids must be in [0, ", V, ") (the table has ", V, " rows), got ",
                    lo < 0 ? lo : hi);
}

void check_factors(const Tensor& lora_A, const Tensor& lora_B, int64_t V, int64_t N, at::ScalarType dt) {
  TORCH_CHECK_VALUE(lora_A.dim() == 2 && lora_A.size(0) >= 1 && lora_A.size(1) == V,
                    "fastpeft_cpp.embedding_lora: lora_A must be [r, ", V, "] with r >= 1, got ", lora_A.sizes());
  const int64_t r = lora_A.size(0);
  TORCH_CHECK_VALUE(lora_B.dim() == 2 && lora_B.size(0) == N && lora_B.size(1) == r,
                    "fastpeft_cpp.embedding_lora: lora_B must be [", N, ", ", r, "], got ", lora_B.sizes());
  for (const Tensor* t : {&lora_A, &lora_B}) {
    TORCH_CHECK_TYPE(t->scalar_type() == dt || t->scalar_type() == at::kFloat,
                     "fastpeft_cpp.embedding_lora: lora_A and lora_B must have the table's dtype (", dt,
                     ") or float32, got ", t->scalar_type());
    check_cpu(*t, t == &lora_A ? "lora_A" : "lora_B");
  }
}

// xa[m, k] = A[k, ids[m]] as float32 [M, r] (A of any strides).
template <typename S>
void gather_columns(const S* a, int64_t s0, int64_t s1, const int64_t* ids, float* xa, int64_t M, int64_t r) {
  at::parallel_for(0, M, 256, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const S* col = a + ids[m] * s1;
      for (int64_t k = 0; k < r; ++k) xa[m * r + k] = static_cast<float>(col[k * s0]);
    }
  });
}

Tensor gathered(const Tensor& lora_A, const Tensor& ids) {
  const int64_t M = ids.size(0), r = lora_A.size(0);
  Tensor xa = at::empty({M, r}, lora_A.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lora_A.scalar_type(), "embedding_lora_gather", [&] {
    gather_columns(lora_A.data_ptr<scalar_t>(), lora_A.stride(0), lora_A.stride(1), ids.data_ptr<int64_t>(),
                   xa.data_ptr<float>(), M, r);
  });
  return xa;
}

// y[m, n] = E[ids[m], n] + sum_k xa[m, k] bst[k, n]; bst = s Bᵀ float32 [r, ld].
template <typename T>
void forward_kernel(const T* e, int64_t e_ld, const int64_t* ids, const float* xa, const float* bst, int64_t ld,
                    T* y, int64_t M, int64_t N, int64_t r) {
  constexpr int64_t NB = 2 * kLanes;
  const int64_t blocks = (M + kRows - 1) / kRows, n_main = N - N % NB;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    float tmp[NB];
    std::vector<float> xs(static_cast<size_t>(kRows * r));  // the block's xa rows (zeros past M)
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * kRows, rows = std::min<int64_t>(kRows, M - m0);
      const T* er[kRows];
      for (int64_t i = 0; i < kRows; ++i) {
        er[i] = e + ids[m0 + std::min<int64_t>(i, rows - 1)] * e_ld;
        for (int64_t k = 0; k < r; ++k) xs[i * r + k] = i < rows ? xa[(m0 + i) * r + k] : 0.f;
      }
      for (int64_t n = 0; n < n_main; n += NB) {
        vec16 out[kRows][2];
        for (int i = 0; i < kRows; ++i) {
          if constexpr (std::is_same_v<T, float>) {
            out[i][0] = load16(er[i] + n);
            out[i][1] = load16(er[i] + n + kLanes);
          } else {
            for (int64_t l = 0; l < NB; ++l) tmp[l] = static_cast<float>(er[i][n + l]);
            out[i][0] = load16(tmp);
            out[i][1] = load16(tmp + kLanes);
          }
        }
        for (int64_t k = 0; k < r; ++k) {
          const float* w = bst + k * ld + n;
          const vec16 w0 = load16(w), w1 = load16(w + kLanes);
#pragma GCC unroll 8
          for (int i = 0; i < kRows; ++i) {
            const float s = xs[i * r + k];
            out[i][0] += s * w0;
            out[i][1] += s * w1;
          }
        }
        for (int64_t i = 0; i < rows; ++i) {
          T* yr = y + (m0 + i) * N + n;
          if constexpr (std::is_same_v<T, float>) {
            store16(yr, out[i][0]);
            store16(yr + kLanes, out[i][1]);
          } else {
            store16(tmp, out[i][0]);
            store16(tmp + kLanes, out[i][1]);
            for (int64_t l = 0; l < NB; ++l) yr[l] = static_cast<T>(tmp[l]);
          }
        }
      }
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t n = n_main; n < N; ++n) {
          float v = static_cast<float>(er[i][n]);
          for (int64_t k = 0; k < r; ++k) v += xa[(m0 + i) * r + k] * bst[k * ld + n];
          y[(m0 + i) * N + n] = static_cast<T>(v);
        }
    }
  });
}

}  // namespace

Tensor embedding_lora_forward(const Tensor& ids, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
                              double scale) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "fastpeft_cpp.embedding_lora: weight must be 2-D [V, N], got ", weight.sizes());
  check_compute_dtype(weight, "weight");
  check_cpu(weight, "weight");
  const int64_t V = weight.size(0), N = weight.size(1);
  check_ids(ids, V);
  check_factors(lora_A, lora_B, V, N, weight.scalar_type());
  const int64_t M = ids.size(0), r = lora_A.size(0);
  Tensor e = weight.stride(1) == 1 ? weight : weight.contiguous();
  Tensor idc = ids.contiguous();
  Tensor y = at::empty({M, N}, weight.options());
  if (M == 0 || N == 0) return y;
  Tensor xa = gathered(lora_A, idc);
  // s Bᵀ as float32 [r, ld]; rows N + 16 floats apart (a 4 KB stride would put them in one L1 set).
  const int64_t ld = N + kLanes;
  Tensor bst = at::empty({r, ld}, weight.options().dtype(at::kFloat));
  {
    Tensor bf = lora_B.to(at::kFloat);
    const float s = static_cast<float>(scale);
    auto b = bf.accessor<float, 2>();
    float* out = bst.data_ptr<float>();
    for (int64_t n0 = 0; n0 < N; n0 += 16)  // 16-row tiles: the transposing walk stays in L1
      for (int64_t k = 0; k < r; ++k)
        for (int64_t n = n0; n < std::min<int64_t>(N, n0 + 16); ++n) out[k * ld + n] = s * b[n][k];
  }
  FASTPEFT_DISPATCH(weight.scalar_type(), "embedding_lora_forward", [&] {
    forward_kernel<scalar_t>(e.data_ptr<scalar_t>(), e.stride(0), idc.data_ptr<int64_t>(), xa.data_ptr<float>(),
                             bst.data_ptr<float>(), ld, y.data_ptr<scalar_t>(), M, N, r);
  });
  return y;
}

std::tuple<Tensor, Tensor> embedding_lora_backward(const Tensor& grad_y, const Tensor& ids, const Tensor& lora_A,
                                                   const Tensor& lora_B, double scale, int64_t padding_idx,
                                                   bool scale_grad_by_freq, std::array<bool, 2> needs) {
  check_compute_dtype(grad_y, "grad_y");
  check_cpu(grad_y, "grad_y");
  const int64_t V = lora_A.size(1), N = lora_B.size(0);
  check_ids(ids, V);
  check_factors(lora_A, lora_B, V, N, grad_y.scalar_type());
  const int64_t M = ids.size(0), r = lora_A.size(0);
  TORCH_CHECK_VALUE(grad_y.dim() == 2 && grad_y.size(0) == M && grad_y.size(1) == N,
                    "fastpeft_cpp.embedding_lora: grad_y must be [", M, ", ", N, "], got ", grad_y.sizes());
  const bool want_dA = needs[0], want_dB = needs[1];
  Tensor dA = want_dA ? at::zeros({r, V}, lora_A.options().dtype(at::kFloat)) : at::empty({0}, lora_A.options());
  Tensor dB = want_dB ? at::zeros({N, r}, lora_B.options().dtype(at::kFloat)) : at::empty({0}, lora_B.options());
  if ((!want_dA && !want_dB) || M == 0) return {want_dA ? dA.to(lora_A.scalar_type()) : dA,
                                                want_dB ? dB.to(lora_B.scalar_type()) : dB};
  Tensor idc = ids.contiguous();
  // grad_y in float32: the products then read A and B exactly (no rounding to the table's dtype).
  Tensor gy = grad_y.to(at::kFloat).contiguous();
  Tensor bf = lora_B.to(at::kFloat).contiguous();
  Tensor xa = want_dB ? gathered(lora_A, idc) : Tensor();
  Tensor u;
  if (r <= kMaxKernelRank) {
    LowRankGrads g = lowrank_backward(gy, bf, want_dB ? xa : Tensor(), Tensor(), scale, 0.0, 0, want_dB, false);
    u = g.gyb;
    if (want_dB) dB = g.dB;
  } else {
    u = at::mm(gy, bf);
    if (want_dB) dB = at::mm(gy.t(), xa).mul_(scale);
  }
  if (want_dA) {
    const int64_t* id = idc.data_ptr<int64_t>();
    std::vector<float> inv;  // 1 / count(id) for scale_grad_by_freq
    if (scale_grad_by_freq) {
      std::vector<int64_t> count(static_cast<size_t>(V), 0);
      for (int64_t m = 0; m < M; ++m) ++count[id[m]];
      inv.resize(static_cast<size_t>(M));
      for (int64_t m = 0; m < M; ++m) inv[m] = 1.f / static_cast<float>(count[id[m]]);
    }
    const float* up = u.data_ptr<float>();
    const int64_t u_ld = u.stride(0);
    float* da = dA.data_ptr<float>();
    const float s = static_cast<float>(scale);
    at::parallel_for(0, r, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        float* row = da + k * V;
        for (int64_t m = 0; m < M; ++m) {
          if (id[m] == padding_idx) continue;
          row[id[m]] += s * (scale_grad_by_freq ? up[m * u_ld + k] * inv[m] : up[m * u_ld + k]);
        }
      }
    });
  }
  return {want_dA ? dA.to(lora_A.scalar_type()) : dA, want_dB ? dB.to(lora_B.scalar_type()) : dB};
}

}  // namespace fastpeft
