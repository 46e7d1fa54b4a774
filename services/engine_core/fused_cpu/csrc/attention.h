// Paged causal attention of a step's rows grouped by request (decode rows, and a decode row with
// the speculative drafts it verifies), GQA, K/V read in place through the block table. The
// design follows sgl-kernel's decode_attention_cpu and extend_attention_cpu (sgl-project/sglang,
// sgl-kernel/csrc/cpu, Apache-2.0; none of their code is copied): flash decoding, the context cut
// into splits so that even one request with a few KV heads gives every thread work; each
// (request, split, KV heads) work item runs an online softmax in fp32 over its tokens, per KV
// head, for all the query heads of all the request's rows that share it, so each K/V row is
// read and converted once for a verify group's 1 + k rows x G heads, and its micro-kernels take
// those heads in register blocks (each fp32 key or value vector loaded feeds several heads'
// FMAs); an item takes all of a slot's KV heads where the step has splits enough for the
// threads (its K/V read in address order: ChunkKV), one otherwise; the item that completes a
// row's splits for its KV heads merges them by their log-sum-exp, in the same parallel region
// (one fork-join a call; each thread's chunk and score buffers kept across calls).
//
// Batch-invariant: the splits are fixed runs of kSplitTokens positions, merged in order, and a
// head's arithmetic does not depend on which heads share its work item, so a row's output bits
// depend on its own query, context and position only: the same alone, in any batch, at any
// thread count, and as a row of a verify group or as a decode row at the same position, which is
// what keeps greedy output unchanged by speculation (fused_cpu/decode.py).
#pragma once

#include <algorithm>
#include <atomic>
#include <limits>
#include <memory>
#include <vector>

#include "common.h"

namespace novainfer {

// Tokens per online-softmax chunk, and per split (a multiple of kChunk). Splits of 64..512
// tokens cost the same on the 2-core dev machine at batch 1 and 8 (benchmarks/
// paged_attention_kernel.py); 128 gives a single 600-token row with 3 KV heads 15 work items,
// enough for a few threads.
constexpr int64_t kChunk = 32;
constexpr int64_t kSplitTokens = 128;

static_assert(kSplitTokens % kChunk == 0, "chunks never straddle a split");
static_assert(kChunk % 16 == 0, "a chunk is whole 8-key transpose blocks and whole vectors");
// Floats of a work item's chunk buffers (ChunkKV) at most: its KV heads' keys and values stay
// in L1 and L2 (48 KiB for SmolLM2's 3 heads of 64).
constexpr int64_t kChunkFloats = 16384;

// slots[j] = the element offset of position c0 + j's slot (its n_kv heads' rows, KV head 0
// first) in a paged cache [blocks, bs, n_kv, d], for j < n: a block's positions are consecutive
// slots (no division a position).
inline void slot_offsets(const int32_t* table, int64_t bs, int64_t n_kv, int64_t d, int64_t c0, int64_t n,
                         int64_t* slots) {
  const int64_t slot = n_kv * d;
  int64_t b = c0 / bs, in_block = c0 % bs;
  for (int64_t j = 0; j < n;) {
    const int64_t run = std::min(bs - in_block, n - j);
    const int64_t base = (int64_t(table[b]) * bs + in_block) * slot;
    for (int64_t i = 0; i < run; ++i) slots[j + i] = base + i * slot;
    j += run;
    ++b;
    in_block = 0;
  }
}

// A chunk of the context for the KV heads [g0, g0 + heads) of a work item, read from the paged
// cache and converted to fp32 once for every query head of the item: per KV head, the keys
// transposed, [d, kChunk] (zero past a short last chunk: scores nobody reads, computed with the
// rest), so that QK is FMAs of broadcast query elements into kChunk scores at once with no
// horizontal sums; the values [kChunk, d]. An item takes every KV head of a slot where it can:
// its reads then run through each slot's K (and V) rows in address order, which the hardware
// prefetchers follow; a KV head's rows alone are 2 d bytes every 2 n_kv d, which they do not,
// and a decode step's K/V come from memory (the layers' weights stream through the caches
// between two layers' attention): reading them by KV head made the kernel wait on its loads
// (benchmarks/paged_attention_kernel.py --layers).
struct ChunkKV {
  std::vector<float> keys_t_buf, values_buf;
  int64_t d = 0;

  // Sized for `heads` KV heads of size d_ (a thread keeps one across calls: no allocation a call).
  void reset(int64_t d_, int64_t heads) {
    d = d_;
    if (int64_t(keys_t_buf.size()) < heads * d * kChunk) {
      keys_t_buf.resize(heads * d * kChunk);
      values_buf.resize(heads * kChunk * d);
    }
  }

  float* keys_t(int64_t h) { return keys_t_buf.data() + h * d * kChunk; }
  float* values(int64_t h) { return values_buf.data() + h * kChunk * d; }

  void load(const bf16* kc, const bf16* vc, const int32_t* table, int64_t bs, int64_t n_kv, int64_t g0,
            int64_t heads, int64_t c0, int64_t n, const bf16* zeros) {
    int64_t slots[kChunk];
    slot_offsets(table, bs, n_kv, d, c0, n, slots);
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t h = 0; h < heads; ++h) to_float(vc + slots[j] + (g0 + h) * d, values(h) + j * d, d);
    }
    for (int64_t j0 = 0; j0 < kChunk; j0 += 8) {
      for (int64_t h = 0; h < heads; ++h) {
        const bf16* rows[8];
        for (int64_t j = 0; j < 8; ++j) {
          // d zeros: a short chunk's missing keys, never a slot past the context
          rows[j] = j0 + j < n ? kc + slots[j0 + j] + (g0 + h) * d : zeros;
        }
        transpose_keys(rows, keys_t(h) + j0);
      }
    }
  }

 private:
  // out[i * kChunk + j] = float(rows[j][i]) for 8 keys j (out: a head's keys_t at the block's
  // first key).
  void transpose_keys(const bf16* const* rows, float* out) const {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    if (d % 16 == 0) {
      // Blocks of 8 keys x 16 dimensions: the dimension pairs (2p, 2p + 1) as 32-bit words, an
      // 8 x 8 transpose of the words, then each word split into its two bf16 halves as fp32.
      const __m256i high = _mm256_set1_epi32(int32_t(0xFFFF0000u));
      for (int64_t i0 = 0; i0 < d; i0 += 16) {
        __m256 r[8];
        for (int64_t k = 0; k < 8; ++k) {
          r[k] = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[k] + i0)));
        }
        __m256 w[8];
        transpose_8x8(r, w);  // w[p] = the 8 keys' pair p
        for (int64_t p = 0; p < 8; ++p) {
          const __m256i x = _mm256_castps_si256(w[p]);
          float* even = out + (i0 + 2 * p) * kChunk;
          _mm256_storeu_ps(even, _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)));
          _mm256_storeu_ps(even + kChunk, _mm256_castsi256_ps(_mm256_and_si256(x, high)));
        }
      }
      return;
    }
#endif
    for (int64_t j = 0; j < 8; ++j) {
      for (int64_t i = 0; i < d; ++i) out[i * kChunk + j] = float(rows[j][i]);
    }
  }

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  // out[c] = lane c of every r[k], in k order.
  static void transpose_8x8(const __m256* r, __m256* out) {
    __m256 t[8], u[8];
    for (int k = 0; k < 4; ++k) {
      t[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
      t[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    for (int h = 0; h < 2; ++h) {  // rows 4h .. 4h + 3
      u[4 * h] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
      u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
      u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
      u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      out[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
      out[c + 4] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
    }
  }
#endif
};

// The micro-kernels of paged_attention: register blocks of M query heads (a verify group's rows x
// the G heads of a KV head, consecutive) x a few vectors of keys (QK) or of the head's
// dimensions (PV), as a GEMM's micro-kernel blocks its output (BLIS's 6 x 16 single-precision
// block on AVX2): each key or value vector loaded feeds M heads' accumulators, each broadcast
// query element or probability those of the block's vectors. Every output element is one chain
// of FMAs in a fixed order (over the dimensions for a score, over the chunk's tokens for an
// output) whatever block computes it, so a head's bits are the same in any group of heads and
// any blocking: a verify row's are those of the same row alone as a decode row.

// Vector registers (AVX2's 16 ymm, AVX-512's 32 zmm), and the accumulators of a full block: 12
// ymm (operand vectors and a broadcast beside them), 16 zmm.
constexpr int64_t kVecRegs = fVec::size() == 16 ? 32 : 16;
constexpr int64_t kBlockAccs = fVec::size() == 16 ? 16 : 12;
constexpr int64_t kKeyVecs = kChunk / fVec::size();  // vectors of a chunk's keys

// Key vectors of a full QK block (2: 16 keys on AVX2, the whole chunk on AVX-512) and its heads.
constexpr int64_t kQKVecs = 2;
constexpr int64_t kQKHeads = kBlockAccs / kQKVecs;
static_assert(kKeyVecs % kQKVecs == 0, "whole QK blocks a chunk");
// Dimension vectors of a full PV block and its heads (AVX2: 6 heads x 16 dimensions; AVX-512: 4
// heads x 64).
constexpr int64_t kPVVecs = fVec::size() == 16 ? 4 : 2;
constexpr int64_t kPVHeads = kBlockAccs / kPVVecs;
static_assert(kPVHeads * kPVVecs + kPVVecs + 1 <= kVecRegs, "a full PV block fits the registers");

// The vectors of a block of m < full heads (a chunk's last heads): the most, up to `most` and
// dividing it, whose m x v accumulators fit a block and, with the v operand vectors and a
// broadcast, the registers (no spills: AVX-512's 1 head takes 8 output vectors, AVX2's 4).
constexpr int64_t block_vecs(int64_t m, int64_t most) {
  int64_t v = most;
  while (v > 1 && (m * v > kBlockAccs || m * v + v + 1 > kVecRegs || most % v != 0)) --v;
  return v;
}
static_assert(kQKHeads * kQKVecs + kQKVecs + 1 <= kVecRegs, "a full QK block fits the registers");

// Scores s[m, 0:C W] = scale * dot(q_m, keys[j]) of M query heads and C vectors of keys (keys_t:
// the block's first key of a chunk's [d, kChunk]; s: its first score of rows kChunk apart), each
// a chain of FMAs over the dimensions in order (s = q[0] k[0], then s += q[i] k[i]).
template <int64_t M, int64_t C>
inline void qk_block(const float* const* qs, const float* keys_t, int64_t d, float scale, float* s) {
  fVec acc[M][C];
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = 0; c < C; ++c) acc[m][c] = fVec(0.f);
  }
  for (int64_t i = 0; i < d; ++i) {
    fVec k[C];
    for (int64_t c = 0; c < C; ++c) k[c] = fVec::loadu(keys_t + i * kChunk + c * fVec::size());
    for (int64_t m = 0; m < M; ++m) {
      const fVec q(qs[m][i]);
      for (int64_t c = 0; c < C; ++c) acc[m][c] = at::vec::fmadd(q, k[c], acc[m][c]);
    }
  }
  const fVec vs(scale);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = 0; c < C; ++c) (acc[m][c] * vs).store(s + m * kChunk + c * fVec::size());
  }
}

// A chunk's scores of M heads, in blocks of C key vectors.
template <int64_t M, int64_t C>
inline void qk_heads(const float* const* qs, const float* keys_t, int64_t d, float scale, float* s) {
  for (int64_t c0 = 0; c0 < kKeyVecs; c0 += C) {
    const int64_t j0 = c0 * fVec::size();
    qk_block<M, C>(qs, keys_t + j0, d, scale, s + j0);
  }
}

// The last count < kQKHeads heads of a chunk.
template <int64_t M = kQKHeads - 1>
inline void qk_rest(const float* const* qs, int64_t count, const float* keys_t, int64_t d, float scale, float* s) {
  if constexpr (M > 0) {
    if (count == M) return qk_heads<M, block_vecs(M, kKeyVecs)>(qs, keys_t, d, scale, s);
    qk_rest<M - 1>(qs, count, keys_t, d, scale, s);
  }
}

// Scores [nq, kChunk] of nq query heads against a chunk's transposed keys [d, kChunk].
inline void qk_chunk(const float* const* qs, int64_t nq, const float* keys_t, int64_t d, float scale, float* s) {
  int64_t h = 0;
  for (; h + kQKHeads <= nq; h += kQKHeads) qk_heads<kQKHeads, kQKVecs>(qs + h, keys_t, d, scale, s + h * kChunk);
  qk_rest(qs + h, nq - h, keys_t, d, scale, s + h * kChunk);
}

// A query head's running state in one split: unnormalised output [d], max and sum of exp, and
// how many of the current chunk's tokens it sees.
struct HeadState {
  float* acc;
  float* max;
  float* sum;
  int64_t visible;
};

// acc_m[i0 : i0 + V W] = acc_m * correction_m + sum_j p_m[j] values[j] for M heads seeing the
// same n tokens (p_m: rows kChunk apart), the accumulators in registers: per element, one
// product by the correction, then one FMA a token in order.
template <int64_t M, int64_t V>
inline void pv_block(const HeadState* heads, const float* corrections, const float* p, const float* values, int64_t d,
                     int64_t i0, int64_t n) {
  fVec a[M][V];
  for (int64_t m = 0; m < M; ++m) {
    const fVec correction(corrections[m]);
    for (int64_t v = 0; v < V; ++v) a[m][v] = fVec::loadu(heads[m].acc + i0 + v * fVec::size()) * correction;
  }
  for (int64_t j = 0; j < n; ++j) {
    fVec x[V];
    for (int64_t v = 0; v < V; ++v) x[v] = fVec::loadu(values + j * d + i0 + v * fVec::size());
    for (int64_t m = 0; m < M; ++m) {
      const fVec pj(p[m * kChunk + j]);
      for (int64_t v = 0; v < V; ++v) a[m][v] = at::vec::fmadd(pj, x[v], a[m][v]);
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t v = 0; v < V; ++v) a[m][v].store(heads[m].acc + i0 + v * fVec::size());
  }
}

// PV of M heads over the dimensions [i0, d) (d a multiple of the vector size): blocks of V
// vectors, the rest in blocks of V / 2, V / 4, ... (d = 64 in one block of 4 zmm where V = 8).
template <int64_t M, int64_t V>
inline void pv_heads(const HeadState* heads, const float* corrections, const float* p, const float* values, int64_t d,
                     int64_t n, int64_t i0 = 0) {
  for (; i0 + V * fVec::size() <= d; i0 += V * fVec::size()) pv_block<M, V>(heads, corrections, p, values, d, i0, n);
  if constexpr (V > 1) {
    if (i0 < d) pv_heads<M, V / 2>(heads, corrections, p, values, d, n, i0);
  }
}

// The last count < kPVHeads heads of a run.
template <int64_t M = kPVHeads - 1>
inline void pv_rest(const HeadState* heads, int64_t count, const float* corrections, const float* p,
                    const float* values, int64_t d, int64_t n) {
  if constexpr (M > 0) {
    if (count == M) return pv_heads<M, block_vecs(M, 8)>(heads, corrections, p, values, d, n);
    pv_rest<M - 1>(heads, count, corrections, p, values, d, n);
  }
}

// exp(delta), delta = the old running max - the new: std::exp's own value, without calling it
// where that value is exact (an unchanged max: exp(0) = 1; a head's first chunk, max -inf:
// exp(-inf) = 0), which most chunks are.
inline float correction(float delta) {
  if (delta == 0.f) return 1.f;
  if (delta == -std::numeric_limits<float>::infinity()) return 0.f;
  return std::exp(delta);
}

// Folds a chunk into nq heads' states: each head's scores (s [nq, kChunk], overwritten by their
// exp) over its visible tokens update its max and sum; then acc = acc * correction + P V, the
// heads that see the same tokens (consecutive: visible grows with the row) sharing V's loads.
inline void online_softmax_pv(const HeadState* heads, int64_t nq, float* s, const float* values, int64_t d) {
  constexpr int64_t kRun = 64;  // heads per run at most (a longer run is cut: each head is on its own anyway)
  float corrections[kRun];
  for (int64_t first = 0; first < nq;) {
    // A run of heads that see the same tokens.
    int64_t count = 1;
    while (first + count < nq && count < kRun && heads[first + count].visible == heads[first].visible) ++count;
    for (int64_t e = 0; e < count; ++e) {
      const HeadState& hs = heads[first + e];
      float* p = s + (first + e) * kChunk;
      const int64_t n = hs.visible;
      const int64_t whole = n / fVec::size() * fVec::size();
      float new_max = *hs.max;
      if (whole > 0) {
        fVec top = fVec::loadu(p);
        for (int64_t j = fVec::size(); j < whole; j += fVec::size()) top = at::vec::maximum(top, fVec::loadu(p + j));
        const auto larger = [](fVec& a, fVec& b) { return at::vec::maximum(a, b); };
        new_max = std::max(new_max, at::vec::vec_reduce_all<float>(larger, top));
      }
      for (int64_t j = whole; j < n; ++j) new_max = std::max(new_max, p[j]);
      fVec sums(0.f);
      for (int64_t j = 0; j < whole; j += fVec::size()) {
        const fVec x = (fVec::loadu(p + j) - fVec(new_max)).exp_u20();
        x.store(p + j);
        sums = sums + x;
      }
      float chunk_sum = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, sums);
      for (int64_t j = whole; j < n; ++j) {
        p[j] = std::exp(p[j] - new_max);
        chunk_sum += p[j];
      }
      corrections[e] = correction(*hs.max - new_max);
      *hs.sum = *hs.sum * corrections[e] + chunk_sum;
      *hs.max = new_max;
    }
    const HeadState* run = heads + first;
    const float* p = s + first * kChunk;
    const int64_t n = run[0].visible;
    if (d % fVec::size() == 0) {
      int64_t h = 0;
      for (; h + kPVHeads <= count; h += kPVHeads) {
        pv_heads<kPVHeads, kPVVecs>(run + h, corrections + h, p + h * kChunk, values, d, n);
      }
      pv_rest(run + h, count - h, corrections + h, p + h * kChunk, values, d, n);
    } else {
      for (int64_t e = 0; e < count; ++e) {
        for (int64_t j = 0; j < n; ++j) {
          scale_add(run[e].acc, j == 0 ? corrections[e] : 1.f, p[e * kChunk + j], values + j * d, d);
        }
      }
    }
    first += count;
  }
}

// Grows v to at least n elements (a thread's scratch, kept across calls).
template <typename T>
inline T* at_least(std::vector<T>& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(n);
  return v.data();
}

// A thread's buffers, kept across calls (no allocation a call).
struct PagedScratch {
  ChunkKV chunk;
  std::vector<float> score, o;
  std::vector<const float*> queries;
  std::vector<HeadState> heads;
};

// Looked up once a parallel region: a thread_local used in the kernel's loops cost a
// __tls_get_addr call (and a vzeroupper) a key row in this shared library.
[[gnu::noinline]] inline PagedScratch& thread_scratch() {
  thread_local PagedScratch scratch;
  return scratch;
}

// Merges a row's splits for the query heads [h0, h0 + count), in split order: weights
// exp(m_s - max_s m_s); the splits past the row's position (a verify group's earlier rows) have
// l = 0 and m = -inf and are skipped, so a row merges exactly what a decode row at its position
// merges.
inline void merge_splits(const float* acc, const float* mx, const float* sum, int64_t base, int64_t splits,
                         int64_t n_heads, int64_t h0, int64_t count, int64_t d, float* o, bf16* dst) {
  for (int64_t hq = h0; hq < h0 + count; ++hq) {
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < splits; ++s) top = std::max(top, mx[(base + s) * n_heads + hq]);
    std::fill(o, o + d, 0.f);
    float total = 0.f;
    for (int64_t s = 0; s < splits; ++s) {
      const int64_t idx = (base + s) * n_heads + hq;
      if (sum[idx] == 0.f) continue;
      const float w = std::exp(mx[idx] - top);
      total += w * sum[idx];
      scale_add(o, 1.f, w, acc + idx * d, d);
    }
    const float inv = 1.f / total;
    for (int64_t i = 0; i < d; ++i) dst[hq * d + i] = bf16(o[i] * inv);
  }
}

// q [T, n_heads, d] fp32; k_cache / v_cache [blocks, bs, n_kv, d] bf16; block_tables [R, >= blocks
// of the request's context] int32; query_start_loc [R + 1] int32 (request r's rows are
// query_start_loc[r] .. query_start_loc[r + 1] - 1); seq_lens [R] int32 (the context after this
// step, its rows included: request r's rows are at positions seq_lens[r] - q_len .. seq_lens[r] - 1).
// out [T, n_heads * d] bf16.
inline void paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& query_start_loc,
                            const at::Tensor& seq_lens, double scale, at::Tensor& out) {
  const int64_t T = q.size(0), n_heads = q.size(1), d = q.size(2);
  const int64_t bs = k_cache.size(1), n_kv = k_cache.size(2), G = n_heads / n_kv;
  const int64_t R = seq_lens.size(0);
  const int64_t table_stride = block_tables.stride(0);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const float* qp = q.data_ptr<float>();
  const bf16* kc = bf16_data(k_cache);
  const bf16* vc = bf16_data(v_cache);
  bf16* op = bf16_data_mut(out);
  const float sc = float(scale);

  // Per row, its request's splits' states (unnormalised output [n_heads, d], running max and
  // sum [n_heads]) from row_base[t] on.
  std::vector<int64_t> row_base(T + 1, 0);
  int64_t max_q_len = 1, total_splits = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t q_len = starts[r + 1] - starts[r];
    TORCH_CHECK(q_len <= lens[r], "request ", r, " has more rows than context");
    const int64_t splits = at::divup(int64_t(lens[r]), kSplitTokens);
    for (int64_t t = starts[r]; t < starts[r + 1]; ++t) row_base[t + 1] = row_base[t] + splits;
    max_q_len = std::max(max_q_len, q_len);
    total_splits += splits;
  }
  // Work items (part of a request's rows, split, group of KV heads). An item takes all the KV
  // heads (as many as kChunkFloats holds: ChunkKV) where there are splits enough for the
  // threads; a step of a few short requests has fewer (request, split) pairs than several
  // threads want: then an item takes one KV head, and if (request, split, KV head) triples are
  // still fewer than 4 a thread, a verify group's rows are dealt out in up to `parts` parts,
  // each re-reading the split (cheap next to idle threads). Which item computes a head never
  // changes its arithmetic.
  const int64_t threads = at::get_num_threads();
  int64_t kv_per_item = std::clamp<int64_t>(kChunkFloats / (2 * d * kChunk), 1, n_kv), parts = 1;
  if (threads > 1 && total_splits < 2 * threads) {
    kv_per_item = 1;
    parts = std::min(max_q_len, at::divup(4 * threads, std::max<int64_t>(1, total_splits * n_kv)));
  }
  const int64_t groups = at::divup(n_kv, kv_per_item);
  struct Part {
    int64_t req, row_begin, row_end, splits;
  };
  struct Work {
    int64_t part, split;
  };
  std::vector<Part> part_list;
  std::vector<Work> work;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t q_len = starts[r + 1] - starts[r], p = std::min(parts, q_len);
    const int64_t splits = at::divup(int64_t(lens[r]), kSplitTokens);
    for (int64_t i = 0; i < p; ++i) part_list.push_back({r, i * q_len / p, (i + 1) * q_len / p, splits});
    for (int64_t s = 0; s < splits; ++s) {
      for (int64_t i = 0; i < p; ++i) work.push_back({int64_t(part_list.size()) - p + i, s});
    }
  }
  const int64_t states = row_base[T] * n_heads;
  // The outputs are left unset here (zeroing a long verify step's would cost more than its
  // attention): each work item zeroes those of the rows that see its split; the merge skips the
  // others (sum 0).
  // Allocated per call (a long prefill chunk's states would stay resident if kept).
  std::unique_ptr<float[]> acc_buf(new float[states * d]);
  std::vector<float> mx_buf(states, -std::numeric_limits<float>::infinity()), sum_buf(states, 0.f);
  float* acc = acc_buf.get();
  float* mx = mx_buf.data();
  float* sum = sum_buf.data();
  // Per (part, KV head group), its splits done: the item that completes them merges the part's
  // rows for the group's query heads, in the same parallel region (one fork-join a call).
  std::unique_ptr<std::atomic<int64_t>[]> done(new std::atomic<int64_t>[part_list.size() * groups]);
  for (size_t i = 0; i < part_list.size() * groups; ++i) done[i].store(0, std::memory_order_relaxed);
  const int64_t max_heads = max_q_len * G;  // query heads of one KV head that a work item updates
  const std::vector<bf16> zeros(d, bf16(0.f));

  at::parallel_for(0, int64_t(work.size()) * groups, 1, [&](int64_t begin, int64_t end) {
    PagedScratch& scratch = thread_scratch();
    ChunkKV& chunk = scratch.chunk;
    chunk.reset(d, kv_per_item);
    float* score = at_least(scratch.score, max_heads * kChunk);
    float* o = at_least(scratch.o, d);
    const float** queries = at_least(scratch.queries, max_heads);
    HeadState* heads = at_least(scratch.heads, max_heads);
    for (int64_t item = begin; item < end; ++item) {
      const Work& w = work[item / groups];
      const Part& part = part_list[w.part];
      const int64_t group = item % groups, g0 = group * kv_per_item, kv = std::min(kv_per_item, n_kv - g0);
      const int64_t r = part.req, split = w.split;
      const int64_t len = lens[r], row0 = starts[r], q_len = starts[r + 1] - row0;
      const int64_t first_pos = len - q_len;  // the position of the request's first row
      // Up to the split's end or the part's last row, whichever comes first.
      const int64_t first = split * kSplitTokens, last = std::min(first + kSplitTokens, first_pos + part.row_end);
      const int32_t* table = tables + r * table_stride;
      for (int64_t i = std::max(part.row_begin, first - first_pos); i < part.row_end; ++i) {
        float* a = acc + ((row_base[row0 + i] + split) * n_heads + g0 * G) * d;
        std::fill(a, a + kv * G * d, 0.f);
      }
      for (int64_t c0 = first; c0 < last; c0 += kChunk) {
        const int64_t n = std::min(kChunk, last - c0);
        chunk.load(kc, vc, table, bs, n_kv, g0, kv, c0, n, zeros.data());
        // Causal: row i sees positions up to first_pos + i, so this chunk's first `visible`
        // tokens; rows before i0 see none of it.
        const int64_t i0 = std::max(part.row_begin, c0 - first_pos);
        for (int64_t h = 0; h < kv; ++h) {
          const int64_t g = g0 + h;
          int64_t nq = 0;
          for (int64_t i = i0; i < part.row_end; ++i) {
            const int64_t t = row0 + i, slot = (row_base[t] + split) * n_heads + g * G;
            const int64_t visible = std::min(n, first_pos + i + 1 - c0);
            for (int64_t e = 0; e < G; ++e, ++nq) {
              queries[nq] = qp + (t * n_heads + g * G + e) * d;
              heads[nq] = {acc + (slot + e) * d, mx + slot + e, sum + slot + e, visible};
            }
          }
          qk_chunk(queries, nq, chunk.keys_t(h), d, sc, score);
          online_softmax_pv(heads, nq, score, chunk.values(h), d);
        }
      }
      // acq_rel: the merging item sees every other item's states of the part and group.
      if (done[w.part * groups + group].fetch_add(1, std::memory_order_acq_rel) + 1 == part.splits) {
        for (int64_t i = part.row_begin; i < part.row_end; ++i) {
          const int64_t t = row0 + i;
          merge_splits(acc, mx, sum, row_base[t], row_base[t + 1] - row_base[t], n_heads, g0 * G, kv * G, d, o,
                       op + t * n_heads * d);
        }
      }
    }
  });
}

}  // namespace novainfer
