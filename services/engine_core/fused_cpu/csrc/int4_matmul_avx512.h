// int4_matmul.h's kernel on AVX-512 (32 zmm registers of 16 floats).
//
// torch's _weight_int4pack_mm_for_cpu unpacks the weights again for every block of 4 rows, so a
// step verifying drafts pays for its weights once per 4 rows. Here each weight is dequantized
// once per call (fp32, exact: one fma) and multiplied into every row while it is in a register,
// so the extra rows of a verify step cost only their own fmas:
//   - up to kRowsJ4 rows: a thread takes a whole 64-column strip, all rows' accumulators (4 a
//     row) in registers over all of K;
//   - up to kRowsJ2 rows: a half strip (32 columns, 2 accumulators a row), so twice the rows fit
//     in registers (and the threads split N = 576 into 18 halves, not 9 strips);
//   - past that: a half strip is dequantized kTileK inputs at a time into an L1 tile that blocks
//     of rows then multiply, their accumulators stored and reloaded between tiles.
// A pass is port-bound: per 16 weights, 3-4 uops to dequantize and one fma per row, so a row
// costs ~1 fma per weight (benchmarks/int4_matmul_kernel.py).
//
// A strip's 64 columns are four vectors of 16: vector j is the low (j < 2) or high (j >= 2)
// nibbles of bytes 16 (j % 2) .. 16 (j % 2) + 15, so a half strip (vectors 0-1 or 2-3)
// dequantizes on its own.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "int4_layout.h"

namespace novainfer {

// Most rows a pass keeps in registers with J = 4 and 2 vectors a row (R J accumulators, J
// weights, the LUT and a broadcast; the compiler keeps J scales and zeros in the rest or reloads
// them once per group), and a tiled block's rows (R J + J + 1 <= 32 zmm).
constexpr int64_t kRowsJ4 = 6, kRowsJ2 = 12, kTileRows = 12;
// Inputs per tile: 128 x 32 fp32 = 16 KB, L1-resident.
constexpr int64_t kTileK = 4 * kInt4Group;

// How a call splits its work: a thread's unit is J of a strip's 4 vectors, for every row, all
// in registers or (tiled) through a dequantized tile.
struct Int4Plan {
  int J;
  bool tiled;
};

inline Int4Plan int4_plan(int64_t M) {
  if (M <= kRowsJ4) return {4, false};
  return {2, M > kRowsJ2};
}

inline int64_t int4_units(const Int4Plan& plan, int64_t blocks) { return blocks * (4 / plan.J); }

// (q - 8) for q = 0..15: vpermps picks by an index's low 4 bits, so the high nibble of a byte
// needs no mask.
inline __m512 int4_lut() {
  return _mm512_setr_ps(-8.f, -7.f, -6.f, -5.f, -4.f, -3.f, -2.f, -1.f, 0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
}

inline __m512 load_bf16_masked(const bf16* p, __mmask16 mask) {
  __m256i v = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// The scales and zeros of vectors j0 .. j0 + J - 1 of the strip at column c0, group g (0 past N).
template <int J>
struct GroupScales {
  __m512 s[J], z[J];

  GroupScales(const bf16* sz, int64_t N, int64_t g, int64_t c0, int j0) {
    for (int j = 0; j < J; ++j) {
      const int64_t c = c0 + 16 * (j0 + j);
      const __mmask16 mask = c >= N ? 0 : (N - c >= 16 ? 0xFFFF : __mmask16((1u << (N - c)) - 1));
      s[j] = load_bf16_masked(sz + (g * 2) * N + c, mask);
      z[j] = load_bf16_masked(sz + (g * 2 + 1) * N + c, mask);
    }
  }
};

// Vector j (compile-time: no branch in the loops) of input k's 64 weights (bytes: the strip's 32
// bytes of k): fma(q - 8, scale, zero). Vectors j and j + 2 load the same bytes (the compiler
// loads and widens them once where a pass takes both).
template <int j>
inline __m512 dequant_vec(const uint8_t* bytes, __m512 s, __m512 z, __m512 lut) {
  __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16 * (j & 1))));
  if constexpr (j >= 2) q = _mm512_srli_epi32(q, 4);
  return _mm512_fmadd_ps(_mm512_permutexvar_ps(q, lut), s, z);
}

// w[0:J] = vectors J0 .. J0 + J - 1 of input k's weights.
template <int J, int J0, int j = 0>
inline void dequant_slice(const uint8_t* bytes, const GroupScales<J>& gs, __m512 lut, __m512* w) {
  if constexpr (j < J) {
    w[j] = dequant_vec<J0 + j>(bytes, gs.s[j], gs.z[j], lut);
    dequant_slice<J, J0, j + 1>(bytes, gs, lut, w);
  }
}

// R rows times vectors J0 .. J0 + J - 1 of a strip (columns c0 + 16 J0 ..), straight from the
// packed weights: each weight is dequantized in a register once for all R rows, whose R x J
// accumulators stay in registers over all of K.
template <int R, int J, int J0>
void int4_rows_slice(const float* x, int64_t K, const uint8_t* packed, const bf16* sz, int64_t N, int64_t c0,
                     bf16* out, int64_t ldo) {
  const __m512 lut = int4_lut();
  __m512 acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / kInt4Group; ++g) {
    const GroupScales<J> gs(sz, N, g, c0, J0);
    for (int64_t k = g * kInt4Group; k < (g + 1) * kInt4Group; ++k) {
      _mm_prefetch(reinterpret_cast<const char*>(packed + (k + kPrefetchK) * 32), _MM_HINT_T0);
      __m512 w[J];
      dequant_slice<J, J0>(packed + k * 32, gs, lut, w);
      for (int r = 0; r < R; ++r) {
        const __m512 xv = _mm512_set1_ps(x[r * K + k]);
        for (int j = 0; j < J; ++j) acc[r][j] = _mm512_fmadd_ps(xv, w[j], acc[r][j]);
      }
    }
  }
  const int64_t first = c0 + 16 * J0;
  const int64_t ncols = std::clamp<int64_t>(N - first, 0, 16 * J);
  alignas(64) float tmp[16 * J];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < J; ++j) _mm512_store_ps(tmp + 16 * j, acc[r][j]);
    for (int64_t c = 0; c < ncols; ++c) out[r * ldo + first + c] = bf16(tmp[c]);
  }
}

// int4_rows_slice<m, J, J0> for a run-time m in 1..R.
template <int R, int J, int J0>
void int4_slice_rows(const float* x, int64_t K, const uint8_t* packed, const bf16* sz, int64_t N, int64_t c0,
                     bf16* out, int64_t m) {
  if constexpr (R > 0) {
    if (m == R) return int4_rows_slice<R, J, J0>(x, K, packed, sz, N, c0, out, N);
    int4_slice_rows<R - 1, J, J0>(x, K, packed, sz, N, c0, out, m);
  }
}

// The tiled path: inputs [k0, k1) of J vectors of a strip, dequantized into tile[k - k0][16 J].
template <int J, int J0>
void int4_dequant_tile(int64_t k0, int64_t k1, const uint8_t* packed, const bf16* sz, int64_t N, int64_t c0,
                       float* tile) {
  const __m512 lut = int4_lut();
  for (int64_t g = k0 / kInt4Group; g < k1 / kInt4Group; ++g) {
    const GroupScales<J> gs(sz, N, g, c0, J0);
    for (int64_t k = g * kInt4Group; k < (g + 1) * kInt4Group; ++k) {
      _mm_prefetch(reinterpret_cast<const char*>(packed + (k + kPrefetchK) * 32), _MM_HINT_T0);
      __m512 w[J];
      dequant_slice<J, J0>(packed + k * 32, gs, lut, w);
      for (int j = 0; j < J; ++j) _mm512_store_ps(tile + (k - k0) * 16 * J + 16 * j, w[j]);
    }
  }
}

// R rows times a tile of kk inputs, accumulating into acc [R, 16 J]: the same fmas, in the same
// order, as int4_rows_slice.
template <int R, int J>
void int4_rows_tile(const float* x, int64_t K, const float* tile, int64_t kk, float* acc_buf) {
  __m512 acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_loadu_ps(acc_buf + r * 16 * J + 16 * j);
  for (int64_t k = 0; k < kk; ++k) {
    __m512 w[J];
    for (int j = 0; j < J; ++j) w[j] = _mm512_load_ps(tile + k * 16 * J + 16 * j);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * K + k]);
      for (int j = 0; j < J; ++j) acc[r][j] = _mm512_fmadd_ps(xv, w[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) _mm512_storeu_ps(acc_buf + r * 16 * J + 16 * j, acc[r][j]);
}

template <int R, int J>
void int4_tile_rows(const float* x, int64_t K, const float* tile, int64_t kk, float* acc_buf, int64_t m) {
  if constexpr (R > 0) {
    if (m == R) return int4_rows_tile<R, J>(x, K, tile, kk, acc_buf);
    int4_tile_rows<R - 1, J>(x, K, tile, kk, acc_buf, m);
  }
}

// All M rows times vectors J0 .. J0 + J - 1 of a strip, tile by tile, in blocks of at most R rows.
template <int R, int J, int J0>
void int4_slice_tiled(const float* x, int64_t M, int64_t K, const uint8_t* packed, const bf16* sz, int64_t N,
                      int64_t c0, bf16* out) {
  // Per thread, reused across calls.
  alignas(64) thread_local float tile[kTileK * 16 * J];
  thread_local std::vector<float> acc;
  acc.assign(M * 16 * J, 0.f);
  // Blocks of equal size (13 rows: 7 + 6): a row's bits do not depend on its block.
  const int64_t blocks = (M + R - 1) / R;
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    const int64_t k1 = std::min(K, k0 + kTileK);
    int4_dequant_tile<J, J0>(k0, k1, packed, sz, N, c0, tile);
    for (int64_t blk = 0, m0 = 0; blk < blocks; ++blk) {
      const int64_t m1 = M * (blk + 1) / blocks;
      int4_tile_rows<R, J>(x + m0 * K + k0, K, tile, k1 - k0, acc.data() + m0 * 16 * J, m1 - m0);
      m0 = m1;
    }
  }
  const int64_t first = c0 + 16 * J0;
  const int64_t ncols = std::clamp<int64_t>(N - first, 0, 16 * J);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = 0; c < ncols; ++c) out[m * N + first + c] = bf16(acc[m * 16 * J + c]);
  }
}

inline void int4_unit(const Int4Plan& plan, const float* x, int64_t M, int64_t K, const uint8_t* packed,
                      const bf16* sz, int64_t N, int64_t unit, bf16* out) {
  const int64_t b = unit / (4 / plan.J), c0 = b * kInt4Block;
  const uint8_t* p = packed + b * K * 32;
  const bool high = plan.J == 2 && unit % 2 == 1;  // the half strip of vectors 2-3
  if (plan.J == 4) return int4_slice_rows<kRowsJ4, 4, 0>(x, K, p, sz, N, c0, out, M);
  if (plan.tiled) {
    if (high) return int4_slice_tiled<kTileRows, 2, 2>(x, M, K, p, sz, N, c0, out);
    return int4_slice_tiled<kTileRows, 2, 0>(x, M, K, p, sz, N, c0, out);
  }
  if (high) return int4_slice_rows<kRowsJ2, 2, 2>(x, K, p, sz, N, c0, out, M);
  int4_slice_rows<kRowsJ2, 2, 0>(x, K, p, sz, N, c0, out, M);
}

}  // namespace novainfer
