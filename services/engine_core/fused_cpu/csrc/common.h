// Shared helpers of NovaInfer's fused CPU decode kernels (see ../__init__.py).
//
// The kernels follow the design of sgl-kernel's CPU kernels (sgl-project/sglang,
// sgl-kernel/csrc/cpu: norm.cpp, rope.cpp, activation.cpp, decode.cpp; Apache-2.0): bf16 in and
// out, fp32 accumulation, one pass over each row, work split over rows (and heads) with ATen's
// at::parallel_for. The code here is written for NovaInfer's layouts; none of it is copied.
// The inner loops use ATen's own SIMD types (at::vec::Vectorized, built for the CPU's widest
// capability: extension.py defines CPU_CAPABILITY_AVX512 / _AVX2 as ATen's kernels are built),
// with scalar tails, so any head_dim and hidden size works; elementwise row loops are plain C++
// with `#pragma omp simd`, compiled -O3 -march=native.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>

namespace novainfer {

using bf16 = c10::BFloat16;

// Elementwise work on this many values or fewer runs on the calling thread: waking the OpenMP
// team costs more than a decode row's norm or activation.
constexpr int64_t kSerialElements = 1 << 15;

inline int64_t rows_grain(int64_t row_elements) {
  return std::max<int64_t>(1, kSerialElements / std::max<int64_t>(1, row_elements));
}

using fVec = at::vec::Vectorized<float>;
using bVec = at::vec::Vectorized<bf16>;

// dst[0:n] = float(src[0:n])
inline void to_float(const bf16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + bVec::size() <= n; i += bVec::size()) {
    fVec a, b;
    at::vec::load_to_float(src + i, a, b);
    a.store(dst + i);
    b.store(dst + i + fVec::size());
  }
  for (; i < n; ++i) dst[i] = float(src[i]);
}

inline float dot(const float* a, const float* b, int64_t n) {
  fVec acc(0.f);
  int64_t i = 0;
  for (; i + fVec::size() <= n; i += fVec::size()) acc = at::vec::fmadd(fVec::loadu(a + i), fVec::loadu(b + i), acc);
  float sum = at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// y[0:n] = y * scale + p * x
inline void scale_add(float* y, float scale, float p, const float* x, int64_t n) {
  const fVec vs(scale), vp(p);
  int64_t i = 0;
  for (; i + fVec::size() <= n; i += fVec::size()) {
    at::vec::fmadd(fVec::loadu(x + i), vp, fVec::loadu(y + i) * vs).store(y + i);
  }
  for (; i < n; ++i) y[i] = y[i] * scale + p * x[i];
}

inline const bf16* bf16_data(const at::Tensor& t) { return t.data_ptr<at::BFloat16>(); }
inline bf16* bf16_data_mut(at::Tensor& t) { return t.data_ptr<at::BFloat16>(); }

}  // namespace novainfer
