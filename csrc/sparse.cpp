// Sparse-delta kernels: S is given by flat, sorted, unique indices into W [N, K] and their values.
//
// Sorted indices mean row n of S is the contiguous slice rowptr[n]:rowptr[n+1] (CSR without
// copying).  Every kernel works on blocks of MB rows of the dense operand transposed into a
// thread-local [cols, MB] float buffer, so the inner loop over one nonzero is an MB-wide
// vector FMA instead of a gather per row of x.  Nothing of size N x K is ever formed.
#include "sparse.h"

#include "checks.h"

#include <algorithm>
#include <atomic>
#include <vector>

namespace fastpeft {

namespace {

// Rows of the dense operand per block: one 16-float vector per nonzero.
constexpr int64_t MB = 16;
// Rows per chunk of the SDDMM: the chunk's transposed operands stay in L2.
constexpr int64_t MC = 64;

// dst[c * ld + i] = src[(m0 + i) * cols + c] * scale[c] for i < rows, zero for rows <= i < ld.
template <typename T>
void transpose_block(const T* src, int64_t m0, int64_t rows, int64_t cols, int64_t c0, int64_t c1,
                     const float* scale, float* dst, int64_t ld) {
  for (int64_t i = 0; i < ld; ++i) {
    if (i < rows) {
      const T* row = src + (m0 + i) * cols;
      if (scale != nullptr) {
        for (int64_t c = c0; c < c1; ++c) dst[c * ld + i] = to_float(row[c]) * scale[c];
      } else {
        for (int64_t c = c0; c < c1; ++c) dst[c * ld + i] = to_float(row[c]);
      }
    } else {
      for (int64_t c = c0; c < c1; ++c) dst[c * ld + i] = 0.f;
    }
  }
}

void check_index(const Tensor& index) {
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "sparse_index must be int64, got ",
                   py_dtype(index.scalar_type()));
  TORCH_CHECK_VALUE(index.dim() == 1, "sparse_index must be 1-D [nnz], got shape ", index.sizes());
  TORCH_CHECK_VALUE(index.device().is_cpu(), "sparse_index must be a CPU tensor, got one on ", index.device());
}

void check_values(const Tensor& value, const Tensor& index, const Tensor& like) {
  TORCH_CHECK(value.dim() == 1 && value.size(0) == index.size(0), "fastpeft_cpp: sparse_value must have shape [",
              index.size(0), "] like sparse_index, got ", value.sizes());
  TORCH_CHECK(value.scalar_type() == like.scalar_type() || value.scalar_type() == at::kFloat,
              "fastpeft_cpp: sparse_value must have the input's dtype (", like.scalar_type(),
              ") or float32, got ", value.scalar_type());
  TORCH_CHECK(value.device().is_cpu(), "fastpeft_cpp: sparse_value must be a CPU tensor, got one on ",
              value.device());
}

}  // namespace

void check_sparse_values(const Tensor& index_in, int64_t n, int64_t k) {
  Tensor index = index_in.contiguous();
  const int64_t nnz = index.numel();
  if (nnz == 0) return;
  const int64_t* idx = index.data_ptr<int64_t>();
  // One O(nnz) pass (per-chunk partials, combined in order): the range found, and whether any step
  // repeats or goes down.  Reported as fastpeft.core.validation.check_sparse_values does: range
  // first, then duplicates, then order.
  const int64_t grain = 1 << 14, chunks = (nnz + grain - 1) / grain;
  std::vector<int64_t> lo(chunks), hi(chunks);
  std::vector<char> dup(chunks, 0), down(chunks, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c * grain, e = std::min(nnz, b + grain);
      int64_t l = idx[b], h = idx[b];
      char d = 0, w = 0;
      for (int64_t j = b; j < e; ++j) {
        l = std::min(l, idx[j]);
        h = std::max(h, idx[j]);
        if (j > 0) {
          d |= idx[j] == idx[j - 1];
          w |= idx[j] < idx[j - 1];
        }
      }
      lo[c] = l, hi[c] = h, dup[c] = d, down[c] = w;
    }
  });
  const int64_t l = *std::min_element(lo.begin(), lo.end()), h = *std::max_element(hi.begin(), hi.end());
  TORCH_CHECK_VALUE(l >= 0 && h < n * k, "sparse_index values must be flat indices in [0, ", n * k, ") for a [", n,
                    ", ", k, "] weight, got range [", l, ", ", h, "]");
  TORCH_CHECK_VALUE(std::find(dup.begin(), dup.end(), 1) == dup.end(),
                    "sparse_index must hold unique indices; found duplicates");
  TORCH_CHECK_VALUE(std::find(down.begin(), down.end(), 1) == down.end(), "sparse_index must be sorted ascending");
}

Tensor build_row_pointers(const Tensor& index_in, int64_t n, int64_t k) {
  Tensor index = index_in.contiguous();
  const int64_t nnz = index.numel();
  const int64_t* idx = index.data_ptr<int64_t>();
  Tensor rowptr = at::empty({n + 1}, index.options());
  int64_t* rp = rowptr.data_ptr<int64_t>();
  at::parallel_for(0, n + 1, 256, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) rp[r] = std::lower_bound(idx, idx + nnz, r * k) - idx;
  });
  return rowptr;
}

Tensor sparse_row_pointers(const Tensor& index, int64_t n, int64_t k) {
  check_index(index);
  TORCH_CHECK_VALUE(n >= 0 && k >= 0, "sparse weight shape must be non-negative, got [", n, ", ", k, "]");
  // Out-of-range or unsorted indices would make the kernels read out of bounds.
  check_sparse_values(index, n, k);
  return build_row_pointers(index, n, k);
}

// out[m, n] += sum_{j in row n} value[j] * h[m, col_j]: the block's results go to a transposed
// [N, MB] buffer (one vector store per row of S) and are added to out row by row at the end, so
// out is never written with a stride of N.
template <typename T>
static void sparse_matmul_kernel(T* out, const T* h, int64_t M, int64_t N, int64_t K, const int64_t* idx,
                                 const float* val, const int64_t* rowptr) {
  const int64_t blocks = (M + MB - 1) / MB;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> ht(static_cast<size_t>(K * MB));
    std::vector<float> ot(static_cast<size_t>(N * MB));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * MB, rows = std::min(MB, M - m0);
      transpose_block(h, m0, rows, K, 0, K, nullptr, ht.data(), MB);
      for (int64_t n = 0; n < N; ++n) {
        // Four independent accumulators: one chain of dependent FMAs would be latency-bound.
        float acc[4][MB] = {};
        const int64_t base = n * K, j0 = rowptr[n], j1 = rowptr[n + 1];
        int64_t j = j0;
        for (; j + 4 <= j1; j += 4) {
          for (int u = 0; u < 4; ++u) {
            const float v = val[j + u];
            const float* hc = ht.data() + (idx[j + u] - base) * MB;
#pragma omp simd
            for (int64_t i = 0; i < MB; ++i) acc[u][i] += v * hc[i];
          }
        }
        for (; j < j1; ++j) {
          const float v = val[j];
          const float* hc = ht.data() + (idx[j] - base) * MB;
#pragma omp simd
          for (int64_t i = 0; i < MB; ++i) acc[0][i] += v * hc[i];
        }
        float* o = ot.data() + n * MB;
#pragma omp simd
        for (int64_t i = 0; i < MB; ++i) o[i] = (acc[0][i] + acc[1][i]) + (acc[2][i] + acc[3][i]);
      }
      for (int64_t i = 0; i < rows; ++i) {
        T* o = out + (m0 + i) * N;
        for (int64_t n = 0; n < N; ++n) o[n] = static_cast<T>(to_float(o[n]) + ot[n * MB + i]);
      }
    }
  });
}

// out[m, k] += sum_{n, j in row n, col_j = k} g[m, n] * value[j]: scatter into a transposed block.
template <typename T>
static void sparse_matmul_t_kernel(T* out, const T* g, int64_t M, int64_t N, int64_t K, const int64_t* idx,
                                   const float* val, const int64_t* rowptr) {
  const int64_t blocks = (M + MB - 1) / MB;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> gt(static_cast<size_t>(N * MB));
    std::vector<float> dt(static_cast<size_t>(K * MB));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * MB, rows = std::min(MB, M - m0);
      transpose_block(g, m0, rows, N, 0, N, nullptr, gt.data(), MB);
      std::fill(dt.begin(), dt.end(), 0.f);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t j0 = rowptr[n], j1 = rowptr[n + 1];
        const float* gn = gt.data() + n * MB;
        const int64_t base = n * K;
        for (int64_t j = j0; j < j1; ++j) {
          const float v = val[j];
          float* d = dt.data() + (idx[j] - base) * MB;
#pragma omp simd
          for (int64_t i = 0; i < MB; ++i) d[i] += v * gn[i];
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        T* o = out + (m0 + i) * K;
        for (int64_t c = 0; c < K; ++c) o[c] = static_cast<T>(to_float(o[c]) + dt[c * MB + i]);
      }
    }
  });
}

// out[j] += sum_{m in chunk} g[m, row_j] * h[m, col_j], chunk by chunk of MC rows: both operands
// of a chunk are transposed once (in parallel over columns), then every nonzero is an MC-long dot.
template <typename T>
static void sddmm_kernel(float* out, const T* g, const T* h, const float* scale, int64_t M, int64_t N, int64_t K,
                         const int64_t* idx, int64_t nnz) {
  std::vector<float> gt(static_cast<size_t>(N * MC));
  std::vector<float> ht(static_cast<size_t>(K * MC));
  for (int64_t m0 = 0; m0 < M; m0 += MC) {
    const int64_t rows = std::min(MC, M - m0);
    at::parallel_for(0, N + K, 256, [&](int64_t c0, int64_t c1) {
      // Columns [0, N) are g's, [N, N + K) are h's.
      if (c0 < N) transpose_block(g, m0, rows, N, c0, std::min(c1, N), nullptr, gt.data(), MC);
      if (c1 > N) transpose_block(h, m0, rows, K, std::max(c0, N) - N, c1 - N, scale, ht.data(), MC);
    });
    at::parallel_for(0, nnz, 1024, [&](int64_t j0, int64_t j1) {
      int64_t row = idx[j0] / K;
      for (int64_t j = j0; j < j1; ++j) {
        while (idx[j] >= (row + 1) * K) ++row;  // sorted: rows only advance
        const float* gr = gt.data() + row * MC;
        const float* hc = ht.data() + (idx[j] - row * K) * MC;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < MC; ++i) acc += gr[i] * hc[i];
        out[j] += acc;
      }
    });
  }
}

void sparse_matmul_add_(Tensor& out, const Tensor& h, const Tensor& index, const Tensor& value_f,
                        const Tensor& rowptr) {
  const int64_t M = h.size(0), K = h.size(1), N = out.size(1);
  Tensor idx = index.contiguous();
  FASTPEFT_DISPATCH(h.scalar_type(), "sparse_matmul", [&] {
    sparse_matmul_kernel<scalar_t>(out.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), M, N, K,
                                   idx.data_ptr<int64_t>(), value_f.data_ptr<float>(),
                                   rowptr.data_ptr<int64_t>());
  });
}

void sparse_matmul_t_add_(Tensor& out, const Tensor& g, const Tensor& index, const Tensor& value_f,
                          const Tensor& rowptr) {
  const int64_t M = g.size(0), N = g.size(1), K = out.size(1);
  Tensor idx = index.contiguous();
  FASTPEFT_DISPATCH(g.scalar_type(), "sparse_matmul_t", [&] {
    sparse_matmul_t_kernel<scalar_t>(out.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), M, N, K,
                                     idx.data_ptr<int64_t>(), value_f.data_ptr<float>(),
                                     rowptr.data_ptr<int64_t>());
  });
}

Tensor sddmm(const Tensor& g, const Tensor& h, const OptTensor& col_scale, const Tensor& index, int64_t n) {
  const int64_t M = g.size(0), N = g.size(1), K = h.size(1);
  TORCH_CHECK(N == n, "fastpeft_cpp: sddmm: grad has ", N, " columns, expected ", n);
  Tensor idx = index.contiguous();
  Tensor out = at::zeros({idx.numel()}, g.options().dtype(at::kFloat));
  if (idx.numel() == 0 || M == 0) return out;
  const float* scale = present(col_scale) ? col_scale->data_ptr<float>() : nullptr;
  FASTPEFT_DISPATCH(g.scalar_type(), "sddmm", [&] {
    sddmm_kernel<scalar_t>(out.data_ptr<float>(), g.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), scale, M, N, K,
                           idx.data_ptr<int64_t>(), idx.numel());
  });
  return out;
}

// ---- standalone ops ----------------------------------------------------------------------------

static void check_dense(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "fastpeft_cpp: ", name, " must be 2-D, got shape ", t.sizes());
  check_compute_dtype(t, name);
  check_cpu(t, name);
}

Tensor sparse_matmul_op(const Tensor& h_in, const Tensor& index, const Tensor& value, int64_t n) {
  check_dense(h_in, "h");
  check_index(index);
  check_values(value, index, h_in);
  Tensor h = h_in.contiguous();
  Tensor rowptr = sparse_row_pointers(index, n, h.size(1));
  Tensor out = at::zeros({h.size(0), n}, h.options());
  sparse_matmul_add_(out, h, index, as_float_in(value, h.scalar_type()), rowptr);
  return out;
}

Tensor sparse_matmul_t_op(const Tensor& g_in, const Tensor& index, const Tensor& value, int64_t k) {
  check_dense(g_in, "g");
  check_index(index);
  check_values(value, index, g_in);
  Tensor g = g_in.contiguous();
  Tensor rowptr = sparse_row_pointers(index, g.size(1), k);
  Tensor out = at::zeros({g.size(0), k}, g.options());
  sparse_matmul_t_add_(out, g, index, as_float_in(value, g.scalar_type()), rowptr);
  return out;
}

Tensor sddmm_op(const Tensor& g_in, const Tensor& h_in, const Tensor& index) {
  check_dense(g_in, "g");
  check_dense(h_in, "h");
  TORCH_CHECK(g_in.size(0) == h_in.size(0), "fastpeft_cpp: g and h must have the same number of rows, got ",
              g_in.size(0), " and ", h_in.size(0));
  TORCH_CHECK(g_in.scalar_type() == h_in.scalar_type(), "fastpeft_cpp: g and h must share a dtype, got ",
              g_in.scalar_type(), " and ", h_in.scalar_type());
  sparse_row_pointers(index, g_in.size(1), h_in.size(1));  // validates the index
  return sddmm(g_in.contiguous(), h_in.contiguous(), std::nullopt, index, g_in.size(1));
}

}  // namespace fastpeft
