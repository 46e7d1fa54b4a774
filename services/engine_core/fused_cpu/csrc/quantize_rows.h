// The int4 matmul's activations: x [M, K] bf16 quantized per row and 32-input block to int8, as
// llama.cpp's q8_1 (the activations it multiplies Q4_1 weights by):
//   d = max |x| / 127, xq = round-half-even(x * (1 / d)) in [-127, 127], and per block
//   s = d * sum xq (q8_1's block sum: the zero-point term's sum of x, int4_matmul.h says why) and
//   c = -8 * s (the (q - 8) offset's term, so the epilogue is one fma per group and row).
// Perplexity cost of the scheme (SmolLM2, benchmarks/int8_activations/README.md): +0.49 %.
//
// Every branch gives the same bits: max |x| is exact in any order, d and 1 / d are one IEEE
// division each, x * (1 / d) one multiplication (no a * b + c that a compiler could contract
// into an fma in one branch and not another), rounded to nearest even (cvtps2dq under the
// default MXCSR; std::nearbyint under the default rounding mode), and the block sum is integer.
// Finite x only: a NaN or inf activation gives unspecified int8 values (they may differ by branch).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "common.h"
#include "int4_layout.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace novainfer {

// Quantized rows of a call: q [M, K]; d, c, s [M, K / 32] (scale, -8 d sum xq, d sum xq).
// A caller reuses one across calls (the vectors only grow).
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> d, c, s;
};

// One block's scale and its reciprocal; 0 for a block whose scale is below FLT_MIN (max |x| <
// 1.5e-36, all zeros included): its xq are then all 0. Without that bound a subnormal d's
// reciprocal overflows to inf and x * inf (NaN for x = 0) has no int8 value every branch agrees on.
inline void int8_block_scale(float amax, float& d, float& inv) {
  d = amax / 127.f;
  inv = d >= std::numeric_limits<float>::min() ? 1.f / d : 0.f;
}

#if defined(__AVX512F__)

inline __m512 quantize_load_bf16(const bf16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// A block (32 bf16) as two zmm, exact in fp32; returns sum xq.
inline int32_t quantize_block(const bf16* x, int8_t* q, float& d) {
  const __m512 a = quantize_load_bf16(x), b = quantize_load_bf16(x + 16);
  float inv;
  int8_block_scale(_mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b))), d, inv);
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, vinv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, vinv));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(qa));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtsepi32_epi8(qb));
  return _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
}

#elif defined(__AVX2__)

// 8 bf16 as fp32 (exact).
inline __m256 quantize_load_bf16(const bf16* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// A block (32 bf16) as four ymm, exact in fp32; returns sum xq. As the AVX-512 branch: the sum is
// of the int32 values, and their saturation to int8 the same clamp (vpackssdw then vpacksswb, whose
// 128-bit-lane interleave one vpermd undoes).
inline int32_t quantize_block(const bf16* x, int8_t* q, float& d) {
  __m256 v[4];
  for (int i = 0; i < 4; ++i) v[i] = quantize_load_bf16(x + 8 * i);
  const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 m8 = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs)),
                                  _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs)));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  float inv;
  int8_block_scale(_mm_cvtss_f32(m), d, inv);
  const __m256 vinv = _mm256_set1_ps(inv);
  __m256i qi[4];
  for (int i = 0; i < 4; ++i) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vinv));
  const __m256i q8 = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  const __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
  return _mm_cvtsi128_si32(s);
}

#else

inline int32_t quantize_block(const bf16* x, int8_t* q, float& d) {
  float v[kInt4Group], amax = 0.f;
  for (int64_t i = 0; i < kInt4Group; ++i) {
    v[i] = float(x[i]);
    amax = std::max(amax, std::fabs(v[i]));
  }
  float inv;
  int8_block_scale(amax, d, inv);
  int32_t sum = 0;
  for (int64_t i = 0; i < kInt4Group; ++i) {
    // |x * inv| <= 127 (+ an ulp) for finite x: the clamp is the vector branch's saturation.
    const float r = std::nearbyint(v[i] * inv);
    q[i] = int8_t(std::clamp(r, -128.f, 127.f));
    sum += q[i];
  }
  return sum;
}

#endif

// x [M, K] bf16 (K % 32 == 0) -> out (resized to fit; its earlier contents are overwritten).
inline void quantize_rows(const bf16* x, int64_t M, int64_t K, QuantizedRows& out) {
  const int64_t G = K / kInt4Group;
  if (int64_t(out.q.size()) < M * K) out.q.resize(M * K);
  for (auto* v : {&out.d, &out.c, &out.s})
    if (int64_t(v->size()) < M * G) v->resize(M * G);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t i = m * G + g;
      const int32_t sum = quantize_block(x + m * K + g * kInt4Group, out.q.data() + m * K + g * kInt4Group, out.d[i]);
      out.s[i] = out.d[i] * float(sum);  // sum: |sum| <= 32 * 127, exact in fp32
      out.c[i] = -8.f * out.s[i];  // exact (a power of two)
    }
  }
}

// The quantized rows as tensors (q int8 [M, K]; d, c, s fp32 [M, K / 32]), for the tests.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_rows_tensors(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.size(1) % kInt4Group == 0,
              "x must be contiguous bf16 [M, K], K % 32 == 0");
  const int64_t M = x.size(0), K = x.size(1), G = K / kInt4Group;
  QuantizedRows rows;
  quantize_rows(bf16_data(x), M, K, rows);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  std::copy_n(rows.q.data(), M * K, q.data_ptr<int8_t>());
  std::vector<at::Tensor> f;
  for (const auto* v : {&rows.d, &rows.c, &rows.s}) {
    f.push_back(at::empty({M, G}, x.options().dtype(at::kFloat)));
    std::copy_n(v->data(), M * G, f.back().data_ptr<float>());
  }
  return {q, f[0], f[1], f[2]};
}

}  // namespace novainfer
