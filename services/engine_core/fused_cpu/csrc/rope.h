// RoPE on q and k, with the new k and v written straight into their paged KV-cache slots
// (sgl-kernel's rotary + store-cache fusion: the rotated key never round-trips through a
// tensor of its own).
#pragma once

#include <vector>

#include "common.h"

namespace novainfer {

struct QKVLayout {
  int64_t n_heads, n_kv, d;
};

// qkv [T, (n_heads + 2 n_kv) d] bf16: each row's q heads, then k heads, then v heads.
// bias [(n_heads + 2 n_kv) d] (Qwen2) is added first, rounded to bf16 as the eager `qkv += bias`;
// q_norm / k_norm [d] (Qwen3) RMS-normalise each q / k head before the rotation.
// cos / sin [max_pos, d] are the model's tables: cos repeated over both halves, sin with its first
// half negated, so rotate_half(x) * sin == roll(x, d / 2) * sin (the half-split / NeoX layout).
// Writes q [T, n_heads, d] in fp32 (the attention kernel's input, never rounded to bf16) and the
// rotated k and the v of row t at flat slot slots[t] of k_cache / v_cache [blocks, bs, n_kv, d].
inline void rope_write_kv(const at::Tensor& qkv, const at::Tensor* bias, const at::Tensor* q_norm,
                          const at::Tensor* k_norm, double eps, const at::Tensor& positions, const at::Tensor& cos,
                          const at::Tensor& sin, const at::Tensor& slots, QKVLayout lay, at::Tensor& q,
                          at::Tensor& k_cache, at::Tensor& v_cache) {
  const int64_t T = qkv.size(0), d = lay.d, half = d / 2;
  const int64_t heads = lay.n_heads + 2 * lay.n_kv, row = heads * d;
  const bf16* in = bf16_data(qkv);
  const bf16* bp = bias != nullptr ? bf16_data(*bias) : nullptr;
  const bf16* qn = q_norm != nullptr ? bf16_data(*q_norm) : nullptr;
  const bf16* kn = k_norm != nullptr ? bf16_data(*k_norm) : nullptr;
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const bf16* cp = bf16_data(cos);
  const bf16* sp = bf16_data(sin);
  float* qp = q.data_ptr<float>();
  bf16* kc = bf16_data_mut(k_cache);
  bf16* vc = bf16_data_mut(v_cache);
  at::parallel_for(0, T, rows_grain(row), [&](int64_t begin, int64_t end) {
    std::vector<float> x(d);
    for (int64_t t = begin; t < end; ++t) {
      const bf16* c = cp + pos[t] * d;
      const bf16* s = sp + pos[t] * d;
      const bf16* r = in + t * row;
      bf16* k_dst = kc + slot[t] * lay.n_kv * d;
      bf16* v_dst = vc + slot[t] * lay.n_kv * d;
      for (int64_t h = 0; h < heads; ++h) {
        const bf16* src = r + h * d;
        if (h >= lay.n_heads + lay.n_kv) {  // v: copied as it is
          bf16* dst = v_dst + (h - lay.n_heads - lay.n_kv) * d;
          for (int64_t i = 0; i < d; ++i) {
            dst[i] = bp != nullptr ? bf16(float(src[i]) + float(bp[h * d + i])) : src[i];
          }
          continue;
        }
        for (int64_t i = 0; i < d; ++i) {
          x[i] = bp != nullptr ? float(bf16(float(src[i]) + float(bp[h * d + i]))) : float(src[i]);
        }
        const bf16* w = h < lay.n_heads ? qn : kn;
        if (w != nullptr) {
          float sum = 0.f;
          for (int64_t i = 0; i < d; ++i) sum += x[i] * x[i];
          const float inv = 1.f / std::sqrt(sum / float(d) + float(eps));
          for (int64_t i = 0; i < d; ++i) x[i] = x[i] * inv * float(w[i]);
        }
        if (h < lay.n_heads) {
          float* dst = qp + (t * lay.n_heads + h) * d;
          for (int64_t i = 0; i < d; ++i) {
            dst[i] = x[i] * float(c[i]) + x[i < half ? i + half : i - half] * float(s[i]);
          }
        } else {
          bf16* dst = k_dst + (h - lay.n_heads) * d;
          for (int64_t i = 0; i < d; ++i) {
            dst[i] = bf16(x[i] * float(c[i]) + x[i < half ? i + half : i - half] * float(s[i]));
          }
        }
      }
    }
  });
}

}  // namespace novainfer
