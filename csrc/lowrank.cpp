// The rank-sized products of the LoRA path (DESIGN.md section 1) for r <= kMaxKernelRank:
//
//   down:         xa[m, :]  = sum_k drop(x)[m, k] * A[:, k]
//   backward:     gyb[m, :] = sum_n gy[m, n] * B[n, :];    dB[n, :] = s * sum_m gy[m, n] * xa[m, :]
//                 dA[:, k]  = s * sum_m drop(x)[m, k] * gyb[m, :]
//
// Why not MKL: its GEMMs are tuned for large squares, and with one dimension r <= 32 they run at
// 15-80 GFLOP/s on two cores (x A^T is slower at r = 8 than at r = 16), against ~190 for the frozen
// GEMM beside them; at r = 64 they are as fast as these kernels, which still win there by fusing
// the dropout mask and reading grad_y and x once.  Here the r-wide result row lives in 1-4 vector
// registers (r padded to 8, 16, 32 or 64 with zeros), MR rows of the big operand are streamed
// together, and each of its elements
// is loaded once and broadcast into the FMAs of every vector of that row: the big operand is the
// only memory traffic.  The backward pass reads grad_y and x once for all three products (MKL
// reads grad_y twice and needs a dropped copy of x), with dB and dA accumulated into per-chunk
// partials summed in a fixed order (deterministic).
#include "lowrank.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "dropout_mask.h"

namespace fastpeft {

namespace {

// W floats (8 or 16); GCC/Clang lower a 16-float vector to one zmm (AVX-512), two ymm (AVX2) or
// four xmm (SSE / NEON).  The rank dimension uses W = 8 for r <= 8 (no FMAs on padding), else 16.
template <int W>
struct Vec;
template <>
struct Vec<8> {
  typedef float type __attribute__((vector_size(32)));
  typedef float unaligned __attribute__((vector_size(32), aligned(4), may_alias));
};
template <>
struct Vec<16> {
  typedef float type __attribute__((vector_size(64)));
  typedef float unaligned __attribute__((vector_size(64), aligned(4), may_alias));
};
template <int W>
inline typename Vec<W>::type loadv(const float* p) {
  return *reinterpret_cast<const typename Vec<W>::unaligned*>(p);
}
template <int W>
inline void storev(float* p, typename Vec<W>::type v) {
  *reinterpret_cast<typename Vec<W>::unaligned*>(p) = v;
}
typedef Vec<16>::type vec16;
constexpr int64_t kLanes = 16;
inline vec16 load16(const float* p) { return loadv<16>(p); }
inline void store16(float* p, vec16 v) { storev<16>(p, v); }

// Rows per register block: MR x NV accumulators (plus NV operand vectors, and MR x NV xa rows in
// the backward pass) must fit the register file: 32 zmm with AVX-512, 16 ymm (8 vec16) without.
// (Measured at 512 x 1024 x 1024: NV = 2 runs ~2x faster with 8 rows than with 4 in the forward.)
#ifdef __AVX512F__
template <int NV> constexpr int kDownRows = NV == 1 ? 8 : NV == 2 ? 8 : 6;
template <int NV> constexpr int kUpRows = NV == 1 ? 8 : NV == 2 ? 6 : 3;
#else
template <int NV> constexpr int kDownRows = NV == 1 ? 4 : NV == 2 ? 2 : 1;
template <int NV> constexpr int kUpRows = NV == 1 ? 2 : 1;
#endif

// dst[k] = drop(src)[k] * scale as float (the mask of x's flat offsets base + k; DROP = false: no mask).
template <typename T, bool DROP>
inline void row_to_float(const T* __restrict__ src, float* __restrict__ dst, int64_t K, uint64_t base,
                         const DropoutKey& key, float scale) {
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) {
    if constexpr (DROP) dst[k] = dropped(to_float(src[k]), key.keep(base + k), scale);  // NaN propagates
    else dst[k] = to_float(src[k]) * scale;
  }
}

// out[i] = row m0 + i of src [*, cols] as float32, i < MR: src's own row when IN_PLACE (float input,
// no mask), else the row dropped, scaled and converted into buf (row stride ld); rows at or past
// `rows` (the end of M in the last block) read zero_row.
template <int MR, bool IN_PLACE, bool DROP, typename T>
inline void float_rows(const T* src, int64_t m0, int64_t rows, int64_t cols, float* buf, int64_t ld,
                       const float* zero_row, const DropoutKey& key, float scale, const float* (&out)[MR]) {
  for (int i = 0; i < MR; ++i) {
    if (i >= rows) {
      out[i] = zero_row;
    } else if constexpr (IN_PLACE) {
      out[i] = reinterpret_cast<const float*>(src) + (m0 + i) * cols;
    } else {
      row_to_float<T, DROP>(src + (m0 + i) * cols, buf + i * ld, cols, static_cast<uint64_t>(m0 + i) * cols, key,
                            scale);
      out[i] = buf + i * ld;
    }
  }
}

// xa[m, j] = sum_k drop(x)[m, k] * at[k, j], at = A^T zero-padded to [K, W NV] float32, and with UP
// also y[m, n] = bias[n] + sum_j xa[m, j] * bst[j, n] (bst = scale * B^T, float32 [r, N] with row
// stride bst_ld; bias float32 [N] or null) while the block's xa rows are hot: y is written once.
template <typename T, int W, int NV, bool DROP, bool UP>
void down_kernel(const T* x, const float* at, T* xa, int64_t M, int64_t K, int64_t r, DropoutKey key, float scale,
                 const float* bst = nullptr, int64_t bst_ld = 0, const float* bias = nullptr, T* y = nullptr,
                 int64_t N = 0) {
  constexpr int MR = kDownRows<NV>;
  constexpr int64_t RP = NV * W;
  using vec = typename Vec<W>::type;
  constexpr bool kInPlace = std::is_same_v<T, float> && !DROP;  // read x itself, no float copy
  const int64_t blocks = (M + MR - 1) / MR;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const int64_t ld = K + kLanes;  // converted rows not 4 KB apart (one L1 set) when K = 1024
    std::vector<float> buf(static_cast<size_t>((MR + 1) * ld), 0.f);
    const float* zero_row = buf.data() + MR * ld;  // stands in for the rows past M in the last block
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * MR, rows = std::min<int64_t>(MR, M - m0);
      const float* xr[MR];
      float_rows<MR, kInPlace, DROP>(x, m0, rows, K, buf.data(), ld, zero_row, key, scale, xr);
      vec acc[MR][NV] = {};
      for (int64_t k = 0; k < K; ++k) {
        vec a[NV];
        for (int v = 0; v < NV; ++v) a[v] = loadv<W>(at + k * RP + v * W);
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) {
          const float s = xr[i][k];
          for (int v = 0; v < NV; ++v) acc[i][v] += s * a[v];
        }
      }
      float xs[MR][RP];
      for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) storev<W>(xs[i] + v * W, acc[i][v]);
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < r; ++j) xa[(m0 + i) * r + j] = static_cast<T>(xs[i][j]);
      if constexpr (UP) {
        // Two vectors of n per step: MR broadcasts and 2 loads feed 2 MR FMAs.
        constexpr int64_t NB = 2 * kLanes;
        const int64_t n_main = N - N % NB;
        for (int64_t n = 0; n < n_main; n += NB) {
          vec16 out[MR][2];
          const vec16 b0 = bias ? load16(bias + n) : vec16{};
          const vec16 b1 = bias ? load16(bias + n + kLanes) : vec16{};
          for (int i = 0; i < MR; ++i) {
            out[i][0] = b0;
            out[i][1] = b1;
          }
          for (int64_t j = 0; j < r; ++j) {
            const vec16 w0 = load16(bst + j * bst_ld + n), w1 = load16(bst + j * bst_ld + n + kLanes);
#pragma GCC unroll 8
            for (int i = 0; i < MR; ++i) {
              const float s = xs[i][j];
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
              float tmp[NB];
              store16(tmp, out[i][0]);
              store16(tmp + kLanes, out[i][1]);
              for (int64_t l = 0; l < NB; ++l) yr[l] = static_cast<T>(tmp[l]);
            }
          }
        }
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t n = n_main; n < N; ++n) {
            float v = bias ? bias[n] : 0.f;
            for (int64_t j = 0; j < r; ++j) v += xs[i][j] * bst[j * bst_ld + n];
            y[(m0 + i) * N + n] = static_cast<T>(v);
          }
      }
    }
  });
}

// For each block of MR rows of chunk c, with the rank-r rows padded to W NV floats:
//   gyb[m, :] = sum_n gy[m, n] b[n, :]                       (kept in registers, then stored)
//   db_partial[c, n, :] += sum_m gy[m, n] xa[m, :]           (WANT_DB; while gy's rows are read)
//   da_partial[c, k, :] += sum_m drop(x)[m, k] gyb[m, :]     (WANT_DA; gyb still in registers)
// gy and x are each read once; the partials ([N, W NV] and [K, W NV] floats) stay in L2.
template <typename T, int W, int NV, bool WANT_DB, bool WANT_DA, bool DROP>
void backward_kernel(const T* gy, const float* b, const float* xa, const T* x, float* gyb, float* db_partial,
                     float* da_partial, int64_t M, int64_t N, int64_t K, int64_t chunks, DropoutKey key,
                     float drop_scale) {
  constexpr int MR = kUpRows<NV>;
  constexpr int64_t RP = NV * W;
  using vec = typename Vec<W>::type;
  constexpr bool kGyInPlace = std::is_same_v<T, float>;
  constexpr bool kXInPlace = std::is_same_v<T, float> && !DROP;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    const int64_t width = std::max(N, K) + kLanes;  // row stride of converted rows (see down_kernel)
    std::vector<float> buf(static_cast<size_t>((MR + 1) * width), 0.f);
    const float* zero_row = buf.data() + MR * width;
    const DropoutKey no_mask(0, 0.0);
    for (int64_t c = c0; c < c1; ++c) {
      float* db = WANT_DB ? db_partial + c * N * RP : nullptr;
      float* da = WANT_DA ? da_partial + c * K * RP : nullptr;
      const int64_t end = (c + 1) * M / chunks;
      for (int64_t m0 = c * M / chunks; m0 < end; m0 += MR) {
        const int64_t rows = std::min<int64_t>(MR, end - m0);
        const float* row[MR];
        float_rows<MR, kGyInPlace, false>(gy, m0, rows, N, buf.data(), width, zero_row, no_mask, 1.f, row);
        vec xr[MR][NV] = {};
        if constexpr (WANT_DB)
          for (int64_t i = 0; i < rows; ++i)
            for (int v = 0; v < NV; ++v) xr[i][v] = loadv<W>(xa + (m0 + i) * RP + v * W);
        vec acc[MR][NV] = {};
        for (int64_t n = 0; n < N; ++n) {
          vec bv[NV], dv[NV];
          for (int v = 0; v < NV; ++v) {
            bv[v] = loadv<W>(b + n * RP + v * W);
            if constexpr (WANT_DB) dv[v] = loadv<W>(db + n * RP + v * W);
          }
#pragma GCC unroll 8
          for (int i = 0; i < MR; ++i) {
            const float s = row[i][n];
            for (int v = 0; v < NV; ++v) {
              acc[i][v] += s * bv[v];
              if constexpr (WANT_DB) dv[v] += s * xr[i][v];
            }
          }
          if constexpr (WANT_DB)
            for (int v = 0; v < NV; ++v) storev<W>(db + n * RP + v * W, dv[v]);
        }
        for (int64_t i = 0; i < rows; ++i)
          for (int v = 0; v < NV; ++v) storev<W>(gyb + (m0 + i) * RP + v * W, acc[i][v]);
        if constexpr (WANT_DA) {
          float_rows<MR, kXInPlace, DROP>(x, m0, rows, K, buf.data(), width, zero_row, key, drop_scale, row);
          for (int64_t k = 0; k < K; ++k) {
            vec av[NV];
            for (int v = 0; v < NV; ++v) av[v] = loadv<W>(da + k * RP + v * W);
#pragma GCC unroll 8
            for (int i = 0; i < MR; ++i) {
              const float s = row[i][k];
              for (int v = 0; v < NV; ++v) av[v] += s * acc[i][v];
            }
            for (int v = 0; v < NV; ++v) storev<W>(da + k * RP + v * W, av[v]);
          }
        }
      }
    }
  });
}

int64_t padded_rank(int64_t r) { return r <= 8 ? 8 : kLanes * ((r + kLanes - 1) / kLanes <= 2 ? (r + kLanes - 1) / kLanes : 4); }

// The small operands are re-laid out by plain loops: torch's copy of a transposed [r, K] view costs
// ~35 us a call here, as much as the kernel on a 64-row input.
//
// out[i * out_row + j * out_col] = scale * round_T(src[i, j]) as float32, src [rows, cols] of dtype T
// or float32 (rounded to T's precision, as the reference multiplies in x's dtype); out is zeroed
// first, so padding stays zero.
template <typename T, typename S>
void relayout_from(const S* __restrict__ src, float* __restrict__ out, const int64_t rows, const int64_t cols,
                   const int64_t out_row, const int64_t out_col, const float scale) {
  // 16 x 16 tiles: a transposing walk would otherwise load or store 4 KB apart (a [16, 1024]
  // operand), and every one of those accesses lands in the same L1 set.
  constexpr int64_t kTile = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
    const int64_t i1 = std::min(rows, i0 + kTile);
    for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
      const int64_t j1 = std::min(cols, j0 + kTile);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j)
          out[i * out_row + j * out_col] = scale * static_cast<float>(static_cast<T>(src[i * cols + j]));
    }
  }
}

template <typename T>
void relayout(const Tensor& src, float* out, int64_t out_size, int64_t out_row, int64_t out_col, float scale = 1.f) {
  std::fill(out, out + out_size, 0.f);
  const Tensor c = src.contiguous();
  const int64_t rows = c.size(0), cols = c.dim() > 1 ? c.size(1) : 1;
  if (c.scalar_type() == at::kFloat) relayout_from<T>(c.data_ptr<float>(), out, rows, cols, out_row, out_col, scale);
  else relayout_from<T>(c.data_ptr<T>(), out, rows, cols, out_row, out_col, scale);
}

template <typename F>
void bool_dispatch(bool v, F&& f) {
  if (v) f(std::true_type{});
  else f(std::false_type{});
}

// f(W, NV) with the rank padded to W NV floats: (8, 1) for r <= 8, (16, 1) to 16, (16, 2) to 32,
// (16, 4) to 64.
template <typename F>
void rank_dispatch(int64_t r, F&& f) {
  TORCH_CHECK(r >= 1 && r <= kMaxKernelRank, "fastpeft_cpp: internal: rank ", r, " is outside the low-rank kernels' "
              "range [1, ", kMaxKernelRank, "]");
  if (r <= 8) f(std::integral_constant<int, 8>{}, std::integral_constant<int, 1>{});
  else if (r <= kLanes) f(std::integral_constant<int, 16>{}, std::integral_constant<int, 1>{});
  else if (r <= 2 * kLanes) f(std::integral_constant<int, 16>{}, std::integral_constant<int, 2>{});
  else f(std::integral_constant<int, 16>{}, std::integral_constant<int, 4>{});
}

}  // namespace

Tensor lowrank_down(const Tensor& x, const Tensor& lora_A, double p, int64_t seed) {
  const int64_t M = x.size(0), K = x.size(1), r = lora_A.size(0);
  const auto dt = x.scalar_type();
  // A in x's precision (what the reference multiplies by), as float32 [K, r padded].
  const int64_t rp = padded_rank(r);
  Tensor at_padded = at::empty({K, rp}, x.options().dtype(at::kFloat));
  Tensor xa = at::empty({M, r}, x.options());
  Tensor xc = x.contiguous();
  const DropoutKey key(seed, p);
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  FASTPEFT_DISPATCH(dt, "lowrank_down", [&] {
    relayout<scalar_t>(lora_A, at_padded.data_ptr<float>(), K * rp, 1, rp);  // A^T, zero-padded
    rank_dispatch(r, [&](auto Wc, auto NV) {
      if (p > 0.0)
        down_kernel<scalar_t, decltype(Wc)::value, decltype(NV)::value, true, false>(
            xc.data_ptr<scalar_t>(), at_padded.data_ptr<float>(), xa.data_ptr<scalar_t>(), M, K, r, key, scale);
      else
        down_kernel<scalar_t, decltype(Wc)::value, decltype(NV)::value, false, false>(
            xc.data_ptr<scalar_t>(), at_padded.data_ptr<float>(), xa.data_ptr<scalar_t>(), M, K, r, key, 1.f);
    });
  });
  return xa;
}

std::pair<Tensor, Tensor> lowrank_forward(const Tensor& x, const Tensor& lora_A, const Tensor& lora_B,
                                          const OptTensor& bias, double scale, double p, int64_t seed) {
  const int64_t M = x.size(0), K = x.size(1), r = lora_A.size(0), N = lora_B.size(0);
  const auto dt = x.scalar_type();
  const int64_t rp = padded_rank(r);
  const auto f32 = x.options().dtype(at::kFloat);
  // A^T [K, rp] zero-padded, scale * B^T [r, N] and the bias [N], all float32 in x's precision.
  // bst's rows are N + 16 floats apart: at N = 1024 a 4 KB stride puts the r rows the kernel reads
  // together (and the transposing stores that fill them) in one L1 set.
  const int64_t bst_ld = N + kLanes;
  Tensor at_padded = at::empty({K, rp}, f32), bst = at::empty({r, bst_ld}, f32);
  Tensor bias_f = present(bias) ? at::empty({N}, f32) : Tensor();
  Tensor xa = at::empty({M, r}, x.options());
  Tensor y = at::empty({M, N}, x.options());
  Tensor xc = x.contiguous();
  const DropoutKey key(seed, p);
  FASTPEFT_DISPATCH(dt, "lowrank_forward", [&] {
    relayout<scalar_t>(lora_A, at_padded.data_ptr<float>(), K * rp, 1, rp);
    relayout<scalar_t>(lora_B, bst.data_ptr<float>(), r * bst_ld, 1, bst_ld, static_cast<float>(scale));
    if (present(bias)) relayout<scalar_t>(*bias, bias_f.data_ptr<float>(), N, 1, 0);
    rank_dispatch(r, [&](auto Wc, auto NV) {
      bool_dispatch(p > 0.0, [&](auto DROP) {
        down_kernel<scalar_t, decltype(Wc)::value, decltype(NV)::value, decltype(DROP)::value, true>(
            xc.data_ptr<scalar_t>(), at_padded.data_ptr<float>(), xa.data_ptr<scalar_t>(), M, K, r, key,
            static_cast<float>(1.0 / (1.0 - p)), bst.data_ptr<float>(), bst_ld,
            present(bias) ? bias_f.data_ptr<float>() : nullptr, y.data_ptr<scalar_t>(), N);
      });
    });
  });
  return {y, xa};
}

LowRankGrads lowrank_backward(const Tensor& grad_y, const Tensor& lora_B, const Tensor& xa, const Tensor& x,
                              double scale, double p, int64_t seed, bool want_dB, bool want_dA) {
  const int64_t M = grad_y.size(0), N = grad_y.size(1), r = lora_B.size(1);
  const int64_t K = want_dA ? x.size(1) : 0;
  const auto dt = grad_y.scalar_type();
  const int64_t rp = padded_rank(r);
  const auto f32 = grad_y.options().dtype(at::kFloat);
  Tensor gy = grad_y.contiguous();
  Tensor xc = want_dA ? x.contiguous() : Tensor();
  Tensor b_padded = at::empty({N, rp}, f32);
  Tensor xa_padded = want_dB ? at::empty({M, rp}, f32) : Tensor();
  Tensor gyb = at::empty({M, rp}, f32);
  const int64_t chunks = reduction_chunks(M);
  Tensor db_partial = want_dB ? at::zeros({chunks, N, rp}, f32) : Tensor();
  Tensor da_partial = want_dA ? at::zeros({chunks, K, rp}, f32) : Tensor();
  const DropoutKey key(seed, p);
  const float drop_scale = static_cast<float>(1.0 / (1.0 - p));
  FASTPEFT_DISPATCH(dt, "lowrank_backward", [&] {
    relayout<scalar_t>(lora_B, b_padded.data_ptr<float>(), N * rp, rp, 1);
    if (want_dB) relayout<scalar_t>(xa, xa_padded.data_ptr<float>(), M * rp, rp, 1);
    rank_dispatch(r, [&](auto Wc, auto NV) {
      bool_dispatch(want_dB, [&](auto DB) {
        bool_dispatch(want_dA, [&](auto DA) {
          bool_dispatch(want_dA && p > 0.0, [&](auto DROP) {
            backward_kernel<scalar_t, decltype(Wc)::value, decltype(NV)::value, decltype(DB)::value, decltype(DA)::value,
                            decltype(DROP)::value>(
                gy.data_ptr<scalar_t>(), b_padded.data_ptr<float>(), want_dB ? xa_padded.data_ptr<float>() : nullptr,
                want_dA ? xc.data_ptr<scalar_t>() : nullptr, gyb.data_ptr<float>(),
                want_dB ? db_partial.data_ptr<float>() : nullptr, want_dA ? da_partial.data_ptr<float>() : nullptr, M,
                N, K, chunks, key, drop_scale);
          });
        });
      });
    });
  });
  LowRankGrads out;
  out.gyb = gyb.narrow(1, 0, r);
  // Chunk partials summed in a fixed order; both gradients carry the LoRA scale.
  auto reduce = [&](const Tensor& partial, int64_t rows, int64_t out_row, int64_t out_col, Tensor& out) {
    const float* src = partial.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    const float s = static_cast<float>(scale);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < r; ++j) {
        float v = 0.f;
        for (int64_t c = 0; c < chunks; ++c) v += src[(c * rows + i) * rp + j];
        dst[i * out_row + j * out_col] = s * v;
      }
  };
  if (want_dB) {
    out.dB = at::empty({N, r}, f32);
    reduce(db_partial, N, r, 1, out.dB);  // [N, r]
  }
  if (want_dA) {
    out.dA = at::empty({r, K}, f32);
    reduce(da_partial, K, 1, K, out.dA);  // [r, K]: transposed from the partials' [K, rp]
  }
  return out;
}

// ---- standalone ops (torch.ops.fastpeft_cpp.lowrank_*): the kernels above, checked, for tests and benches

namespace {

void check_lowrank_operand(const Tensor& t, const Tensor& x, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, "fastpeft_cpp: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, "fastpeft_cpp: ", name,
              " must have x's dtype (", x.scalar_type(), ") or float32, got ", t.scalar_type());
  check_cpu(t, name);
}

void check_rank(int64_t r) {
  TORCH_CHECK(r >= 1 && r <= kMaxKernelRank, "fastpeft_cpp: the low-rank kernels take ranks 1..", kMaxKernelRank,
              ", got r = ", r);
}

void check_dropout(double p, int64_t seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fastpeft_cpp: p must be in [0, 1), got ", p);
  TORCH_CHECK(seed >= 0, "fastpeft_cpp: seed must be in [0, 2**63), got ", seed);
}

}  // namespace

std::tuple<Tensor, Tensor> lowrank_forward_op(const Tensor& x, const Tensor& lora_A, const Tensor& lora_B,
                                              const OptTensor& bias, double scale, double p, int64_t seed) {
  TORCH_CHECK(x.dim() == 2, "fastpeft_cpp: x must be 2-D [M, K], got shape ", x.sizes());
  check_compute_dtype(x, "x");
  check_cpu(x, "x");
  TORCH_CHECK(lora_A.dim() == 2 && lora_B.dim() == 2, "fastpeft_cpp: lora_A [r, K] and lora_B [N, r] must be 2-D");
  const int64_t r = lora_A.size(0), N = lora_B.size(0);
  check_rank(r);
  check_lowrank_operand(lora_A, x, "lora_A", {r, x.size(1)});
  check_lowrank_operand(lora_B, x, "lora_B", {N, r});
  if (present(bias)) check_lowrank_operand(*bias, x, "bias", {N});
  check_dropout(p, seed);
  auto [y, xa] = lowrank_forward(x, lora_A, lora_B, bias, scale, p, seed);
  return {y, xa};
}

std::tuple<Tensor, Tensor, Tensor> lowrank_backward_op(const Tensor& grad_y, const Tensor& lora_B, const OptTensor& xa,
                                                       const OptTensor& x, double scale, double p, int64_t seed) {
  TORCH_CHECK(grad_y.dim() == 2, "fastpeft_cpp: grad_y must be 2-D [M, N], got shape ", grad_y.sizes());
  check_compute_dtype(grad_y, "grad_y");
  check_cpu(grad_y, "grad_y");
  TORCH_CHECK(lora_B.dim() == 2, "fastpeft_cpp: lora_B must be 2-D [N, r], got shape ", lora_B.sizes());
  const int64_t M = grad_y.size(0), r = lora_B.size(1);
  check_rank(r);
  check_lowrank_operand(lora_B, grad_y, "lora_B", {grad_y.size(1), r});
  if (present(xa)) {
    TORCH_CHECK(xa->scalar_type() == grad_y.scalar_type(), "fastpeft_cpp: xa must have grad_y's dtype");
    check_lowrank_operand(*xa, grad_y, "xa", {M, r});
  }
  if (present(x)) {
    TORCH_CHECK(x->dim() == 2 && x->size(0) == M && x->scalar_type() == grad_y.scalar_type(),
                "fastpeft_cpp: x must be [", M, ", K] in grad_y's dtype, got ", x->scalar_type(), " ", x->sizes());
    check_cpu(*x, "x");
  }
  check_dropout(p, seed);
  LowRankGrads g = lowrank_backward(grad_y, lora_B, present(xa) ? *xa : Tensor(), present(x) ? *x : Tensor(), scale,
                                    p, seed, present(xa), present(x));
  auto empty = grad_y.new_empty({0}, grad_y.options().dtype(at::kFloat));
  return {g.gyb.contiguous(), g.dB.defined() ? g.dB : empty, g.dA.defined() ? g.dA : empty};
}

}  // namespace fastpeft
