// Fused residual add + RMSNorm (sgl-kernel's fused_add_rmsnorm design: one pass per row that
// stores the new residual, then one that scales it; fp32 sum of squares).
#pragma once

#include "common.h"

namespace novainfer {

// For each row t of the residual stream h [T, H] (updated in place when delta is given):
//   h[t] = h[t] + delta[t];  out[t] = bf16(h[t] * rsqrt(mean(h[t]^2) + eps) * weight)
// Residual R is float (the fused decode step: the stream is never rounded, as llama.cpp keeps
// it) or bf16 (rounded after the add, as the eager model's h.add_()). delta, weight, out: bf16.
template <typename R>
inline void add_rms_norm(at::Tensor& h, const at::Tensor* delta, const at::Tensor& weight, double eps, at::Tensor& out) {
  const int64_t T = h.size(0), H = h.size(1);
  R* hp = h.data_ptr<R>();
  const bf16* dp = delta != nullptr ? bf16_data(*delta) : nullptr;
  const bf16* wp = bf16_data(weight);
  bf16* op = bf16_data_mut(out);
  at::parallel_for(0, T, rows_grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      R* x = hp + t * H;
      float sum = 0.f;
      if (dp != nullptr) {
        const bf16* d = dp + t * H;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < H; ++i) {
          const R r = R(float(x[i]) + float(d[i]));
          x[i] = r;
          const float v = float(r);
          sum += v * v;
        }
      } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < H; ++i) {
          const float v = float(x[i]);
          sum += v * v;
        }
      }
      const float inv = 1.f / std::sqrt(sum / float(H) + float(eps));
      bf16* o = op + t * H;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) {
        o[i] = bf16(float(x[i]) * inv * float(wp[i]));
      }
    }
  });
}

}  // namespace novainfer
