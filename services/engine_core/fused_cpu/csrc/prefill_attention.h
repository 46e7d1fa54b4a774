// Paged causal attention of a step's prefill chunks (GQA, K/V from the paged cache: the cached
// prefix, earlier chunks and the chunk's own rows, which rope_write_kv has just written).
// attention.h's paged_attention takes decode and verify rows, a few per request; a prefill
// chunk has hundreds, and there this kernel does the work as two small GEMMs per tile, where
// paged_attention's per-head micro-kernels lose to the eager path's SDPA past a few hundred
// tokens (benchmarks/prefill_step_cost.py).
//
// Design: flash attention over tiles, as sgl-kernel's extend_attention_cpu and flash_attn
// (sgl-project/sglang, sgl-kernel/csrc/cpu/extend.cpp, flash_attn.cpp; Apache-2.0) and
// llama.cpp's CPU flash-attn (ggml-cpu, ggml_compute_forward_flash_attn_ext) do it; none of
// their code is copied. A work item is (request, KV head, tile of kRowTile rows): the tile's
// rows x the G query heads sharing the KV head are its query vectors, so every K/V load serves
// all of them; for each block of kKeyBlock keys, scores S = Q K^T (lanes over keys, q broadcast),
// an online softmax per query vector, and acc = acc * correction + P V (lanes over head dim,
// p broadcast), both register-blocked. The K/V are converted to fp32 once per layer, keys
// transposed, by blocks of absolute positions (prepare_kv).
//
// Invariant to chunking, batch and threads (what keeps a prompt's K/V and first token the same
// however the scheduler cuts it, tests/engine_core/fused_cpu/test_prefill_attention.py and
// test_mixed.py): unlike sgl-kernel's extend kernel, which splits the context into the prefix
// and the chunk's own keys, the key blocks here are fixed runs of absolute positions, visited in
// order from position 0, and a query vector's arithmetic (each score a chain of FMAs over the
// head dim, its softmax over its own visible keys, its P V a chain of FMAs over those keys in
// order) depends only on its query, position and context: never on the other rows of its tile,
// where the tile starts, or which thread runs it. Masked keys are skipped per query vector, not
// multiplied by a zero weight (which could flip the sign of an exact zero).
#pragma once

#include <algorithm>
#include <limits>
#include <memory>
#include <vector>

#include "common.h"

namespace novainfer {
namespace prefill {

// Keys per block: the unit of the online softmax and of the K/V layout, at absolute positions
// [b * kKeyBlock, (b + 1) * kKeyBlock).
constexpr int64_t kKeyBlock = 32;
// Rows per work item: x G query vectors share each K/V block's loads. 16 rows x 3 heads keep a
// tile's scores and accumulators (48 x 32 and 48 x 64 floats) in L1.
constexpr int64_t kRowTile = 8;
constexpr int64_t W = fVec::size();
static_assert(kKeyBlock % W == 0, "a key block is whole vectors");

// Register blocking: accumulators in about 3/4 of the register file (32 zmm with AVX-512, 16 ymm
// otherwise), the rest for the loaded operands and the broadcast.
constexpr int64_t kQkKeyVecs = std::min<int64_t>(2, kKeyBlock / W);  // key vectors per QK micro-tile
constexpr int64_t kQkRows = W == 16 ? 12 : 6;                         // query vectors per QK micro-tile
constexpr int64_t kPvRows = 6;                                        // query vectors per PV micro-tile
constexpr int64_t kPvMaxVecs = W == 16 ? 4 : 2;                       // head-dim vectors per PV micro-tile

// s[m][0:kQkKeyVecs * W] = dot(q_m, key j) for M query vectors and kQkKeyVecs * W keys of a
// transposed block kt [d][kKeyBlock]: each score a chain of FMAs over the head dim in order.
template <int64_t M>
inline void qk_micro(const float* const* qs, const float* kt, int64_t d, float* s) {
  constexpr int64_t N = kQkKeyVecs;
  fVec c[M][N];
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) c[m][n] = fVec(0.f);
  }
  for (int64_t k = 0; k < d; ++k) {
    fVec b[N];
    for (int64_t n = 0; n < N; ++n) b[n] = fVec::loadu(kt + k * kKeyBlock + n * W);
    for (int64_t m = 0; m < M; ++m) {
      const fVec a(qs[m][k]);
      for (int64_t n = 0; n < N; ++n) c[m][n] = at::vec::fmadd(a, b[n], c[m][n]);
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) c[m][n].store(s + m * kKeyBlock + n * W);
  }
}

template <int64_t M = kQkRows>
inline void qk_rest(int64_t count, const float* const* qs, const float* kt, int64_t d, float* s) {
  if constexpr (M > 0) {
    if (count == M) return qk_micro<M>(qs, kt, d, s);
    qk_rest<M - 1>(count, qs, kt, d, s);
  }
}

// Scores [nq, kKeyBlock] of nq query vectors against a whole key block.
inline void qk_block(const float* const* qs, int64_t nq, const float* kt, int64_t d, float* s) {
  for (int64_t n0 = 0; n0 < kKeyBlock; n0 += kQkKeyVecs * W) {
    int64_t m = 0;
    for (; m + kQkRows <= nq; m += kQkRows) qk_micro<kQkRows>(qs + m, kt + n0, d, s + m * kKeyBlock + n0);
    qk_rest(nq - m, qs + m, kt + n0, d, s + m * kKeyBlock + n0);
  }
}

// acc_m[0:N * W] = acc_m * corr_m + sum over the keys j < visible_m, in order, of p_m[j] v[j]
// for M query vectors (acc_m, v at this column slice; v's rows dp apart). Masked: the query
// vectors see different numbers of keys (a block on the causal diagonal).
template <int64_t M, int64_t N, bool Masked>
inline void pv_micro(float* const* accs, const float* corr, const float* const* ps, const int64_t* visible,
                     const float* v, int64_t dp, int64_t n_keys) {
  fVec c[M][N];
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) c[m][n] = fVec::loadu(accs[m] + n * W) * fVec(corr[m]);
  }
  for (int64_t j = 0; j < n_keys; ++j) {
    fVec b[N];
    for (int64_t n = 0; n < N; ++n) b[n] = fVec::loadu(v + j * dp + n * W);
    for (int64_t m = 0; m < M; ++m) {
      if (Masked && j >= visible[m]) continue;
      const fVec a(ps[m][j]);
      for (int64_t n = 0; n < N; ++n) c[m][n] = at::vec::fmadd(a, b[n], c[m][n]);
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) c[m][n].store(accs[m] + n * W);
  }
}

template <int64_t N, bool Masked, int64_t M = kPvRows>
inline void pv_rest(int64_t count, float* const* accs, const float* corr, const float* const* ps,
                    const int64_t* visible, const float* v, int64_t dp, int64_t n_keys) {
  if constexpr (M > 0) {
    if (count == M) return pv_micro<M, N, Masked>(accs, corr, ps, visible, v, dp, n_keys);
    pv_rest<N, Masked, M - 1>(count, accs, corr, ps, visible, v, dp, n_keys);
  }
}

// The PV update of nq query vectors (their accumulators [dp] at accs[m]) by a block's values
// v [kKeyBlock][dp], in micro-tiles of kPvRows query vectors x N head-dim vectors.
template <int64_t N>
inline void pv_block(float* const* accs, int64_t nq, const float* corr, const float* const* ps,
                     const int64_t* visible, const float* v, int64_t dp) {
  float* cols[kPvRows];
  for (int64_t m0 = 0; m0 < nq; m0 += kPvRows) {
    const int64_t count = std::min(kPvRows, nq - m0);
    int64_t n_keys = 0;
    bool masked = false;
    for (int64_t m = 0; m < count; ++m) {
      n_keys = std::max(n_keys, visible[m0 + m]);
      masked |= visible[m0 + m] != kKeyBlock;
    }
    for (int64_t c0 = 0; c0 < dp; c0 += N * W) {
      for (int64_t m = 0; m < count; ++m) cols[m] = accs[m0 + m] + c0;
      if (masked) {
        pv_rest<N, true>(count, cols, corr + m0, ps + m0, visible + m0, v + c0, dp, n_keys);
      } else {
        pv_rest<N, false>(count, cols, corr + m0, ps + m0, visible + m0, v + c0, dp, n_keys);
      }
    }
  }
}

// Folds a block into a query vector's softmax state: its scores s [kKeyBlock] (raw dots; the
// first `visible` are its keys) become its weights p (0 past visible); returns the correction
// of its accumulator, exp(old max - new max).
inline float softmax_block(float* s, int64_t visible, float scale, float& max, float& sum) {
  const fVec vscale(scale);
  for (int64_t j = 0; j < kKeyBlock; j += W) (fVec::loadu(s + j) * vscale).store(s + j);
  for (int64_t j = visible; j < kKeyBlock; ++j) s[j] = -std::numeric_limits<float>::infinity();
  fVec top = fVec::loadu(s);
  for (int64_t j = W; j < kKeyBlock; j += W) top = at::vec::maximum(top, fVec::loadu(s + j));
  const float new_max =
      std::max(max, at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, top));
  fVec sums(0.f);
  for (int64_t j = 0; j < kKeyBlock; j += W) {
    fVec p = (fVec::loadu(s + j) - fVec(new_max)).exp_u20();
    p.store(s + j);
    if (j + W > visible) {  // the lanes of masked keys hold exactly 0
      for (int64_t i = std::max(visible, j); i < j + W; ++i) s[i] = 0.f;
      p = fVec::loadu(s + j);
    }
    sums = sums + p;
  }
  const float correction = std::exp(max - new_max);  // 0 on the first block (max = -inf)
  sum = sum * correction + at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, sums);
  max = new_max;
  return correction;
}

// One request's K and V for one KV head in fp32, by key blocks: block b's keys transposed
// [d][kKeyBlock] at kt + b * d * kKeyBlock, its values [kKeyBlock][dp] at v + b * kKeyBlock * dp;
// positions past the request's context zero.
struct KVBlocks {
  float* kt;
  float* v;
};

// Per work item scratch: query pointers, scores, softmax states, accumulators.
struct Scratch {
  std::vector<const float*> qs;
  std::vector<float> s, max, sum, corr, acc;
  std::vector<float*> accs;
  std::vector<const float*> ps;
  std::vector<int64_t> visible;

  Scratch(int64_t nq, int64_t dp)
      : qs(nq), s(nq * kKeyBlock), max(nq), sum(nq), corr(nq), acc(nq * dp), accs(nq), ps(nq), visible(nq) {}
};

template <int64_t N>
inline void pv_dispatch(Scratch& w, int64_t begin, int64_t nq, const float* v, int64_t dp) {
  pv_block<N>(w.accs.data() + begin, nq, w.corr.data() + begin, w.ps.data() + begin, w.visible.data() + begin, v,
              dp);
}

}  // namespace prefill

// q [T, n_heads, d] fp32; k_cache / v_cache [blocks, bs, n_kv, d] bf16; block_tables, query_start_loc
// and seq_lens as paged_attention's (attention.h). Computes the rows of requests first_req .. R - 1
// (prefill chunks: request r's rows at positions seq_lens[r] - q_len .. seq_lens[r] - 1, each
// attending causally to its context) into out [T, n_heads * d] bf16; other rows untouched.
inline void prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& block_tables, const at::Tensor& query_start_loc,
                              const at::Tensor& seq_lens, int64_t first_req, double scale, at::Tensor& out) {
  using namespace prefill;
  const int64_t n_heads = q.size(1), d = q.size(2);
  const int64_t bs = k_cache.size(1), n_kv = k_cache.size(2), G = n_heads / n_kv;
  const int64_t R = seq_lens.size(0);
  const int64_t dp = at::divup(d, W) * W;  // values and accumulators padded to whole vectors
  const int64_t table_stride = block_tables.stride(0);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const float* qp = q.data_ptr<float>();
  const bf16* kc = bf16_data(k_cache);
  const bf16* vc = bf16_data(v_cache);
  bf16* op = bf16_data_mut(out);
  const float sc = float(scale);
  if (first_req >= R) return;

  // The K/V of every (request, KV head) as fp32 blocks, converted once for all its tiles.
  const int64_t block_floats = kKeyBlock * (d + dp);
  std::vector<int64_t> base(R - first_req + 1, 0);  // first block of each request
  for (int64_t r = first_req; r < R; ++r) {
    TORCH_CHECK(starts[r + 1] - starts[r] <= lens[r], "request ", r, " has more rows than context");
    base[r - first_req + 1] = base[r - first_req] + at::divup(int64_t(lens[r]), kKeyBlock);
  }
  const int64_t total_blocks = base.back();
  std::unique_ptr<float[]> kv(new float[total_blocks * n_kv * block_floats]);
  const auto blocks_of = [&](int64_t r, int64_t g) {
    float* p = kv.get() + (base[r - first_req] * n_kv + g * (base[r - first_req + 1] - base[r - first_req])) *
                              block_floats;
    return KVBlocks{p, p + (base[r - first_req + 1] - base[r - first_req]) * d * kKeyBlock};
  };
  at::parallel_for(0, total_blocks * n_kv, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(d);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t global = item / n_kv, g = item % n_kv;
      const int64_t r = std::upper_bound(base.begin(), base.end(), global) - base.begin() - 1 + first_req;
      const int64_t b = global - base[r - first_req];
      const KVBlocks blocks = blocks_of(r, g);
      float* kt = blocks.kt + b * d * kKeyBlock;
      float* v = blocks.v + b * kKeyBlock * dp;
      const int32_t* table = tables + r * table_stride;
      for (int64_t j = 0; j < kKeyBlock; ++j) {
        const int64_t pos = b * kKeyBlock + j;
        if (pos >= lens[r]) {
          for (int64_t k = 0; k < d; ++k) kt[k * kKeyBlock + j] = 0.f;
          std::fill(v + j * dp, v + (j + 1) * dp, 0.f);
          continue;
        }
        const int64_t offset = ((int64_t(table[pos / bs]) * bs + pos % bs) * n_kv + g) * d;
        to_float(kc + offset, row.data(), d);
        for (int64_t k = 0; k < d; ++k) kt[k * kKeyBlock + j] = row[k];
        to_float(vc + offset, v + j * dp, d);
        std::fill(v + j * dp + d, v + (j + 1) * dp, 0.f);
      }
    }
  });

  // Work items (request, KV head, row tile), the tiles of a request dealt from both ends
  // (first, last, second, second to last, ...): a causal tile's cost grows with its position,
  // and at::parallel_for gives each thread a contiguous run of items.
  struct Work {
    int64_t req, g, row_begin, row_end;
  };
  std::vector<Work> work;
  for (int64_t r = first_req; r < R; ++r) {
    const int64_t q_len = starts[r + 1] - starts[r], tiles = at::divup(q_len, kRowTile);
    for (int64_t i = 0; i < tiles; ++i) {
      const int64_t t = i % 2 == 0 ? i / 2 : tiles - 1 - i / 2;
      for (int64_t g = 0; g < n_kv; ++g) work.push_back({r, g, t * kRowTile, std::min(q_len, (t + 1) * kRowTile)});
    }
  }

  at::parallel_for(0, int64_t(work.size()), 1, [&](int64_t begin, int64_t end) {
    Scratch w(kRowTile * G, dp);
    for (int64_t item = begin; item < end; ++item) {
      const Work& it = work[item];
      const int64_t r = it.req, g = it.g, row0 = starts[r];
      const int64_t first_pos = lens[r] - (starts[r + 1] - row0);  // the position of the request's first row
      const int64_t rows = it.row_end - it.row_begin, nq = rows * G;
      const int64_t pos0 = first_pos + it.row_begin;  // the tile's first row's position
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t h = 0; h < G; ++h) {
          const int64_t m = i * G + h;
          w.qs[m] = qp + ((row0 + it.row_begin + i) * n_heads + g * G + h) * d;
          w.accs[m] = w.acc.data() + m * dp;
          w.ps[m] = w.s.data() + m * kKeyBlock;
          w.max[m] = -std::numeric_limits<float>::infinity();
          w.sum[m] = 0.f;
        }
      }
      std::fill(w.acc.begin(), w.acc.begin() + nq * dp, 0.f);
      const KVBlocks blocks = blocks_of(r, g);
      const int64_t last_block = (pos0 + rows - 1) / kKeyBlock;
      for (int64_t b = 0; b <= last_block; ++b) {
        // The rows before i0 are at positions before the block: it is not theirs.
        const int64_t i0 = std::max<int64_t>(0, b * kKeyBlock - pos0), m0 = i0 * G, count = nq - m0;
        qk_block(w.qs.data() + m0, count, blocks.kt + b * d * kKeyBlock, d, w.s.data() + m0 * kKeyBlock);
        for (int64_t m = m0; m < nq; ++m) {
          const int64_t visible = std::min(kKeyBlock, pos0 + m / G + 1 - b * kKeyBlock);
          w.visible[m] = visible;
          w.corr[m] = softmax_block(w.s.data() + m * kKeyBlock, visible, sc, w.max[m], w.sum[m]);
        }
        const float* v = blocks.v + b * kKeyBlock * dp;
        if (dp % (kPvMaxVecs * W) == 0) {
          pv_dispatch<kPvMaxVecs>(w, m0, count, v, dp);
        } else if (dp % (2 * W) == 0) {
          pv_dispatch<2>(w, m0, count, v, dp);
        } else {
          pv_dispatch<1>(w, m0, count, v, dp);
        }
      }
      for (int64_t m = 0; m < nq; ++m) {
        const int64_t t = row0 + it.row_begin + m / G, hq = g * G + m % G;
        bf16* dst = op + (t * n_heads + hq) * d;
        const float inv = 1.f / w.sum[m];
        for (int64_t k = 0; k < d; ++k) dst[k] = bf16(w.accs[m][k] * inv);
      }
    }
  });
}

}  // namespace novainfer
