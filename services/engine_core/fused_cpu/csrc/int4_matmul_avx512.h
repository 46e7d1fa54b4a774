// int4_matmul.h's kernel on AVX-512 (32 zmm registers; AVX512BW for the byte and word ops).
//
// Per 64-byte line (16 columns x 8 inputs, int4_layout.h): an and and a shift + and give the low
// and high nibbles, each lane 4 inputs' q (0..15, unsigned bytes); per row the 4 int8 activations
// of those inputs broadcast to every lane; one 4-way u8 x s8 dot product per nibble half into the
// row's int32 sums: AVX512-VNNI's vpdpbusd (64 multiply-adds an instruction, against an fp32
// fma's 16), or, on an AVX-512 CPU without VNNI (Skylake-X), vpmaddubsw (u8 x s8 -> s16 pairs:
// at most 2 * 15 * 127 = 3810, never saturating) then vpmaddwd by ones (-> s32): the same
// integers. A unit is kVectors vectors (64 columns) for every row, in blocks of at most kRows
// rows whose kRows x kVectors accumulators stay in registers over all of K; each group's int32
// sums go through int4_matmul.h's epilogue (the same fp32 ops, in the same order, for every row).
// Plan (R3J4: 3 rows, 4 vectors, hi nibble by shift, bf16 scales, no prefetch): the best, or
// within noise of it, at every row count of a 12-plan x 4-variant x 2-prefetch grid on a Zen 4
// (benchmarks/int8_activations/README.md); no choice in it changes a bit.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "int4_layout.h"
#include "quantize_rows.h"

namespace novainfer {

constexpr int64_t kInt4Rows = 3, kInt4Vectors = 4;

struct Int4Plan {};

inline Int4Plan int4_plan(int64_t) { return {}; }

inline int64_t int4_units(const Int4Plan&, int64_t vectors) { return (vectors + kInt4Vectors - 1) / kInt4Vectors; }

inline __m512 int4_load_bf16(const bf16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// sums + the 4-way dot products of q's bytes (unsigned, 0..15) and x's (signed) per 32-bit lane.
inline __m512i int4_dot4(__m512i sums, __m512i q, __m512i x) {
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(sums, q, x);
#else
  return _mm512_add_epi32(sums, _mm512_madd_epi16(_mm512_maddubs_epi16(q, x), _mm512_set1_epi16(1)));
#endif
}

inline __m512i int4_broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// R rows (from m0) times J vectors (from v0) over all of K.
template <int R, int J>
void int4_rows(const QuantizedRows& x, int64_t m0, int64_t K, const uint8_t* packed, const bf16* sz, int64_t N,
               int64_t v0, bf16* out) {
  const int64_t G = K / kInt4Group, chunks = K / kInt4Chunk;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
  const int8_t* xq = x.q.data() + m0 * K;
  for (int64_t g = 0; g < G; ++g) {
    __m512i dot[R][J];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < J; ++j) dot[r][j] = _mm512_setzero_si512();
    for (int64_t c = g * (kInt4Group / kInt4Chunk); c < (g + 1) * (kInt4Group / kInt4Chunk); ++c) {
      __m512i lo[J], hi[J];
      for (int j = 0; j < J; ++j) {
        const __m512i raw = _mm512_loadu_si512(packed + ((v0 + j) * chunks + c) * 64);
        lo[j] = _mm512_and_si512(raw, low4);
        hi[j] = _mm512_and_si512(_mm512_srli_epi32(raw, 4), low4);
      }
      for (int r = 0; r < R; ++r) {
        const __m512i xl = int4_broadcast4(xq + r * K + kInt4Chunk * c);
        const __m512i xh = int4_broadcast4(xq + r * K + kInt4Chunk * c + 4);
        for (int j = 0; j < J; ++j) dot[r][j] = int4_dot4(int4_dot4(dot[r][j], lo[j], xl), hi[j], xh);
      }
    }
    __m512 s[J], z[J];
    for (int j = 0; j < J; ++j) {
      const int64_t col = kInt4Vector * (v0 + j);
      s[j] = int4_load_bf16(sz + (2 * g) * N + col);
      z[j] = int4_load_bf16(sz + (2 * g + 1) * N + col);
    }
    // int4_matmul.h's epilogue: u = fma(dot, d, c); acc = fma(u, s, acc); acc = fma(z, sx, acc).
    for (int r = 0; r < R; ++r) {
      const int64_t i = (m0 + r) * G + g;
      const __m512 d = _mm512_set1_ps(x.d[i]), c = _mm512_set1_ps(x.c[i]), sx = _mm512_set1_ps(x.s[i]);
      for (int j = 0; j < J; ++j) {
        const __m512 u = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][j]), d, c);  // |dot| < 2^24: exact
        acc[r][j] = _mm512_fmadd_ps(u, s[j], acc[r][j]);
        acc[r][j] = _mm512_fmadd_ps(z[j], sx, acc[r][j]);
      }
    }
  }
  alignas(64) float tmp[kInt4Vector * J];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < J; ++j) _mm512_store_ps(tmp + kInt4Vector * j, acc[r][j]);
    bf16* o = out + (m0 + r) * N + kInt4Vector * v0;
    for (int64_t c = 0; c < kInt4Vector * J; ++c) o[c] = bf16(tmp[c]);
  }
}

// int4_rows<m, J> for a run-time m in 1..R.
template <int R, int J>
void int4_rows_upto(const QuantizedRows& x, int64_t m0, int64_t m, int64_t K, const uint8_t* packed, const bf16* sz,
                    int64_t N, int64_t v0, bf16* out) {
  if constexpr (R > 0) {
    if (m == R) return int4_rows<R, J>(x, m0, K, packed, sz, N, v0, out);
    int4_rows_upto<R - 1, J>(x, m0, m, K, packed, sz, N, v0, out);
  }
}

// All M rows times unit u's vectors, in blocks of at most kInt4Rows rows of equal sizes.
inline void int4_unit(const Int4Plan&, const QuantizedRows& x, int64_t M, int64_t K, const uint8_t* packed,
                      const bf16* sz, int64_t N, int64_t u, bf16* out) {
  const int64_t vectors = N / kInt4Vector, v0 = u * kInt4Vectors;
  const int64_t blocks = (M + kInt4Rows - 1) / kInt4Rows;
  for (int64_t b = 0, m0 = 0; b < blocks; ++b) {
    const int64_t m1 = M * (b + 1) / blocks;
    if (v0 + kInt4Vectors <= vectors) {
      int4_rows_upto<kInt4Rows, kInt4Vectors>(x, m0, m1 - m0, K, packed, sz, N, v0, out);
    } else {
      // The last unit of a matrix whose vectors are not a multiple of kInt4Vectors: one at a time.
      for (int64_t v = v0; v < vectors; ++v) int4_rows_upto<kInt4Rows, 1>(x, m0, m1 - m0, K, packed, sz, N, v, out);
    }
    m0 = m1;
  }
}

}  // namespace novainfer
