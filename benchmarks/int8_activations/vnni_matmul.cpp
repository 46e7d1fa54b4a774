// Probe (issue 15; not part of the engine): out[M, N] = x[M, K] @ W.T with W the fused
// step's int4 values (group 32 along K, w = (q - 8) * s + z per (group, column)) and x quantized
// per row and per 32-block to int8, multiplied with AVX512-VNNI's vpdpbusd (u8 x s8 -> s32, four
// products per 32-bit lane: 64 MACs per instruction against an fp32 fma's 16).
//
// Per row m and group g (32 inputs k):
//   d = max|x| / 127, xq = round(x / d) in [-127, 127] (int8, q8_0's rounding),
//   sum_k x w = s * sum_k x (q - 8) + z * sum_k x
//            ~= s * d * (dot - 8 * sum xq) + z * sum x,   dot = sum_k q xq (int32, exact),
// so q (0..15) is vpdpbusd's unsigned operand and xq its signed one, with no offset on either.
// The zero-point term takes sum x as d * sum xq (q8_1's block sum), not the exact fp32 sum of x:
// then the result is exactly sum_k (d xq_k) w_k (the error sum_k e_k w_k, e = x - d xq), while
// the exact sum leaves sum_k e_k (w_k - z), larger where a group's weights centre on 0 and z does
// not (measured: benchmarks/int8_activations/check.py, mean error 8.7e-3 vs 8.4e-3 of a row's rms).
//
// Row-invariant by construction: every row does the same integer dot products (exact) and then,
// per group in order g = 0..G-1, the same three fp32 ops into its accumulator, whatever M, the
// row blocking or the thread count (threads split the columns, never K).
//
// Weight layout (vnni.py's pack): uint8 [Np / 16, K / 8, 64]: for 16-column vector v and chunk c
// (inputs 8c .. 8c + 7), byte 4 l + i holds column 16 v + l's q of input 8c + i in its low nibble
// and of input 8c + 4 + i in its high one; so one 64-byte load, an and and a shift + and give the
// two u8 operands (4 inputs per 32-bit lane) of two vpdpbusd. s, z: fp32 [K / 32, Np].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using bf16 = c10::BFloat16;
constexpr int64_t kGroup = 32;

// The activations, quantized once per call (the same values whichever thread reads them).
struct QuantX {
  std::vector<int8_t> q;      // [M, K]
  std::vector<float> d, c, s;  // [M, G]: scale, -8 d sum xq, d sum xq
};

inline __m512 load_bf16(const bf16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// Per 32-block of bf16 x: two zmm (exact fp32), max |x| (exact in any order), x / d rounded to
// nearest even (cvtps2dq under the default MXCSR, as std::nearbyint), saturated to int8
// (|x / d| <= 127). Into qx, whose buffers a thread reuses across calls (no allocation a call).
void quantize_x(const bf16* x, int64_t M, int64_t K, QuantX& qx) {
  const int64_t G = K / kGroup;
  if (int64_t(qx.q.size()) < M * K) qx.q.resize(M * K);
  for (auto* v : {&qx.d, &qx.c, &qx.s})
    if (int64_t(v->size()) < M * G) v->resize(M * G);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const bf16* xs = x + m * K + g * kGroup;
      const __m512 a = load_bf16(xs), b = load_bf16(xs + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
      const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
      const __m512 vid = _mm512_set1_ps(id);
      const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, vid)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, vid));
      int8_t* out = qx.q.data() + m * K + g * kGroup;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtsepi32_epi8(qa));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm512_cvtsepi32_epi8(qb));
      const int32_t sq = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
      qx.d[m * G + g] = d;
      qx.c[m * G + g] = -8.f * d * float(sq);
      qx.s[m * G + g] = d * float(sq);
    }
  }
}

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The weights of one call: packed q, and the scales and zeros either as fp32 s, z [K / 32, Np]
// each, or as bf16 sz [K / 32, 2, Np] (the current kernel's bytes: 1/8 byte a weight, not 1/4;
// two more ops a vector and group to widen, shared by all rows).
struct Weights {
  const uint8_t* packed;
  const float *s, *z;
  const bf16* sz;
  int64_t Np, N, K;
  int64_t prefetch;  // > 0: prefetch each vector's line this many chunks (64 bytes each) ahead
  bool interleaved;  // packed [Np / 64, K / 8, 4 * 64]: a 64-column strip's 4 vectors chunk by chunk

  // The 64 bytes of vector v, chunk c: one stream per vector (4.6 KB at K = 576, then the next
  // vector's), or, interleaved, one sequential stream per strip of 4 vectors (and per thread).
  const uint8_t* line(int64_t v, int64_t c) const {
    if (interleaved) return packed + ((v / 4) * (K / 8) + c) * 256 + (v % 4) * 64;
    return packed + (v * (K / 8) + c) * 64;
  }
};


// R rows times J vectors (columns 16 v0 ..) over all of K, accumulators in registers.
// kHiMask: the high nibbles as (byte & 0xF0) = 16 q into their own int32 sums, shifted right by
// 4 (exact) once per group, instead of a shift per load (fewer ops shared by the rows, two more
// per row and vector a group). Either way the same integers: the result's bits do not depend on it.
template <int R, int J, bool kHiMask, bool kBf16Scales>
void vnni_rows(const QuantX& qx, int64_t m0, const Weights& w, int64_t v0, float* outf, bf16* outb) {
  const int64_t K = w.K, G = K / kGroup, Np = w.Np;
  const __m512i low4 = _mm512_set1_epi8(0x0F), high4 = _mm512_set1_epi8(int8_t(0xF0));
  __m512 acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
  const int8_t* xq = qx.q.data() + m0 * K;
  for (int64_t g = 0; g < G; ++g) {
    __m512i idot[R][J], ihi[kHiMask ? R : 1][kHiMask ? J : 1];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < J; ++j) idot[r][j] = _mm512_setzero_si512();
    if constexpr (kHiMask) {
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < J; ++j) ihi[r][j] = _mm512_setzero_si512();
    }
    for (int64_t c = 4 * g; c < 4 * g + 4; ++c) {
      __m512i lo[J], hi[J];
      for (int j = 0; j < J; ++j) {
        const uint8_t* line = w.line(v0 + j, c);
        if (w.prefetch) _mm_prefetch(reinterpret_cast<const char*>(line + w.prefetch * 64), _MM_HINT_T0);
        const __m512i raw = _mm512_loadu_si512(line);
        lo[j] = _mm512_and_si512(raw, low4);
        hi[j] = kHiMask ? _mm512_and_si512(raw, high4) : _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
      }
      for (int r = 0; r < R; ++r) {
        const __m512i xl = _mm512_set1_epi32(load_i32(xq + r * K + 8 * c));
        const __m512i xh = _mm512_set1_epi32(load_i32(xq + r * K + 8 * c + 4));
        for (int j = 0; j < J; ++j) {
          idot[r][j] = _mm512_dpbusd_epi32(idot[r][j], lo[j], xl);
          if constexpr (kHiMask) {
            ihi[r][j] = _mm512_dpbusd_epi32(ihi[r][j], hi[j], xh);
          } else {
            idot[r][j] = _mm512_dpbusd_epi32(idot[r][j], hi[j], xh);
          }
        }
      }
    }
    __m512 s[J], z[J];
    for (int j = 0; j < J; ++j) {
      const int64_t col = 16 * (v0 + j);
      if constexpr (kBf16Scales) {
        s[j] = load_bf16(w.sz + (2 * g) * Np + col);
        z[j] = load_bf16(w.sz + (2 * g + 1) * Np + col);
      } else {
        s[j] = _mm512_loadu_ps(w.s + g * Np + col);
        z[j] = _mm512_loadu_ps(w.z + g * Np + col);
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t i = (m0 + r) * G + g;
      const __m512 d = _mm512_set1_ps(qx.d[i]), cc = _mm512_set1_ps(qx.c[i]), sx = _mm512_set1_ps(qx.s[i]);
      for (int j = 0; j < J; ++j) {
        __m512i dot = idot[r][j];
        if constexpr (kHiMask) dot = _mm512_add_epi32(dot, _mm512_srai_epi32(ihi[r][j], 4));
        const __m512 u = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), d, cc);
        acc[r][j] = _mm512_fmadd_ps(u, s[j], acc[r][j]);
        acc[r][j] = _mm512_fmadd_ps(z[j], sx, acc[r][j]);
      }
    }
  }
  alignas(64) float tmp[16 * J];
  const int64_t first = 16 * v0, ncols = std::clamp<int64_t>(w.N - first, 0, 16 * J);
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < J; ++j) _mm512_store_ps(tmp + 16 * j, acc[r][j]);
    if (outf) {
      for (int64_t c = 0; c < ncols; ++c) outf[(m0 + r) * w.N + first + c] = tmp[c];
    } else {
      for (int64_t c = 0; c < ncols; ++c) outb[(m0 + r) * w.N + first + c] = bf16(tmp[c]);
    }
  }
}

template <int R, int J, bool H, bool B>
void vnni_rows_rt(const QuantX& qx, int64_t m0, int64_t m, const Weights& w, int64_t v0, float* outf, bf16* outb) {
  if constexpr (R > 0) {
    if (m == R) return vnni_rows<R, J, H, B>(qx, m0, w, v0, outf, outb);
    vnni_rows_rt<R - 1, J, H, B>(qx, m0, m, w, v0, outf, outb);
  }
}

// All M rows times strip u (J vectors), in blocks of at most R rows (of equal sizes; a row's
// bits do not depend on its block anyway).
template <int R, int J, bool H, bool B>
void vnni_strip(const QuantX& qx, int64_t M, const Weights& w, int64_t u, float* outf, bf16* outb) {
  const int64_t V = w.Np / 16, v0 = u * J;
  const int64_t blocks = (M + R - 1) / R;
  for (int64_t b = 0, m0 = 0; b < blocks; ++b) {
    const int64_t m1 = M * (b + 1) / blocks;
    if (v0 + J <= V) {
      vnni_rows_rt<R, J, H, B>(qx, m0, m1 - m0, w, v0, outf, outb);
    } else {
      // The last strip of a matrix whose vectors are not a multiple of J: one vector at a time.
      for (int64_t v = v0; v < V; ++v) vnni_rows_rt<R, 1, H, B>(qx, m0, m1 - m0, w, v, outf, outb);
    }
    m0 = m1;
  }
}

template <bool H, bool B>
void run_variant(int64_t R, int64_t J, const QuantX& qx, int64_t M, const Weights& w, int64_t u, float* outf,
                 bf16* outb) {
#define CASE(r, j) \
  if (R == r && J == j) return vnni_strip<r, j, H, B>(qx, M, w, u, outf, outb);
  CASE(1, 4) CASE(2, 4) CASE(3, 4) CASE(4, 2) CASE(6, 2) CASE(5, 2) CASE(3, 2) CASE(8, 1) CASE(12, 1) CASE(4, 1)
  CASE(2, 2) CASE(1, 2)
#undef CASE
  TORCH_CHECK(false, "no kernel for R=", R, " J=", J);
}

// (R, J) per call: rows in registers per block, vectors per strip (a thread's unit);
// variant bit 0: kHiMask, bit 1: bf16 scales and zeros.
void run(int64_t R, int64_t J, int64_t variant, const QuantX& qx, int64_t M, const Weights& w, int64_t u, float* outf,
         bf16* outb) {
  switch (variant) {
    case 0: return run_variant<false, false>(R, J, qx, M, w, u, outf, outb);
    case 1: return run_variant<true, false>(R, J, qx, M, w, u, outf, outb);
    case 2: return run_variant<false, true>(R, J, qx, M, w, u, outf, outb);
    default: return run_variant<true, true>(R, J, qx, M, w, u, outf, outb);
  }
}

// x [M, K] bf16; packed uint8 [Np / 16, K / 8, 64]; S, Z fp32 [K / 32, Np]; SZ bf16
// [K / 32, 2, Np] (the same values). R, J <= 0: the default plan; variant < 0: the default one.
// Output bf16, or fp32 if out_fp32.
at::Tensor vnni_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& S, const at::Tensor& Z,
                       const at::Tensor& SZ, int64_t N, int64_t R, int64_t J, int64_t variant, bool out_fp32,
                       int64_t prefetch) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous());
  const int64_t M = x.size(0), K = x.size(1), Np = S.size(1);
  const bool interleaved = packed.size(2) == 256;
  TORCH_CHECK(K % kGroup == 0 && packed.size(1) == K / 8 &&
              (interleaved ? Np % 64 == 0 && packed.size(0) == Np / 64 : packed.size(0) == Np / 16 && packed.size(2) == 64));
  TORCH_CHECK(S.size(0) == K / kGroup && Z.sizes() == S.sizes() && Np % 16 == 0 && N <= Np);
  TORCH_CHECK(SZ.scalar_type() == at::kBFloat16 && SZ.size(0) == K / kGroup && SZ.size(1) == 2 && SZ.size(2) == Np);
  if (R <= 0 || J <= 0) {
    if (M <= 1) {
      R = 1, J = 4;
    } else {
      R = 4, J = 2;
    }
  }
  if (variant < 0) variant = 0;
  at::Tensor out = at::empty({M, N}, x.options().dtype(out_fp32 ? at::kFloat : at::kBFloat16));
  if (M == 0) return out;
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "x must be bf16");
  // The caller's buffers, reused across calls; the workers read them through this reference (a
  // thread_local named inside the lambda would be each worker's own).
  thread_local QuantX tl_qx;
  const QuantX& qx = tl_qx;
  quantize_x(reinterpret_cast<const bf16*>(x.data_ptr<at::BFloat16>()), M, K, tl_qx);
  const Weights w{packed.data_ptr<uint8_t>(), S.data_ptr<float>(), Z.data_ptr<float>(),
                  reinterpret_cast<const bf16*>(SZ.data_ptr<at::BFloat16>()), Np, N, K, prefetch, interleaved};
  float* outf = out_fp32 ? out.data_ptr<float>() : nullptr;
  bf16* outb = out_fp32 ? nullptr : reinterpret_cast<bf16*>(out.data_ptr<at::BFloat16>());
  const int64_t units = (Np / 16 + J - 1) / J;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) run(R, J, variant, qx, M, w, u, outf, outb);
  });
  return out;
}

// The activations' quantization alone (for the fake-quant numerics check): xq * d per element.
at::Tensor quant_dequant_x(const at::Tensor& x) {
  at::Tensor xb = x.to(at::kBFloat16).contiguous();
  const int64_t M = xb.size(0), K = xb.size(1), G = K / kGroup;
  QuantX qx;
  quantize_x(reinterpret_cast<const bf16*>(xb.data_ptr<at::BFloat16>()), M, K, qx);
  at::Tensor out = at::empty({M, K}, xb.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) o[m * K + k] = float(qx.q[m * K + k]) * qx.d[m * G + k / kGroup];
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vnni_matmul", &vnni_matmul, "int8 x int4 VNNI matmul (prototype)", pybind11::arg("x"),
        pybind11::arg("packed"), pybind11::arg("S"), pybind11::arg("Z"), pybind11::arg("SZ"), pybind11::arg("N"),
        pybind11::arg("R") = 0, pybind11::arg("J") = 0, pybind11::arg("variant") = -1, pybind11::arg("out_fp32") = false,
        pybind11::arg("prefetch") = 0);
  m.def("quant_dequant_x", &quant_dequant_x, "x quantized per row and 32-block to int8, dequantized");
}
