// The fused step's dense matmuls: bf16 rows times a layer's dense weights, bf16 out, in calls of a
// chosen row count (zero rows padding the call up to it).
//
// The weights are bf16 where the CPU multiplies bf16 natively (AVX512_BF16 or AMX: oneDNN's bf16
// matmul), else fp32: without native bf16 oneDNN emulates it, ~6x slower than MKL's sgemm (a 512 x
// 576 @ 576 x 3072 product: ~130 vs ~22 ms on a 2-core AVX2 EPYC). Then the rows are converted to
// fp32 (exact), multiplied by MKL and the product rounded to bf16 once, so the step keeps its bf16
// activations and its KV cache either way.
//
// The row count of a call is the caller's (decode.py probes which counts keep a row's bits its
// own): both libraries pick their kernels, and so their summation order, by the row count, and
// MKL on an AVX2 EPYC rounds calls of 1-3, 5-7 or 9 rows differently from calls of a multiple of 4.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace novainfer {

// dst [m, N] (bf16, may be a row range of a larger tensor) = x [m, K] (bf16) @ w.T, w [N, K] bf16
// or fp32, as one call of `rows` >= m rows (x and rows - m zero rows).
inline void dense_matmul_into(const at::Tensor& x, const at::Tensor& w, int64_t rows, at::Tensor dst) {
  const int64_t m = x.size(0);
  TORCH_CHECK(rows >= m, "a dense call has at least its rows");
  if (rows == m && w.scalar_type() == x.scalar_type()) {
    dst.copy_(at::linear(x, w));
    return;
  }
  at::Tensor in = x;
  if (rows != m) {
    in = at::zeros({rows, x.size(1)}, x.options().dtype(w.scalar_type()));
    in.narrow(0, 0, m).copy_(x);
  } else {
    in = x.to(w.scalar_type());
  }
  // copy_ rounds an fp32 product to bf16 as it stores it: one pass.
  dst.copy_(at::linear(in, w).narrow(0, 0, m));
}

inline at::Tensor dense_matmul(const at::Tensor& x, const at::Tensor& w, int64_t rows) {
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  dense_matmul_into(x, w, rows, out);
  return out;
}

// The row count of a call of m rows whose calls are padded to a multiple of `multiple` rows.
inline int64_t padded_rows(int64_t m, int64_t multiple) { return (m + multiple - 1) / multiple * multiple; }

}  // namespace novainfer
