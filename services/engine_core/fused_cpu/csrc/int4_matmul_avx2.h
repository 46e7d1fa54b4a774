// int4_matmul.h's kernel on AVX2 + FMA (16 ymm registers of 8 floats): the same layout, the same
// fmas in the same order, so the same bits as the AVX-512 and portable paths.
//
// A strip's 64 columns are eight vectors of 8: vector v < 4 is the low nibbles of bytes 8v ..
// 8v + 7 of an input's 32, v >= 4 the high nibbles of bytes 8 (v - 4) ..; vectors v and v + 4
// share their 8 bytes (a "chunk"), widened once for both. A unit, a thread's piece of work, is
// J / 2 chunks of a strip (J vectors) for every row:
//   - up to 10 rows: in row blocks of at most R whose R x J accumulators stay in registers over
//     all of K; a block after the first dequantizes the unit's weights again from L1/L2. A block
//     reads the bf16 scales and zeros itself, each group's converted as its loop reaches them
//     and prefetched ahead like the bytes (int4_block);
//   - past that: the unit is dequantized kTileK inputs at a time into an L1 tile that blocks of
//     up to kTileRows rows then multiply, their accumulators stored and reloaded between tiles;
//     its scales and zeros are converted to fp32 once per unit, out of the tile's loops.
//
// Why this blocking (benchmarks/int4_matmul_kernel.py on a 2-core Zen 3 EPYC): dequantizing 8
// weights takes ~4.5 vector ops besides their fmas (widen, half shared by the chunk's two
// vectors; mask or shift; subtract 8; convert; fma with the scale and zero), and each row one
// fma. One chunk (J = 2) a unit with up to 5 rows a block (10 accumulators, 2 weights, a
// broadcast, temporaries: the 16 registers) was the fastest from 2 rows on; wider units (J = 4,
// 8) fit fewer rows and were slower from 3 rows on, units of one vector (J = 1, 12 rows) slower
// throughout. A decode row (M = 1) takes half strips (J = 4): as fast as J = 2 with the weights
// in cache and as fast as whole strips from memory, and 18 units for N = 576 where two threads
// split 9 strips 5:4. The tile, with 6 rows a block, is as fast as registers alone at 11-14
// rows (one block fewer) and 13-25 % faster from 15 rows on, but 20 % slower at 6-10 (its
// blocks, which only multiply, cost as much as the register blocks that also dequantize: each
// accumulator's chain of fmas, one per input, bounds both). Converting a block's scales in its
// loop, rather than into an fp32 buffer before it, made 1 row 0.83x as long, 2-4 rows
// 0.93-0.97x (0.84-0.93x with the weights from memory, as in a decode step), 8-10 rows
// unchanged; prefetching the bytes 128 inputs ahead rather than 64 gained ~5 % from memory
// (session 9: the same benchmark, and a scratch harness over 30 layers' matrices).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "int4_layout.h"

namespace novainfer {

constexpr int kStripVectors = 8;

// A call's blocking: units of J vectors of a strip (J = 2 or 4), rows in equal blocks of at most
// `rows`.
struct Int4Plan {
  int J;
  int rows;
  bool tiled;
};

// Most rows a block keeps in registers for each J, and a tiled block's (R J accumulators, J
// weights and a broadcast: 15 of the 16 registers).
constexpr int kRowsJ4 = 1, kRowsJ2 = 5, kTileRows = 6;
// Inputs per tile: 256 x 16 fp32 = 16 KB, L1-resident.
constexpr int64_t kTileK = 8 * kInt4Group;
// A register block's prefetch distances: bytes 128 inputs (4 KB of a strip) ahead, scales and
// zeros two groups ahead (the tile's dequantization keeps int4_layout.h's kPrefetchK).
constexpr int64_t kBlockPrefetchK = 4 * kInt4Group, kPrefetchGroups = 2;

inline Int4Plan int4_plan(int64_t M) {
  if (M == 1) return {4, kRowsJ4, false};
  if (M <= 2 * kRowsJ2) return {2, kRowsJ2, false};
  return {2, kTileRows, true};
}

inline int64_t int4_units(const Int4Plan& plan, int64_t blocks) { return blocks * (kStripVectors / plan.J); }

// 8 bf16 values from p, of which n (may be < 1 or > 8) exist, as fp32 (0 past n).
inline __m256 int4_load_bf16x8(const bf16* p, int64_t n) {
  __m128i v;
  if (n >= 8) {
    v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else {
    alignas(16) uint16_t tmp[8] = {};
    if (n > 0) std::memcpy(tmp, p, n * sizeof(bf16));
    v = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
  }
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

// 8 bf16 values as fp32.
inline __m256 int4_bf16x8(const bf16* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// A chunk's 8 bytes widened to int32 lanes.
inline __m256i int4_chunk(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// fma(q - 8, scale, zero) for the low or high nibbles of a widened chunk: q - 8 is exact in
// int32 and in its conversion (vpermps picks by 3 index bits on AVX2, so no LUT as on AVX-512).
template <bool High>
inline __m256 int4_dequant(__m256i chunk, __m256 s, __m256 z) {
  const __m256i q = High ? _mm256_srli_epi32(chunk, 4) : _mm256_and_si256(chunk, _mm256_set1_epi32(15));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, _mm256_set1_epi32(8))), s, z);
}

// The loops over a block's rows, vectors and chunks are unrolled explicitly: GCC otherwise keeps
// the accumulator array in memory and stores it every input.
#define NOVAINFER_UNROLL _Pragma("GCC unroll 16")

// One input k of an R x J block: acc[r][j] = fma(x[r, k], w[k, vector j], acc[r][j]), where
// vector j of the unit is the low nibbles of chunk j (j < J / 2), else the high ones of chunk
// j - J / 2. The registers decide the order: with fewer rows than vectors the rows' broadcasts
// stay live and each weight is used as it is made; with more, the J weights stay live and each
// row's broadcast is used at once.
template <int R, int J>
inline void int4_block_step(const float* x, int64_t K, int64_t k, const uint8_t* bytes, const __m256* s,
                            const __m256* z, __m256 (&acc)[R][J]) {
  constexpr int C = J / 2;
  if constexpr (R < J) {
    __m256 xv[R];
    NOVAINFER_UNROLL
    for (int r = 0; r < R; ++r) xv[r] = _mm256_broadcast_ss(x + r * K + k);
    NOVAINFER_UNROLL
    for (int c = 0; c < C; ++c) {
      const __m256i chunk = int4_chunk(bytes + k * 32 + 8 * c);
      const __m256 lo = int4_dequant<false>(chunk, s[c], z[c]);
      NOVAINFER_UNROLL
      for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(xv[r], lo, acc[r][c]);
      const __m256 hi = int4_dequant<true>(chunk, s[C + c], z[C + c]);
      NOVAINFER_UNROLL
      for (int r = 0; r < R; ++r) acc[r][C + c] = _mm256_fmadd_ps(xv[r], hi, acc[r][C + c]);
    }
  } else {
    __m256 w[J];
    NOVAINFER_UNROLL
    for (int c = 0; c < C; ++c) {
      const __m256i chunk = int4_chunk(bytes + k * 32 + 8 * c);
      w[c] = int4_dequant<false>(chunk, s[c], z[c]);
      w[C + c] = int4_dequant<true>(chunk, s[C + c], z[C + c]);
    }
    NOVAINFER_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * K + k);
      NOVAINFER_UNROLL
      for (int j = 0; j < J; ++j) acc[r][j] = _mm256_fmadd_ps(xv, w[j], acc[r][j]);
    }
  }
}

// The tiled path: inputs [k0, k1) of the unit's J vectors, dequantized into tile[k - k0][J][8].
template <int J>
void int4_dequant_tile(const uint8_t* bytes, const float* scales, int64_t k0, int64_t k1, float* tile) {
  constexpr int C = J / 2;
  for (int64_t g = k0 / kInt4Group; g < k1 / kInt4Group; ++g) {
    __m256 s[J], z[J];
    NOVAINFER_UNROLL
    for (int j = 0; j < J; ++j) {
      s[j] = _mm256_loadu_ps(scales + (g * 2 * J + j) * 8);
      z[j] = _mm256_loadu_ps(scales + (g * 2 * J + J + j) * 8);
    }
    for (int64_t k = g * kInt4Group; k < (g + 1) * kInt4Group; ++k) {
      if (k % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(bytes + (k + kPrefetchK) * 32), _MM_HINT_T0);
      float* t = tile + (k - k0) * J * 8;
      NOVAINFER_UNROLL
      for (int c = 0; c < C; ++c) {
        const __m256i chunk = int4_chunk(bytes + k * 32 + 8 * c);
        _mm256_store_ps(t + c * 8, int4_dequant<false>(chunk, s[c], z[c]));
        _mm256_store_ps(t + (C + c) * 8, int4_dequant<true>(chunk, s[C + c], z[C + c]));
      }
    }
  }
}

// R rows times a tile of kk inputs, accumulating into acc [R][J][8]: the same fmas, in the same
// order, as int4_block.
template <int R, int J>
void int4_tile_block(const float* x, int64_t K, const float* tile, int64_t kk, float* acc_buf) {
  __m256 acc[R][J];
  NOVAINFER_UNROLL
  for (int r = 0; r < R; ++r) {
    NOVAINFER_UNROLL
    for (int j = 0; j < J; ++j) acc[r][j] = _mm256_loadu_ps(acc_buf + (r * J + j) * 8);
  }
  for (int64_t k = 0; k < kk; ++k) {
    __m256 w[J];
    NOVAINFER_UNROLL
    for (int j = 0; j < J; ++j) w[j] = _mm256_load_ps(tile + (k * J + j) * 8);
    NOVAINFER_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * K + k);
      NOVAINFER_UNROLL
      for (int j = 0; j < J; ++j) acc[r][j] = _mm256_fmadd_ps(xv, w[j], acc[r][j]);
    }
  }
  NOVAINFER_UNROLL
  for (int r = 0; r < R; ++r) {
    NOVAINFER_UNROLL
    for (int j = 0; j < J; ++j) _mm256_storeu_ps(acc_buf + (r * J + j) * 8, acc[r][j]);
  }
}

template <int R, int J>
void int4_tile_rows(const float* x, int64_t K, const float* tile, int64_t kk, float* acc_buf, int64_t m) {
  if constexpr (R > 0) {
    if (m == R) return int4_tile_block<R, J>(x, K, tile, kk, acc_buf);
    int4_tile_rows<R - 1, J>(x, K, tile, kk, acc_buf, m);
  }
}

// Every row times a unit, a tile of inputs at a time: each weight dequantized once for all the
// row blocks, which store and reload their accumulators between tiles.
template <int J>
void int4_unit_tiled(const float* x, int64_t M, int64_t K, const uint8_t* bytes, const float* scales, int64_t N,
                     const int64_t* col, bf16* out, int64_t rows) {
  alignas(32) thread_local float tile[kTileK * J * 8];
  thread_local std::vector<float> acc;
  acc.assign(M * J * 8, 0.f);
  const int64_t blocks = (M + rows - 1) / rows;
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    const int64_t k1 = std::min(K, k0 + kTileK);
    int4_dequant_tile<J>(bytes, scales, k0, k1, tile);
    for (int64_t blk = 0, m0 = 0; blk < blocks; ++blk) {
      const int64_t m1 = M * (blk + 1) / blocks;
      int4_tile_rows<kTileRows, J>(x + m0 * K + k0, K, tile, k1 - k0, acc.data() + m0 * J * 8, m1 - m0);
      m0 = m1;
    }
  }
  for (int j = 0; j < J; ++j) {
    const int64_t ncols = std::clamp<int64_t>(N - col[j], 0, 8);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = 0; c < ncols; ++c) out[m * N + col[j] + c] = bf16(acc[(m * J + j) * 8 + c]);
  }
}

// R rows (x and out at the block's first row) times the J vectors of a unit (bytes: the strip's
// bytes at the unit's first chunk; col[j]: vector j's first column), over all of K, straight
// from the packed bytes and the bf16 scales and zeros: each group's are converted as the loop
// reaches them and prefetched kPrefetchGroups ahead, the bytes kBlockPrefetchK inputs ahead.
// Full: every column of the unit < N (no masked scales).
template <int R, int J, bool Full>
void int4_block(const float* x, int64_t K, const uint8_t* bytes, const bf16* sz, int64_t N, const int64_t* col,
              bf16* out) {
  constexpr int C = J / 2;
  __m256 acc[R][J];
  NOVAINFER_UNROLL
  for (int r = 0; r < R; ++r) {
    NOVAINFER_UNROLL
    for (int j = 0; j < J; ++j) acc[r][j] = _mm256_setzero_ps();
  }
  const int64_t groups = K / kInt4Group;
  for (int64_t g = 0; g < groups; ++g) {
    __m256 s[J], z[J];
    NOVAINFER_UNROLL
    for (int j = 0; j < J; ++j) {
      const bf16* p = sz + g * 2 * N + col[j];
      s[j] = Full ? int4_bf16x8(p) : int4_load_bf16x8(p, N - col[j]);
      z[j] = Full ? int4_bf16x8(p + N) : int4_load_bf16x8(p + N, N - col[j]);
    }
    if (g + kPrefetchGroups < groups) {
      // The unit's scales and zeros of a group: two pieces of 16 columns in each of two rows.
      const bf16* p = sz + (g + kPrefetchGroups) * 2 * N;
      for (const bf16* q : {p + col[0], p + col[C], p + N + col[0], p + N + col[C]})
        _mm_prefetch(reinterpret_cast<const char*>(q), _MM_HINT_T0);
    }
    for (int64_t k = g * kInt4Group; k < (g + 1) * kInt4Group; k += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(bytes + (k + kBlockPrefetchK) * 32), _MM_HINT_T0);
      int4_block_step<R, J>(x, K, k, bytes, s, z, acc);
      int4_block_step<R, J>(x, K, k + 1, bytes, s, z, acc);
    }
  }
  alignas(32) float tmp[R][J][8];
  NOVAINFER_UNROLL
  for (int r = 0; r < R; ++r) {
    NOVAINFER_UNROLL
    for (int j = 0; j < J; ++j) _mm256_store_ps(tmp[r][j], acc[r][j]);
  }
  for (int j = 0; j < J; ++j) {
    const int64_t ncols = std::clamp<int64_t>(N - col[j], 0, 8);
    for (int r = 0; r < R; ++r)
      for (int64_t c = 0; c < ncols; ++c) out[r * N + col[j] + c] = bf16(tmp[r][j][c]);
  }
}

// int4_block<m, J> for a run-time m in 1..R.
template <int R, int J>
void int4_block_rows(const float* x, int64_t K, const uint8_t* bytes, const bf16* sz, int64_t N, const int64_t* col,
                     bf16* out, int64_t m) {
  if constexpr (R > 0) {
    if (m == R) {
      if (col[J - 1] + 8 <= N) return int4_block<R, J, true>(x, K, bytes, sz, N, col, out);
      return int4_block<R, J, false>(x, K, bytes, sz, N, col, out);
    }
    int4_block_rows<R - 1, J>(x, K, bytes, sz, N, col, out, m);
  }
}

// Every row times unit `unit` (strip unit / (8 / J), its chunks J / 2 at a time), in equal blocks
// of at most `rows` <= R rows.
template <int R, int J>
void int4_unit_j(const float* x, int64_t M, int64_t K, const uint8_t* packed, const bf16* sz, int64_t N, int64_t unit,
                 bf16* out, int64_t rows, bool tiled) {
  constexpr int C = J / 2;
  const int64_t b = unit / (kStripVectors / J), chunk0 = unit % (kStripVectors / J) * C;
  int64_t col[J];
  for (int c = 0; c < C; ++c) {
    col[c] = b * kInt4Block + 8 * (chunk0 + c);
    col[C + c] = col[c] + kInt4Block / 2;
  }
  if (col[0] >= N) return;  // wholly past N (the unit's lowest column)
  const uint8_t* bytes = packed + b * K * 32 + 8 * chunk0;
  if (!tiled) {
    const int64_t blocks = (M + rows - 1) / rows;
    for (int64_t blk = 0, m0 = 0; blk < blocks; ++blk) {
      const int64_t m1 = M * (blk + 1) / blocks;
      int4_block_rows<R, J>(x + m0 * K, K, bytes, sz, N, col, out + m0 * N, m1 - m0);
      m0 = m1;
    }
    return;
  }
  // The tile's dequantization runs in its own loop, so the unit's scales and zeros are
  // converted to fp32 once, for all of it.
  thread_local std::vector<float> scales;
  scales.resize(K / kInt4Group * 2 * J * 8);
  for (int64_t g = 0; g < K / kInt4Group; ++g)
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < J; ++j)
        _mm256_storeu_ps(scales.data() + ((g * 2 + h) * J + j) * 8,
                         int4_load_bf16x8(sz + (g * 2 + h) * N + col[j], N - col[j]));
  int4_unit_tiled<J>(x, M, K, bytes, scales.data(), N, col, out, rows);
}

inline void int4_unit(const Int4Plan& plan, const float* x, int64_t M, int64_t K, const uint8_t* packed,
                      const bf16* sz, int64_t N, int64_t unit, bf16* out) {
  if (plan.J == 4) return int4_unit_j<kRowsJ4, 4>(x, M, K, packed, sz, N, unit, out, plan.rows, plan.tiled);
  int4_unit_j<kRowsJ2, 2>(x, M, K, packed, sz, N, unit, out, plan.rows, plan.tiled);
}

#undef NOVAINFER_UNROLL

}  // namespace novainfer
