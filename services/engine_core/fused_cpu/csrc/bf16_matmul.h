// Dense matmul by bf16 weights on CPUs without native bf16 (no AVX512_BF16 or AMX), row-invariant:
// out [M, N] = x [M, K] (bf16 or fp32) @ w.T, w bf16 [N, K] (the model's own matrices, no repack),
// accumulated in fp32; out fp32 (the LM head's logits) or bf16 (a layer's product, rounded once).
//
// There the alternatives both lose: oneDNN emulates a bf16 matmul (~6x slower than MKL's sgemm),
// and MKL's sgemm on fp32 weights rounds calls of 1-3, 5-7 or 9 rows differently from calls of a
// multiple of 4 (AVX2 EPYC), so the fused step had to pad a decode row's calls to 4 rows, giving up
// MKL's GEMV, on twice the bytes: a float checkpoint's decode step cost ~1.6x the eager float32
// one. Here a decode row streams half the bytes (bf16 -> fp32 is an exact shift, done in the
// registers) and a verify step's rows cost about their fmas, every weight converted once per block
// of rows whose accumulators stay in registers.
//
// Every element is one fixed sequence of fp32 operations, whatever M, the row blocking, the
// instruction set or the thread count (threads split the columns, never K), so a row's bits are
// those it gets alone: a draft verified in a step gets its lone decode's bits. With K8 = K rounded
// down to a multiple of 8 and w = float(w[n, k]) (exact):
//   p[l] = fma(x[m, k], w, p[l]) for k = l, l + 8, l + 16, ... < K8, from p[l] = 0 (l = 0..7)
//   s = ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]))
//   s = fma(x[m, k], w, s) for k = K8 .. K - 1
//   out[m, n] = s (rounded to bf16 for a bf16 out)
// (int8_matmul.h's sequence without its scale: the same lanes along K, for the same reasons.)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"
#include "lane_dot.h"

namespace novainfer {

// float(b), exact: a bf16 is the top half of its fp32.
inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// s continued over the inputs past K8: the end of every path.
inline float bf16_finish(float s, const float* x, const uint16_t* w, int64_t K8, int64_t K) {
  for (int64_t k = K8; k < K; ++k) s = std::fma(x[k], bf16_bits_to_float(w[k]), s);
  return s;
}

inline void bf16_store(float* out, float v) { *out = v; }
inline void bf16_store(bf16* out, float v) { *out = bf16(v); }  // round to nearest even, as at::copy_

#if defined(__AVX2__) && defined(__FMA__)

// Eight bf16 weights as fp32: each widened to 32 bits and shifted into the top half.
inline __m256 bf16_load8(const uint16_t* w) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

#define NOVAINFER_UNROLL _Pragma("GCC unroll 16")

// R rows (x: the first, [R, K]) times C columns (w: the first column's weights, [C, K]; out at the
// first column, its rows N apart).
template <int R, int C, typename T>
void bf16_block(const float* x, int64_t K, const uint16_t* w, int64_t N, T* out) {
  __m256 acc[R][C];
  NOVAINFER_UNROLL
  for (int r = 0; r < R; ++r) {
    NOVAINFER_UNROLL
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  }
  const int64_t K8 = K / kDotLanes * kDotLanes;
  // The next C columns' weights (the next unit's, where this is a first row block), at the rate
  // these are read: a column's 2K bytes are too short a stream for the hardware prefetcher alone
  // (int8_matmul.h measured 8.0 vs 2.7 ms for a head read from DRAM at one row).
  const char* next = reinterpret_cast<const char*>(w + C * K);
  for (int64_t k = 0; k < K8; k += kDotLanes) {
    // 16 bytes of each of C columns per step: one 64-byte line every 4 steps for each column.
    if (k % 32 == 0) {
      NOVAINFER_UNROLL
      for (int c = 0; c < C; ++c) _mm_prefetch(next + 2 * (c * K + k), _MM_HINT_T0);
    }
    NOVAINFER_UNROLL
    for (int c = 0; c < C; ++c) {
      const __m256 wv = bf16_load8(w + c * K + k);
      NOVAINFER_UNROLL
      for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + k), wv, acc[r][c]);
    }
  }
  NOVAINFER_UNROLL
  for (int r = 0; r < R; ++r) {
    NOVAINFER_UNROLL
    for (int c = 0; c < C; ++c) bf16_store(out + r * N + c, bf16_finish(lanes_hsum(acc[r][c]), x + r * K, w + c * K, K8, K));
  }
}

#undef NOVAINFER_UNROLL

// bf16_block<m, C> for a run-time m in 1..R.
template <int R, int C, typename T>
void bf16_block_rows(const float* x, int64_t K, const uint16_t* w, int64_t N, T* out, int64_t m) {
  if constexpr (R > 0) {
    if (m == R) return bf16_block<R, C>(x, K, w, N, out);
    bf16_block_rows<R - 1, C>(x, K, w, N, out, m);
  }
}

// Every row times C columns from n0, in equal blocks of at most `rows` <= R rows.
template <int R, int C, typename T>
void bf16_columns(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, int64_t n0, int64_t rows,
                  T* out) {
  const int64_t blocks = (M + rows - 1) / rows;
  for (int64_t blk = 0, m0 = 0; blk < blocks; ++blk) {
    const int64_t m1 = M * (blk + 1) / blocks;
    bf16_block_rows<R, C>(x + m0 * K, K, w + n0 * K, N, out + m0 * N + n0, m1 - m0);
    m0 = m1;
  }
}

// Columns [u * C, (u + 1) * C) of every row; a last, partial unit one column at a time.
template <typename T>
void bf16_unit(const LanePlan& plan, const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, int64_t u,
               T* out) {
  const int64_t n0 = u * plan.C, ncols = std::min<int64_t>(plan.C, N - n0);
  if (ncols == plan.C && plan.C == 8) return bf16_columns<1, 8>(x, M, K, w, N, n0, plan.R, out);
  if (ncols == plan.C && plan.C == 4) return bf16_columns<3, 4>(x, M, K, w, N, n0, plan.R, out);
  if (ncols == plan.C && plan.C == 2) return bf16_columns<6, 2>(x, M, K, w, N, n0, plan.R, out);
  for (int64_t n = n0; n < n0 + ncols; ++n) bf16_columns<6, 1>(x, M, K, w, N, n, plan.R, out);
}

#else

// The portable path: the same operations, per element.
template <typename T>
void bf16_unit(const LanePlan& plan, const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, int64_t u,
               T* out) {
  const int64_t K8 = K / kDotLanes * kDotLanes;
  for (int64_t n = u * plan.C; n < std::min<int64_t>(N, (u + 1) * plan.C); ++n) {
    for (int64_t m = 0; m < M; ++m) {
      float p[kDotLanes] = {};
      for (int64_t k = 0; k < K8; ++k) {
        p[k % kDotLanes] = std::fma(x[m * K + k], bf16_bits_to_float(w[n * K + k]), p[k % kDotLanes]);
      }
      bf16_store(out + m * N + n, bf16_finish(lanes_reduce(p), x + m * K, w + n * K, K8, K));
    }
  }
}

#endif

// dst [M, N] (fp32 or bf16, rows of stride N: a row range of a larger tensor too) = x [M, K] (bf16
// or fp32) @ w.T, w bf16 [N, K].
inline void bf16_matmul_into(const at::Tensor& x, const at::Tensor& w, at::Tensor dst) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "x must be a bf16 or fp32 CPU matrix [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous(), "w must be contiguous bf16 [N, K]");
  TORCH_CHECK(x.size(1) == w.size(1), "x and w disagree on K");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(dst.dim() == 2 && dst.size(0) == M && dst.size(1) == N && dst.stride(1) == 1 && dst.stride(0) == N &&
                  (dst.scalar_type() == at::kFloat || dst.scalar_type() == at::kBFloat16),
              "dst must be [M, N] fp32 or bf16 with rows of stride N");
  if (M == 0 || N == 0) return;
  // x in fp32 once (exact from bf16), for every unit and the same values whichever thread reads them.
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x.contiguous() : x.contiguous().to(at::kFloat);
  const float* xp = xf.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const LanePlan plan = lane_plan(M);
  const int64_t units = (N + plan.C - 1) / plan.C;
  const bool to_bf16 = dst.scalar_type() == at::kBFloat16;
  float* of = to_bf16 ? nullptr : dst.data_ptr<float>();
  bf16* ob = to_bf16 ? bf16_data_mut(dst) : nullptr;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      if (to_bf16) {
        bf16_unit(plan, xp, M, K, wp, N, u, ob);
      } else {
        bf16_unit(plan, xp, M, K, wp, N, u, of);
      }
    }
  });
}

// out [M, N] fp32 = x [M, K] (bf16 or fp32) @ w.T, w bf16 [N, K].
inline at::Tensor bf16_matmul(const at::Tensor& x, const at::Tensor& w) {
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options().dtype(at::kFloat));
  bf16_matmul_into(x, w, out);
  return out;
}

}  // namespace novainfer
