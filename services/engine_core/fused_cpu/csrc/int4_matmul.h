// Int4 weight-only matmul, row-invariant: out[M, N] (bf16) = x[M, K] (bf16) @ W.T, where W is
// stored as 4-bit q in groups of 32 along K with a bf16 scale and zero per (group, column):
// w = (q - 8) * scale + zero, models/int4.py's values (fused_cpu/int4_matmul.py repacks them).
//
// torch's _weight_int4pack_mm_for_cpu unpacks the weights again for every block of 4 rows, so a
// step verifying drafts pays for its weights once per 4 rows. Here a thread dequantizes a piece
// of a strip of columns (fp32, exact: one fma) once for a block of rows whose accumulators stay
// in registers, so the extra rows of a verify step cost little more than their own fmas. The
// kernels for each instruction set: int4_matmul_avx512.h, int4_matmul_avx2.h; elsewhere the
// portable loops below.
//
// Row-invariant: every output element is acc = fma(x[m, k], w[k, n], acc) for k = 0..K-1 from
// acc = 0, in fp32, whatever M, the path, the row blocking or the thread count (threads split
// the columns, never K; storing and reloading an fp32 accumulator leaves its bits), so a row's
// bits are those it gets alone (tests/engine_core/fused_cpu/test_row_invariance.py): a draft
// verified in a step gets its lone decode's bits, on every instruction set alike.
//
// Layout (int4_matmul.py; int4_layout.h): packed uint8 [ceil(N / 64), K, 32]: for column block b
// and input k, byte d holds column 64b + d in its low nibble and 64b + 32 + d in its high one
// (zero nibbles past N); scales_zeros bf16 [K / 32, 2, N].
#pragma once

#include <algorithm>
#include <vector>

#include "common.h"
#include "int4_layout.h"

#if defined(__AVX512F__)
#include "int4_matmul_avx512.h"
#elif defined(__AVX2__) && defined(__FMA__)
#include "int4_matmul_avx2.h"
#else

namespace novainfer {

// The portable path: the same fmas in the same order, left to the compiler; a unit is a strip.
struct Int4Plan {};

inline Int4Plan int4_plan(int64_t) { return {}; }

inline int64_t int4_units(const Int4Plan&, int64_t blocks) { return blocks; }

inline void int4_unit(const Int4Plan&, const float* x, int64_t M, int64_t K, const uint8_t* packed, const bf16* sz,
                      int64_t N, int64_t b, bf16* out) {
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

}  // namespace novainfer

#endif

namespace novainfer {

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
  const Int4Plan plan = int4_plan(M);
  const int64_t units = int4_units(plan, blocks);
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) int4_unit(plan, xf.data(), M, K, p, sz, N, u, o);
  });
  return out;
}

}  // namespace novainfer
