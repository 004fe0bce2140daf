// Sparse delta S (flat sorted unique indices into the [N, K] weight + values) on CPU.
#pragma once

#include "common.h"

namespace fastpeft {

// ValueError (fastpeft.core.validation's messages) unless the int64 [nnz] CPU index holds sorted,
// unique flat indices in [0, n*k): out of range first (with the range found), then duplicates, then order.
void check_sparse_values(const Tensor& index, int64_t n, int64_t k);

// Validates the index (int64, 1-D, sorted, unique, in [0, n*k)) and returns CSR row pointers
// [n + 1]: the indices are sorted, so row r's entries are index[rowptr[r] : rowptr[r + 1]].
Tensor sparse_row_pointers(const Tensor& index, int64_t n, int64_t k);
// The same row pointers for an index check_sparse_values has passed (no second pass over it).
Tensor build_row_pointers(const Tensor& index, int64_t n, int64_t k);

// out[M, n] += h[M, k] @ S^T, S never formed densely.  value_f: float32 [nnz].
void sparse_matmul_add_(Tensor& out, const Tensor& h, const Tensor& index, const Tensor& value_f,
                        const Tensor& rowptr);

// out[M, k] += g[M, n] @ S.
void sparse_matmul_t_add_(Tensor& out, const Tensor& g, const Tensor& index, const Tensor& value_f,
                          const Tensor& rowptr);

// float32 [nnz]: out[j] = sum_m g[m, row_j] * (h[m, col_j] * col_scale[col_j]), the SDDMM that is the
// gradient of the sparse values; col_scale (float32 [k]) is optional (IA3 on the input).
Tensor sddmm(const Tensor& g, const Tensor& h, const OptTensor& col_scale, const Tensor& index, int64_t n);

// Standalone ops (torch.ops.fastpeft_cpp.*), each in the input's dtype.
Tensor sparse_matmul_op(const Tensor& h, const Tensor& index, const Tensor& value, int64_t n);
Tensor sparse_matmul_t_op(const Tensor& g, const Tensor& index, const Tensor& value, int64_t k);
Tensor sddmm_op(const Tensor& g, const Tensor& h, const Tensor& index);

}  // namespace fastpeft
