// What the int8 LM head (int8_matmul.h) and the bf16 dense kernel (bf16_matmul.h) share: both
// compute every output as a dot product over K of one row and one weight column of the model's
// own [N, K] matrix in eight fp32 lanes along K, reduced in one fixed order, so a row's bits
// never depend on M, the row blocking, the instruction set or the thread count. One place for
// that order and for the blocking of rows and columns that both found best on AVX2.
#pragma once

#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace novainfer {

constexpr int64_t kDotLanes = 8;

// The fixed sum of the eight lanes (the AVX2 reduction below computes exactly this).
inline float lanes_reduce(const float* p) { return ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7])); }

#if defined(__AVX2__) && defined(__FMA__)

// A call's blocking: units of C columns (C * K contiguous weights), rows in equal blocks of at
// most R, each block's R x C accumulators in registers over all of K (a block after the first
// reads the unit's weights again, from L1: C * K weights, 1.2 KB for SmolLM2's int8 head at
// C = 2). Eight or more accumulators hide the fma latency (4 cycles, 2 pipes), and R x C <= 12
// leaves the 16 ymm registers room for a weight vector and a row's inputs: one row takes 8
// columns, 2-3 rows 4, more rows 2 in blocks of up to 6 (at 9 rows ~10-25 % faster than 3
// columns in blocks of 4, int8 head, 1 thread, 2-core AVX2 EPYC, shared). Also on AVX-512 CPUs:
// the same bits.
struct LanePlan {
  int C;
  int R;
};

inline LanePlan lane_plan(int64_t M) {
  if (M == 1) return {8, 1};
  if (M <= 3) return {4, 3};
  return {2, 6};
}

// p[0..7] of an accumulator reduced in lanes_reduce's order.
inline float lanes_hsum(__m256 a) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));  // p[i] + p[i + 4]
  const __m128 r = _mm_add_ps(q, _mm_movehl_ps(q, q));                                   // (q0 + q2), (q1 + q3)
  return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
}

#else

// The portable paths: the same operations per element, 16 columns a unit.
struct LanePlan {
  int C;
};

inline LanePlan lane_plan(int64_t) { return {16}; }

#endif

}  // namespace novainfer
