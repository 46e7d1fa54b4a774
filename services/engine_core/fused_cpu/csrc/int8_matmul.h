// Int8 weight-only matmul for the LM head on CPUs whose oneDNN int8 matmul is inexact (no VNNI:
// models/int8.py), row-invariant: out [M, N] fp32 = x [M, K] (bf16 or fp32) @ (q * scale).T, with q
// int8 [N, K] and scale fp32 [N], models/int8.py's values and scales as they are (no repack).
//
// torch's fallback, _weight_int8pack_mm, converts every weight to float per call (at one row it
// is bound by that, not by memory: 26 ms for SmolLM2's 49152 x 576 head on a 2-core AVX2 EPYC,
// where reading its 28 MB takes ~4). Here a weight is widened and converted once per block of
// rows whose accumulators stay in registers, and the rows of a verify step cost about their fmas.
//
// Every element is one fixed sequence of fp32 operations, whatever M, the row blocking, the
// instruction set or the thread count (threads split the columns, never K), so a row's bits are
// those it gets alone: a draft verified in a step gets its lone decode's logits. With
// K8 = K rounded down to a multiple of 8 and w = float(q[n, k]) (exact):
//   p[l] = fma(x[m, k], w, p[l]) for k = l, l + 8, l + 16, ... < K8, from p[l] = 0 (l = 0..7)
//   s = ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]))
//   s = fma(x[m, k], w, s) for k = K8 .. K - 1
//   out[m, n] = s * scale[n]
// Lanes along K rather than along N because the weights are the model's own [N, K] rows: eight
// consecutive inputs of a column are eight contiguous bytes, a unit of C columns is C * K
// contiguous bytes, and the head needs no second copy or start-up repack.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"
#include "lane_dot.h"

namespace novainfer {

// s continued over the inputs past K8, then scaled: the end of every path.
inline float int8_finish(float s, const float* x, const int8_t* q, int64_t K8, int64_t K, float scale) {
  for (int64_t k = K8; k < K; ++k) s = std::fma(x[k], float(q[k]), s);
  return s * scale;
}

#if defined(__AVX2__) && defined(__FMA__)

#define NOVAINFER_UNROLL _Pragma("GCC unroll 16")

// R rows (x: the first, [R, K]) times C columns (q: the first column's weights, [C, K]; scale and
// out at the first column; out's rows N apart).
template <int R, int C>
void int8_block(const float* x, int64_t K, const int8_t* q, const float* scale, int64_t N, float* out) {
  __m256 acc[R][C];
  NOVAINFER_UNROLL
  for (int r = 0; r < R; ++r) {
    NOVAINFER_UNROLL
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  }
  const int64_t K8 = K / kDotLanes * kDotLanes;
  // The next C columns' bytes (the next unit's, where this is a first row block), at the rate
  // these are read: a column's K bytes are too short a stream for the hardware prefetcher. One
  // row took 8.0 ms for SmolLM2's head without it, 2.7 with it (28 MB from DRAM, 1 thread).
  const char* next = reinterpret_cast<const char*>(q + C * K);
  for (int64_t k = 0; k < K8; k += kDotLanes) {
    _mm_prefetch(next + k * C, _MM_HINT_T0);
    NOVAINFER_UNROLL
    for (int c = 0; c < C; ++c) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + c * K + k));
      const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
      NOVAINFER_UNROLL
      for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + k), w, acc[r][c]);
    }
  }
  NOVAINFER_UNROLL
  for (int r = 0; r < R; ++r) {
    NOVAINFER_UNROLL
    for (int c = 0; c < C; ++c) {
      out[r * N + c] = int8_finish(lanes_hsum(acc[r][c]), x + r * K, q + c * K, K8, K, scale[c]);
    }
  }
}

#undef NOVAINFER_UNROLL

// int8_block<m, C> for a run-time m in 1..R.
template <int R, int C>
void int8_block_rows(const float* x, int64_t K, const int8_t* q, const float* scale, int64_t N, float* out,
                     int64_t m) {
  if constexpr (R > 0) {
    if (m == R) return int8_block<R, C>(x, K, q, scale, N, out);
    int8_block_rows<R - 1, C>(x, K, q, scale, N, out, m);
  }
}

// Every row times C columns from n0, in equal blocks of at most `rows` <= R rows.
template <int R, int C>
void int8_columns(const float* x, int64_t M, int64_t K, const int8_t* q, const float* scale, int64_t N, int64_t n0,
                  int64_t rows, float* out) {
  const int64_t blocks = (M + rows - 1) / rows;
  for (int64_t blk = 0, m0 = 0; blk < blocks; ++blk) {
    const int64_t m1 = M * (blk + 1) / blocks;
    int8_block_rows<R, C>(x + m0 * K, K, q + n0 * K, scale + n0, N, out + m0 * N + n0, m1 - m0);
    m0 = m1;
  }
}

// Columns [u * C, (u + 1) * C) of every row; a last, partial unit one column at a time.
inline void int8_unit(const LanePlan& plan, const float* x, int64_t M, int64_t K, const int8_t* q, const float* scale,
                      int64_t N, int64_t u, float* out) {
  const int64_t n0 = u * plan.C, ncols = std::min<int64_t>(plan.C, N - n0);
  if (ncols == plan.C && plan.C == 8) return int8_columns<1, 8>(x, M, K, q, scale, N, n0, plan.R, out);
  if (ncols == plan.C && plan.C == 4) return int8_columns<3, 4>(x, M, K, q, scale, N, n0, plan.R, out);
  if (ncols == plan.C && plan.C == 2) return int8_columns<6, 2>(x, M, K, q, scale, N, n0, plan.R, out);
  for (int64_t n = n0; n < n0 + ncols; ++n) int8_columns<6, 1>(x, M, K, q, scale, N, n, plan.R, out);
}

#else

// The portable path: the same operations, per element.
inline void int8_unit(const LanePlan& plan, const float* x, int64_t M, int64_t K, const int8_t* q, const float* scale,
                      int64_t N, int64_t u, float* out) {
  const int64_t K8 = K / kDotLanes * kDotLanes;
  for (int64_t n = u * plan.C; n < std::min<int64_t>(N, (u + 1) * plan.C); ++n) {
    for (int64_t m = 0; m < M; ++m) {
      float p[kDotLanes] = {};
      for (int64_t k = 0; k < K8; ++k) p[k % kDotLanes] = std::fma(x[m * K + k], float(q[n * K + k]), p[k % kDotLanes]);
      out[m * N + n] = int8_finish(lanes_reduce(p), x + m * K, q + n * K, K8, K, scale[n]);
    }
  }
}

#endif

// out [M, N] fp32 = x [M, K] (bf16 or fp32) @ (q * scale[:, None]).T, q int8 [N, K], scale fp32 [N].
inline at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "x must be a bf16 or fp32 CPU matrix [M, K]");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "q must be contiguous int8 [N, K]");
  TORCH_CHECK(scale.dim() == 1 && scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.size(0) == q.size(0),
              "scale must be contiguous fp32 [N]");
  TORCH_CHECK(x.size(1) == q.size(1), "x and q disagree on K");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return out;
  // x in fp32 once (exact from bf16), for every unit and the same values whichever thread reads them.
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x.contiguous() : x.contiguous().to(at::kFloat);
  const float* xp = xf.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const LanePlan plan = lane_plan(M);
  const int64_t units = (N + plan.C - 1) / plan.C;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) int8_unit(plan, xp, M, K, qp, sp, N, u, o);
  });
  return out;
}

}  // namespace novainfer
