// Int4 weights x int8 activations, row-invariant: out[M, N] (bf16) ~= x[M, K] (bf16) @ W.T, where
// W is stored as 4-bit q in groups of 32 along K with a bf16 scale and zero per (group, column):
// w = (q - 8) * scale + zero, models/int4.py's values (fused_cpu/int4_matmul.py repacks them into
// int4_layout.h's layout), and x is quantized per row and 32-input block to int8 first
// (quantize_rows.h: llama.cpp's q8_1 scheme, d = max |x| / 127, xq = round(x * (1 / d))).
//
// Why int8 activations: the products are then integer dot products (4 u8 x s8 multiply-adds a
// 32-bit lane, exact), not a dequantized fp32 weight and an fma per weight and row, so the extra
// rows of a step verifying drafts cost 2.5-3.2x less than with the fp32-dequantizing kernel
// before it (this kernel's prototype with AVX512-VNNI on a Zen 4: a 30-layer pass at 9 rows 1.83x
// faster, benchmarks/int8_activations/README.md). The price: per output an error of 0.4-0.9 % of
// its row's rms (the activations' int8 rounding) and perplexity +0.49 % on SmolLM2 (7.839 ->
// 7.877; llama.cpp's own Q4_1 x q8_1: 7.884, ibid.). Every int4 row takes it, decode and verify
// alike, so a draft verified in a step still gets its lone decode's bits.
//
// Per row m, column n and group g (inputs 32g .. 32g + 31), with the row's d, c = -8 d sum xq and
// s = d sum xq of that block (quantize_rows.h):
//   sum_k x w ~= scale * d * (sum_k q xq - 8 sum_k xq) + zero * d sum_k xq
// and the kernels compute, from acc = 0, for g = 0..G-1 in order (fp32, each an fma):
//   u = fma(float(dot), d, c); acc = fma(u, scale, acc); acc = fma(zero, s, acc),
// dot = sum_k q xq (int32, exact), then out = bf16(acc). The zero-point term takes sum x as
// d * sum xq, not the exact sum of x: then the result is exactly sum_k (d xq_k) w_k, while the
// exact sum leaves an error sum_k e_k (w_k - zero) (e = x - d xq), larger where a group's weights
// centre on 0 and zero does not (benchmarks/int8_activations/check.py, q 576 x 576: mean error
// 8.4e-3 of a row's rms, against 8.7e-3 with the exact sum).
//
// Row-invariant: a row's int8 values depend on that row alone, the dots are exact, and its fp32
// ops are the same in the same order whatever M, the instruction set, the row blocking or the
// thread count (threads split the columns, never K), so a row's bits are those it gets alone
// (tests/engine_core/fused_cpu/test_row_invariance.py): a draft verified in a step gets its lone
// decode's bits, on every instruction set alike (each equals the torch reference
// tests/engine_core/fused_cpu/int4_reference.py bit for bit: test_int4_matmul.py). The kernels
// for each instruction set: int4_matmul_avx512.h, int4_matmul_avx2.h; elsewhere the portable
// loops below.
#pragma once

#include <cmath>

#include "common.h"
#include "int4_layout.h"
#include "quantize_rows.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include "int4_matmul_avx512.h"
#elif defined(__AVX2__) && defined(__FMA__)
#include "int4_matmul_avx2.h"
#else

namespace novainfer {

// The portable path: the same integers and fp32 ops, left to the compiler; a unit is a vector.
struct Int4Plan {};

inline Int4Plan int4_plan(int64_t) { return {}; }

inline int64_t int4_units(const Int4Plan&, int64_t vectors) { return vectors; }

inline void int4_unit(const Int4Plan&, const QuantizedRows& x, int64_t M, int64_t K, const uint8_t* packed,
                      const bf16* sz, int64_t N, int64_t v, bf16* out) {
  const int64_t G = K / kInt4Group, chunks = K / kInt4Chunk, per_group = kInt4Group / kInt4Chunk;
  const uint8_t* lines = packed + v * chunks * 64;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xq = x.q.data() + m * K;
    float acc[kInt4Vector] = {};
    for (int64_t g = 0; g < G; ++g) {
      int32_t dot[kInt4Vector] = {};
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        const uint8_t* line = lines + c * 64;
        for (int64_t l = 0; l < kInt4Vector; ++l)
          for (int64_t i = 0; i < 4; ++i) {
            const uint8_t byte = line[4 * l + i];
            dot[l] += (byte & 0xF) * xq[kInt4Chunk * c + i] + (byte >> 4) * xq[kInt4Chunk * c + 4 + i];
          }
      }
      const int64_t i = m * G + g;
      for (int64_t l = 0; l < kInt4Vector; ++l) {
        const int64_t col = kInt4Vector * v + l;
        const float u = std::fma(float(dot[l]), x.d[i], x.c[i]);
        acc[l] = std::fma(u, float(sz[(2 * g) * N + col]), acc[l]);
        acc[l] = std::fma(float(sz[(2 * g + 1) * N + col]), x.s[i], acc[l]);
      }
    }
    for (int64_t l = 0; l < kInt4Vector; ++l) out[m * N + kInt4Vector * v + l] = bf16(acc[l]);
  }
}

}  // namespace novainfer

#endif

namespace novainfer {

// out [M, N] bf16 = x [M, K] bf16 (quantized as above) @ W.T, W packed as int4_layout.h says.
inline at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x must be contiguous bf16 [M, K]");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(2) == 64 && packed.is_contiguous(),
              "packed must be contiguous uint8 [N / 16, K / 8, 64]");
  TORCH_CHECK(scales_zeros.scalar_type() == at::kBFloat16 && scales_zeros.dim() == 3 && scales_zeros.size(1) == 2 &&
                  scales_zeros.is_contiguous(),
              "scales_zeros must be contiguous bf16 [K / 32, 2, N]");
  const int64_t M = x.size(0), K = x.size(1), N = scales_zeros.size(2), vectors = packed.size(0);
  TORCH_CHECK(K % kInt4Group == 0 && packed.size(1) == K / kInt4Chunk && scales_zeros.size(0) == K / kInt4Group &&
                  N % kInt4Vector == 0 && vectors == N / kInt4Vector,
              "x, packed and scales_zeros disagree on K or N");
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  // x quantized once, for every unit (the same values whichever thread reads them), into the
  // calling thread's buffers, reused across calls; the workers read them through this reference
  // (a thread_local named inside the lambda would be each worker's own, empty).
  thread_local QuantizedRows tl_rows;
  quantize_rows(bf16_data(x), M, K, tl_rows);
  const QuantizedRows& rows = tl_rows;
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const bf16* sz = bf16_data(scales_zeros);
  bf16* o = bf16_data_mut(out);
  const Int4Plan plan = int4_plan(M);
  at::parallel_for(0, int4_units(plan, vectors), 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) int4_unit(plan, rows, M, K, p, sz, N, u, o);
  });
  return out;
}

}  // namespace novainfer
