// SiLU(gate) x up (sgl-kernel's silu_and_mul design), fp32 in between, bf16 out.
#pragma once

#include "common.h"

namespace novainfer {

// gate_up [T, 2I] (gate | up, as the fused gate|up matmul writes them) -> out [T, I].
inline void silu_mul(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  const bf16* in = bf16_data(gate_up);
  bf16* op = bf16_data_mut(out);
  at::parallel_for(0, T, rows_grain(2 * I), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const bf16* g = in + t * 2 * I;
      const bf16* u = g + I;
      bf16* o = op + t * I;
      int64_t i = 0;
      for (; i + bVec::size() <= I; i += bVec::size()) {
        fVec g0, g1, u0, u1;
        at::vec::load_to_float(g + i, g0, g1);
        at::vec::load_to_float(u + i, u0, u1);
        const fVec one(1.f);
        const fVec a = g0 / (one + g0.neg().exp_u20()) * u0;
        const fVec b = g1 / (one + g1.neg().exp_u20()) * u1;
        at::vec::convert_from_float<bf16>(a, b).store(o + i);
      }
      for (; i < I; ++i) {
        const float x = float(g[i]);
        o[i] = bf16(x / (1.f + std::exp(-x)) * float(u[i]));
      }
    }
  });
}

}  // namespace novainfer
