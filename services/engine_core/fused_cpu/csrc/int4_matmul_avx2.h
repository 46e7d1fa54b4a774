// int4_matmul.h's kernel on AVX2 + FMA (16 ymm registers of 8 lanes): the same integer dot
// products and the same fp32 epilogue per group as the AVX-512 kernel, so the same bits.
//
// A 64-byte line of the layout (int4_layout.h) is two ymm "halves" of 8 columns; in each 32-bit
// lane l, byte 4 l + i holds column l's q of input i of the chunk (low nibble) and of input
// 4 + i (high nibble). Per row, chunk and half, the integer dot of the chunk's 8 inputs is
//   - with AVX-VNNI (__AVXVNNI__): two vpdpbusd (u8 q x s8 xq, four products into each int32
//     lane), as the AVX-512 kernel's, 8 lanes wide;
//   - else two vpmaddubsw (u8 q x s8 xq -> s16 sums of pairs, |pair| <= 2 * 15 * 128 = 3840: no
//     saturation) added into an int16 accumulator per row and half for the whole group (each
//     int16 lane sums 16 products: |sum| <= 16 * 15 * 128 = 30720 < 32768, no wrap), widened
//     once a group by vpmaddwd with ones into the int32 dot of the group's 32 inputs.
// Integer sums are exact in any order, so either gives the AVX-512 kernel's int32 dots; then per
// group in order g = 0..G-1 the same three fp32 ops, u = fma(float(dot), d, c),
// acc = fma(u, s, acc), acc = fma(z, sx, acc) from acc = 0, and the output bf16(acc).
//
// Why this blocking (chosen by counting, not timed: no timing slot for this work; the AVX-512
// kernel's plan was timed, benchmarks/int8_activations/README.md). Per group, a block of R rows
// times H halves costs, in vector ops: shared by its rows, per chunk and half the nibbles (and;
// shift, and) and per half the group's scales and zeros (widen + shift, twice): 16 H; per row and
// half, 8 vpmaddubsw, 7 adds (the first into the zeroed accumulator folds away), vpmaddwd, a
// conversion and 3 fma: 20 (12 with AVX-VNNI); besides loads (the rows' xq broadcasts, d, c and
// sx). So 20 + 16 / R ops per row, half and group: only R matters, and R is bounded by the 16
// registers: R H fp32 accumulators, R H integer ones, 2 H nibble vectors, 2 broadcasts and the
// nibble mask. H = 1 fits R = 5 (15 registers; 23.2 ops, against 36 at R = 1 and 28 at R = 2,
// the most rows H = 2 fits; GCC 12 keeps two of the five fp32 accumulators on the stack in the
// vpmaddubsw path, a load and a store each a group beside ~120 vector ops, and none with
// AVX-VNNI: seen in its assembly). A lone row (decode) takes H = 2: a vector's whole 64-byte
// line at once, one sequential stream (its op count is the same for any H). A unit, a thread's
// piece of work, is 2 vectors (32 columns) for every row: N = 576 gives 18 units, which two
// threads split 9:9. The block shapes change no bits: every row does the same integer dots and
// fp32 ops whatever its block.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "int4_layout.h"
#include "quantize_rows.h"

namespace novainfer {

constexpr int64_t kInt4Half = 8;  // columns per ymm
constexpr int64_t kInt4Halves = kInt4Vector / kInt4Half;  // ymm per vector (per 64-byte line)
constexpr int64_t kInt4UnitVectors = 2;  // vectors per unit
constexpr int kInt4BlockRows = 5;  // most rows a block of one half keeps in registers

// A call's blocking: rows in equal blocks of at most `rows`, each over `halves` halves (1 or 2).
struct Int4Plan {
  int rows;
  int halves;
};

inline Int4Plan int4_plan(int64_t M) { return M == 1 ? Int4Plan{1, 2} : Int4Plan{kInt4BlockRows, 1}; }

inline int64_t int4_units(const Int4Plan&, int64_t vectors) { return (vectors + kInt4UnitVectors - 1) / kInt4UnitVectors; }

// 8 bf16 values as fp32 (exact).
inline __m256 int4_bf16x8(const bf16* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// Four int8 xq (one 32-bit word) in every lane.
inline __m256i int4_xq4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

#if defined(__AVXVNNI__)
// The running dot: int32 lanes.
inline __m256i int4_dot_add(__m256i dot, __m256i lo, __m256i hi, __m256i xl, __m256i xh) {
  return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(dot, lo, xl), hi, xh);
}
inline __m256i int4_dot_int32(__m256i dot) { return dot; }
#else
// The running dot: int16 pairs of each int32 lane (bounds above).
inline __m256i int4_dot_add(__m256i dot, __m256i lo, __m256i hi, __m256i xl, __m256i xh) {
  return _mm256_add_epi16(dot, _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh)));
}
inline __m256i int4_dot_int32(__m256i dot) { return _mm256_madd_epi16(dot, _mm256_set1_epi16(1)); }
#endif

// The running dot in a register here: without it GCC reassociates a group's int16 adds (they
// are associative) into one sum at the group's end, keeping all 8 R H products live until then
// (spilled to the stack, with the accumulators: seen in its -O3 assembly).
inline void int4_keep(__m256i& v) { asm("" : "+x"(v)); }

// The loops over a block's rows and halves are unrolled explicitly, so that the accumulator
// arrays stay in registers.
#define NOVAINFER_UNROLL _Pragma("GCC unroll 16")

// Rows m0 .. m0 + R - 1 times halves h0 .. h0 + H - 1 (columns 8 h0 ..), over all of K.
template <int R, int H>
void int4_block(const QuantizedRows& qr, int64_t m0, int64_t K, const uint8_t* packed, const bf16* sz, int64_t N,
                int64_t h0, bf16* out) {
  const int64_t G = K / kInt4Group, lines = K / kInt4Chunk;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const uint8_t* half[H];
  NOVAINFER_UNROLL
  for (int h = 0; h < H; ++h)
    half[h] = packed + (h0 + h) / kInt4Halves * lines * 64 + (h0 + h) % kInt4Halves * kInt4Half * 4;
  const int8_t* xq = qr.q.data() + m0 * K;
  __m256 acc[R][H];
  NOVAINFER_UNROLL
  for (int r = 0; r < R; ++r) {
    NOVAINFER_UNROLL
    for (int h = 0; h < H; ++h) acc[r][h] = _mm256_setzero_ps();
  }
  for (int64_t g = 0; g < G; ++g) {
    __m256i dot[R][H];
    NOVAINFER_UNROLL
    for (int r = 0; r < R; ++r) {
      NOVAINFER_UNROLL
      for (int h = 0; h < H; ++h) dot[r][h] = _mm256_setzero_si256();
    }
    NOVAINFER_UNROLL
    for (int i = 0; i < kInt4Group / kInt4Chunk; ++i) {
      const int64_t c = g * (kInt4Group / kInt4Chunk) + i;
      __m256i lo[H], hi[H];
      NOVAINFER_UNROLL
      for (int h = 0; h < H; ++h) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(half[h] + c * 64));
        lo[h] = _mm256_and_si256(raw, low4);
        hi[h] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
      }
      NOVAINFER_UNROLL
      for (int r = 0; r < R; ++r) {
        const __m256i xl = int4_xq4(xq + r * K + c * kInt4Chunk), xh = int4_xq4(xq + r * K + c * kInt4Chunk + 4);
        NOVAINFER_UNROLL
        for (int h = 0; h < H; ++h) dot[r][h] = int4_dot_add(dot[r][h], lo[h], hi[h], xl, xh);
      }
      NOVAINFER_UNROLL
      for (int r = 0; r < R; ++r) {
        NOVAINFER_UNROLL
        for (int h = 0; h < H; ++h) int4_keep(dot[r][h]);
      }
    }
    __m256 s[H], z[H];
    NOVAINFER_UNROLL
    for (int h = 0; h < H; ++h) {
      s[h] = int4_bf16x8(sz + 2 * g * N + (h0 + h) * kInt4Half);
      z[h] = int4_bf16x8(sz + (2 * g + 1) * N + (h0 + h) * kInt4Half);
    }
    NOVAINFER_UNROLL
    for (int r = 0; r < R; ++r) {
      const int64_t i = (m0 + r) * G + g;
      const __m256 d = _mm256_set1_ps(qr.d[i]), cc = _mm256_set1_ps(qr.c[i]), sx = _mm256_set1_ps(qr.s[i]);
      NOVAINFER_UNROLL
      for (int h = 0; h < H; ++h) {
        // |dot| <= 32 * 15 * 128 < 2^24: its conversion is exact.
        const __m256 u = _mm256_fmadd_ps(_mm256_cvtepi32_ps(int4_dot_int32(dot[r][h])), d, cc);
        acc[r][h] = _mm256_fmadd_ps(u, s[h], acc[r][h]);
        acc[r][h] = _mm256_fmadd_ps(z[h], sx, acc[r][h]);
      }
    }
  }
  alignas(32) float tmp[kInt4Half];
  for (int r = 0; r < R; ++r) {
    for (int h = 0; h < H; ++h) {
      _mm256_store_ps(tmp, acc[r][h]);
      bf16* o = out + (m0 + r) * N + (h0 + h) * kInt4Half;
      for (int64_t c = 0; c < kInt4Half; ++c) o[c] = bf16(tmp[c]);
    }
  }
}

// int4_block<m, H> for a run-time m in 1..R.
template <int R, int H>
void int4_block_rows(const QuantizedRows& qr, int64_t m0, int64_t m, int64_t K, const uint8_t* packed, const bf16* sz,
                     int64_t N, int64_t h0, bf16* out) {
  if constexpr (R > 0) {
    if (m == R) return int4_block<R, H>(qr, m0, K, packed, sz, N, h0, out);
    int4_block_rows<R - 1, H>(qr, m0, m, K, packed, sz, N, h0, out);
  }
}

// Every row times unit u: vectors 2 u and 2 u + 1 (the last alone where N / 16 is odd).
inline void int4_unit(const Int4Plan& plan, const QuantizedRows& qr, int64_t M, int64_t K, const uint8_t* packed,
                      const bf16* sz, int64_t N, int64_t u, bf16* out) {
  const int64_t vectors = N / kInt4Vector;
  const int64_t h_begin = kInt4Halves * u * kInt4UnitVectors;
  const int64_t h_end = kInt4Halves * std::min(vectors, (u + 1) * kInt4UnitVectors);
  const int64_t blocks = (M + plan.rows - 1) / plan.rows;
  for (int64_t h0 = h_begin; h0 < h_end; h0 += plan.halves) {
    for (int64_t b = 0, m0 = 0; b < blocks; ++b) {
      const int64_t m1 = M * (b + 1) / blocks;
      if (plan.halves == 2) {  // plan.rows <= 2: the most H = 2 fits
        int4_block_rows<2, 2>(qr, m0, m1 - m0, K, packed, sz, N, h0, out);
      } else {
        int4_block_rows<kInt4BlockRows, 1>(qr, m0, m1 - m0, K, packed, sz, N, h0, out);
      }
      m0 = m1;
    }
  }
}

#undef NOVAINFER_UNROLL

}  // namespace novainfer
