// Int4 weight-only matmul, row-invariant: out[M, N] (bf16) = x[M, K] (bf16) @ W.T, where W is
// stored as 4-bit q in groups of 32 along K with a bf16 scale and zero per (group, column):
// w = (q - 8) * scale + zero, models/int4.py's values (fused_cpu/int4_matmul.py repacks them).
//
// torch's _weight_int4pack_mm_for_cpu unpacks the weights again for every block of 4 rows, so a
// step verifying drafts pays for its weights once per 4 rows. Here a thread dequantizes each
// 64-column strip of W once per call (fp32, exact: one fma per weight) and multiplies every row by
// it, so the weights cost the same at 1 row and at 72.
//
// Row-invariant: every output element is acc = fma(x[m, k], w[k, n], acc) for k = 0..K-1 from
// acc = 0, in fp32, whatever M, the row blocking or the thread count (threads split the columns,
// never K), so a row's bits are those it gets alone (tests/engine_core/fused_cpu/
// test_row_invariance.py): a draft verified in a step gets its lone decode's bits.
//
// Layout (int4_matmul.py): packed uint8 [ceil(N / 64), K, 32]: for column block b and input k,
// byte d holds column 64b + d in its low nibble and 64b + 32 + d in its high one (zero nibbles
// past N); scales_zeros bf16 [K / 32, 2, N].
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace novainfer {

constexpr int64_t kInt4Group = 32;  // models/int4.py GROUP
constexpr int64_t kInt4Block = 64;  // columns per strip
constexpr int64_t kPrefetchK = 64;  // inputs ahead to prefetch a strip's bytes (2 KB, as torch's kernel)

#if defined(__AVX512F__)

// (q - 8) for q = 0..15: vpermps picks by an index's low 4 bits, so the high nibble of a byte
// needs no mask.
inline __m512 int4_lut() {
  return _mm512_setr_ps(-8.f, -7.f, -6.f, -5.f, -4.f, -3.f, -2.f, -1.f, 0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
}

inline __m512 load_bf16_masked(const bf16* p, __mmask16 mask) {
  __m256i v = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// The scales and zeros of columns [c0, c0 + 64) of group g as 4 + 4 vectors (0 past N).
struct GroupScales {
  __m512 s[4], z[4];

  GroupScales(const bf16* sz, int64_t N, int64_t g, int64_t c0) {
    for (int j = 0; j < 4; ++j) {
      const int64_t c = c0 + 16 * j;
      const __mmask16 mask = c >= N ? 0 : (N - c >= 16 ? 0xFFFF : __mmask16((1u << (N - c)) - 1));
      s[j] = load_bf16_masked(sz + (g * 2) * N + c, mask);
      z[j] = load_bf16_masked(sz + (g * 2 + 1) * N + c, mask);
    }
  }
};

// The 64 weights of input k in a strip: w[j] holds columns 16j..16j+15.
inline void dequant_k(const uint8_t* bytes, const GroupScales& gs, __m512 lut, __m512 w[4]) {
  const __m512i lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  const __m512i hi = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16)));
  w[0] = _mm512_fmadd_ps(_mm512_permutexvar_ps(lo, lut), gs.s[0], gs.z[0]);
  w[1] = _mm512_fmadd_ps(_mm512_permutexvar_ps(hi, lut), gs.s[1], gs.z[1]);
  w[2] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(lo, 4), lut), gs.s[2], gs.z[2]);
  w[3] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(hi, 4), lut), gs.s[3], gs.z[3]);
}

template <int R>
inline void store_rows(__m512 acc[R][4], bf16* out, int64_t ldo, int64_t ncols) {
  alignas(64) float tmp[kInt4Block];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < 4; ++j) _mm512_store_ps(tmp + 16 * j, acc[r][j]);
    for (int64_t c = 0; c < ncols; ++c) out[r * ldo + c] = bf16(tmp[c]);
  }
}

// R <= 4 rows straight from the packed weights, dequantized in registers (no strip buffer).
template <int R>
void int4_rows_direct(const float* x, int64_t K, const uint8_t* packed, const bf16* sz, int64_t N, int64_t c0,
                      bf16* out, int64_t ldo, int64_t ncols) {
  const __m512 lut = int4_lut();
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / kInt4Group; ++g) {
    const GroupScales gs(sz, N, g, c0);
    for (int64_t k = g * kInt4Group; k < (g + 1) * kInt4Group; ++k) {
      _mm_prefetch(reinterpret_cast<const char*>(packed + (k + kPrefetchK) * 32), _MM_HINT_T0);
      __m512 w[4];
      dequant_k(packed + k * 32, gs, lut, w);
      for (int r = 0; r < R; ++r) {
        const __m512 xv = _mm512_set1_ps(x[r * K + k]);
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(xv, w[j], acc[r][j]);
      }
    }
  }
  store_rows<R>(acc, out, ldo, ncols);
}

// Inputs per tile: a strip's weights are dequantized kTileK inputs at a time into an L1-resident
// tile (kTileK x 64 fp32, 16 KB) that every row block then multiplies, its accumulators kept in
// a [M, 64] fp32 buffer between tiles (loading and storing an fp32 accumulator leaves its bits).
constexpr int64_t kTileK = 2 * kInt4Group;
// Rows in register blocks of 6 (24 accumulators + 4 weights + 1 broadcast of 32 zmm).
constexpr int64_t kTileRows = 6;
constexpr int64_t kDirectRows = 4;

// Inputs [k0, k1) of a strip dequantized to fp32: tile[(k - k0) * 64 + c].
inline void int4_dequant_tile(int64_t k0, int64_t k1, const uint8_t* packed, const bf16* sz, int64_t N, int64_t c0,
                              float* tile) {
  const __m512 lut = int4_lut();
  for (int64_t g = k0 / kInt4Group; g < k1 / kInt4Group; ++g) {
    const GroupScales gs(sz, N, g, c0);
    for (int64_t k = g * kInt4Group; k < (g + 1) * kInt4Group; ++k) {
      _mm_prefetch(reinterpret_cast<const char*>(packed + (k + kPrefetchK) * 32), _MM_HINT_T0);
      __m512 w[4];
      dequant_k(packed + k * 32, gs, lut, w);
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(tile + (k - k0) * kInt4Block + 16 * j, w[j]);
    }
  }
}

// R rows times a dequantized tile of kk inputs, accumulating into acc [R, 64]: the same fmas,
// in the same order, as int4_rows_direct.
template <int R>
void int4_rows_tile(const float* x, int64_t K, const float* tile, int64_t kk, float* acc_buf) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_loadu_ps(acc_buf + r * kInt4Block + 16 * j);
  for (int64_t k = 0; k < kk; ++k) {
    __m512 w[4];
    for (int j = 0; j < 4; ++j) w[j] = _mm512_loadu_ps(tile + k * kInt4Block + 16 * j);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * K + k]);
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(xv, w[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(acc_buf + r * kInt4Block + 16 * j, acc[r][j]);
}

template <int R>
void int4_tail_rows(const float* x, int64_t K, const float* tile, int64_t kk, float* acc_buf, int64_t m) {
  if constexpr (R > 0) {
    if (m == R) return int4_rows_tile<R>(x, K, tile, kk, acc_buf);
    int4_tail_rows<R - 1>(x, K, tile, kk, acc_buf, m);
  }
}

template <int R>
void int4_direct_rows(const float* x, int64_t K, const uint8_t* packed, const bf16* sz, int64_t N, int64_t c0,
                      bf16* out, int64_t ncols, int64_t m) {
  if constexpr (R > 0) {
    if (m == R) return int4_rows_direct<R>(x, K, packed, sz, N, c0, out, N, ncols);
    int4_direct_rows<R - 1>(x, K, packed, sz, N, c0, out, ncols, m);
  }
}

inline void int4_strip(const float* x, int64_t M, int64_t K, const uint8_t* packed, const bf16* sz, int64_t N,
                       int64_t b, bf16* out) {
  const int64_t c0 = b * kInt4Block, ncols = std::min(kInt4Block, N - c0);
  const uint8_t* p = packed + b * K * 32;
  if (M <= kDirectRows) return int4_direct_rows<kDirectRows>(x, K, p, sz, N, c0, out + c0, ncols, M);
  // Per thread, reused across calls.
  thread_local std::vector<float> tile(kTileK * kInt4Block), acc;
  acc.assign(M * kInt4Block, 0.f);
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    const int64_t k1 = std::min(K, k0 + kTileK);
    int4_dequant_tile(k0, k1, p, sz, N, c0, tile.data());
    int64_t m = 0;
    for (; m + kTileRows <= M; m += kTileRows) {
      int4_rows_tile<kTileRows>(x + m * K + k0, K, tile.data(), k1 - k0, acc.data() + m * kInt4Block);
    }
    if (m < M) int4_tail_rows<kTileRows - 1>(x + m * K + k0, K, tile.data(), k1 - k0, acc.data() + m * kInt4Block, M - m);
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = 0; c < ncols; ++c) out[m * N + c0 + c] = bf16(acc[m * kInt4Block + c]);
  }
}

#else  // portable: the same fmas in the same order, left to the compiler

inline void int4_strip(const float* x, int64_t M, int64_t K, const uint8_t* packed, const bf16* sz, int64_t N,
                       int64_t b, bf16* out) {
  const int64_t c0 = b * kInt4Block, ncols = std::min(kInt4Block, N - c0);
  const uint8_t* p = packed + b * K * 32;
  std::vector<float> strip(K * kInt4Block, 0.f), acc(kInt4Block);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t g = k / kInt4Group;
    for (int64_t c = 0; c < ncols; ++c) {
      const uint8_t byte = p[k * 32 + c % 32];
      const int q = c < 32 ? byte & 0xF : byte >> 4;
      const float s = float(sz[(g * 2) * N + c0 + c]), z = float(sz[(g * 2 + 1) * N + c0 + c]);
      strip[k * kInt4Block + c] = std::fma(float(q - 8), s, z);
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t k = 0; k < K; ++k) {
      const float xv = x[m * K + k];
      for (int64_t c = 0; c < ncols; ++c) acc[c] = std::fma(xv, strip[k * kInt4Block + c], acc[c]);
    }
    for (int64_t c = 0; c < ncols; ++c) out[m * N + c0 + c] = bf16(acc[c]);
  }
}

#endif

// out [M, N] bf16 = x [M, K] bf16 @ W.T, W packed as above.
inline at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x must be contiguous bf16 [M, K]");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(2) == 32 && packed.is_contiguous(),
              "packed must be contiguous uint8 [blocks, K, 32]");
  TORCH_CHECK(scales_zeros.scalar_type() == at::kBFloat16 && scales_zeros.dim() == 3 && scales_zeros.size(1) == 2 &&
                  scales_zeros.is_contiguous(),
              "scales_zeros must be contiguous bf16 [K / 32, 2, N]");
  const int64_t M = x.size(0), K = x.size(1), N = scales_zeros.size(2), blocks = packed.size(0);
  TORCH_CHECK(packed.size(1) == K && K % kInt4Group == 0 && scales_zeros.size(0) == K / kInt4Group &&
                  blocks == (N + kInt4Block - 1) / kInt4Block,
              "x, packed and scales_zeros disagree on K or N");
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  // x in fp32 once, for every strip (and the same values whichever thread reads them).
  std::vector<float> xf(M * K);
  to_float(bf16_data(x), xf.data(), M * K);
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const bf16* sz = bf16_data(scales_zeros);
  bf16* o = bf16_data_mut(out);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) int4_strip(xf.data(), M, K, p, sz, N, b, o);
  });
  return out;
}

}  // namespace novainfer
