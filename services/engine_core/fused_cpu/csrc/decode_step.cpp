// One C++ call per step of a Llama-family model in the CPU fast mode (bf16 activations, dense
// layer matrices, bf16 or, on a CPU without native bf16 for a 4-bit checkpoint, fp32, and for such
// a checkpoint their int4 copies), its requests' rows each
// one new token, one token and the drafts it verifies, or a prefill chunk: embedding, 30 layers
// of norm -> q|k|v -> RoPE + KV write -> paged attention -> o + residual + norm -> gate|up ->
// SiLU x mul -> down + residual + norm, and the final norm.
// Python issues one call a step instead of ~900 ops; the matmuls are the row-invariant int4
// kernel of int4_matmul.h (int4 weights x the rows quantized to int8 per 32-input block: integer
// dot products, so extra rows cost little), the row-invariant
// bf16 one of bf16_matmul.h (bf16 weights on a CPU without native bf16) or torch's dense
// matmul (dense_matmul.h), in calls sized so that a row's bits do not depend on the other rows (RowPlan), the rest
// the kernels in the headers beside this file. The module also carries the int8 LM head's kernel
// (int8_matmul.h), which models/int8.py calls on the step's output where oneDNN's is inexact, and
// bf16_matmul for a bf16 LM head's rows (models/llama.py compute_logits).
// torch/extension.h would pull in the whole C++ frontend (torch::nn, ...) and double the build
// time: ATen and the pybind11 casters for tensors are all this needs.
#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "activation.h"
#include "attention.h"
#include "bf16_matmul.h"
#include "dense_matmul.h"
#include "int4_matmul.h"
#include "int8_matmul.h"
#include "norm.h"
#include "prefill_attention.h"
#include "rope.h"

namespace novainfer {
namespace {

// How a step's rows are multiplied. Rows [0, decode_rows) are its decodes (each request's new
// token and the drafts it verifies): by the weights their step would use without the prefill
// chunks (int4; bf16_matmul.h's row-invariant kernel on the bf16 dense weights; or the library's
// dense matmul in calls of at most decode_chunk rows), so their bits are that step's.
// The rest are prefill chunks' rows: by the int4 copies if prefill_int4 (int4_matmul.h: a row's
// bits are its own by construction, whatever the call holds), else by the library's dense matmul
// in calls of exactly prefill_block rows, the last one padded with zero rows; either way a prompt
// row's bits depend on the row alone, not on how the scheduler cut the prompt into chunks or what
// shares the step (fused_cpu/decode.py). Every other dense call is padded with zero rows to a multiple of
// row_multiple rows (1 for oneDNN's bf16 matmul; 4 for MKL's fp32 one on an AVX2 EPYC, whose calls
// of other counts round otherwise). widen: the library multiplies fp32 copies of bf16 dense weights
// (made once a step per matrix, for its calls: a CPU without native bf16, where oneDNN emulates
// bf16 ~6x slower than MKL's sgemm).
struct RowPlan {
  int64_t decode_rows;
  bool int4;
  bool prefill_int4;      // the prefill rows by the int4 copies (else the library's dense matmul)
  bool bf16_rows;         // the decode rows by bf16_matmul (bf16 dense weights; int4 false)
  int64_t decode_chunk;   // > 0: library decode rows in calls of at most this many rows; else one call
  int64_t prefill_block;  // > 0: prefill rows in calls of exactly this many rows; else one call
  int64_t row_multiple;   // >= 1: a library call's rows padded to a multiple of this
  bool widen;             // library calls on fp32 copies of bf16 weights
};

// One of a layer's matrices in the copies the model keeps: dense (bf16 or fp32: dense_matmul.h)
// and, where the model has them, int4 (int4_matmul.h's layout, fused_cpu/int4_matmul.py) for the
// decode rows of steps of few requests and, where RowPlan says so, the prefill rows.
struct Matrix {
  std::vector<at::Tensor> packed, scales_zeros, dense;

  at::Tensor operator()(const at::Tensor& x, size_t layer, const RowPlan& plan) const {
    const int64_t T = x.size(0), D = plan.decode_rows;
    // Every row on int4: one call (one quantize and one fork-join), each row's bits its own.
    if ((D == T || plan.prefill_int4) && (D == 0 || plan.int4)) {
      return int4_matmul(x, packed[layer], scales_zeros[layer]);
    }
    at::Tensor out = at::empty({T, dense[layer].size(0)}, x.options());
    if (D == T && plan.bf16_rows) {
      bf16_matmul_into(x, dense[layer], out);
      return out;
    }
    // The weights the library multiplies, converted once for all of this step's calls.
    const bool library_decodes = D > 0 && !plan.int4 && !plan.bf16_rows;
    const bool library_prefill = D < T && !plan.prefill_int4;
    const bool widened = (library_decodes || library_prefill) && plan.widen;
    const at::Tensor w = widened ? dense[layer].to(at::kFloat) : dense[layer];
    if (D > 0) {
      at::Tensor decode_out = out.narrow(0, 0, D);
      if (plan.int4) {
        decode_out.copy_(int4_matmul(x.narrow(0, 0, D), packed[layer], scales_zeros[layer]));
      } else if (plan.bf16_rows) {
        bf16_matmul_into(x.narrow(0, 0, D), dense[layer], decode_out);
      } else {
        decodes(x.narrow(0, 0, D), w, plan, decode_out);
      }
    }
    if (D < T && plan.prefill_int4) {
      out.narrow(0, D, T - D).copy_(int4_matmul(x.narrow(0, D, T - D), packed[layer], scales_zeros[layer]));
    } else if (D < T) {
      prefill(x.narrow(0, D, T - D), w, plan, out.narrow(0, D, T - D));
    }
    return out;
  }

 private:
  // chunk > 0: the dense product in calls of at most chunk rows. The libraries pick their kernel
  // by the row count, and up to some count (32 on an AMX Xeon) a row's bits are those of the row
  // alone; calls that small keep a step's rows row-invariant (fused_cpu/decode.py dense_chunk).
  static void decodes(const at::Tensor& x, const at::Tensor& w, const RowPlan& plan, at::Tensor out) {
    const int64_t T = x.size(0), chunk = plan.decode_chunk > 0 ? plan.decode_chunk : T;
    for (int64_t s = 0; s < T; s += chunk) {
      const int64_t m = std::min(chunk, T - s);
      dense_matmul_into(x.narrow(0, s, m), w, padded_rows(m, plan.row_multiple), out.narrow(0, s, m));
    }
  }

  // x [P, K] -> out [P, N] in dense calls of exactly `block` rows: a fixed row count's kernel
  // computes each row by the same sequence of operations wherever it sits in the call and
  // whatever the other rows hold (decode.py checks it at start-up), so every call having that
  // count makes a row's bits its own.
  static void prefill(const at::Tensor& x, const at::Tensor& w, const RowPlan& plan, at::Tensor out) {
    const int64_t P = x.size(0), block = plan.prefill_block;
    if (block <= 0) {
      dense_matmul_into(x, w, padded_rows(P, plan.row_multiple), out);
      return;
    }
    for (int64_t s = 0; s < P; s += block) {
      const int64_t m = std::min(block, P - s);
      dense_matmul_into(x.narrow(0, s, m), w, block, out.narrow(0, s, m));
    }
  }
};

// Attention by row kind: the decode requests' rows (decodes and the drafts they verify, the first
// decode_reqs requests) by paged_attention, as in the step without the prefill chunks, so their
// bits are that step's; the prefill chunks' rows by prefill_attention, whose bits for a row do
// not depend on how its prompt was chunked, so a chunk of one row (a chunk boundary) takes it too.
void step_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& tables, const at::Tensor& starts, const at::Tensor& lens, int64_t decode_reqs,
                    int64_t decode_rows, double scale, at::Tensor& out) {
  const int64_t R = lens.size(0);
  if (decode_reqs == R) {
    paged_attention(q, k_cache, v_cache, tables, starts, lens, scale, out);
    return;
  }
  if (decode_reqs > 0) {
    at::Tensor decode_out = out.narrow(0, 0, decode_rows);
    paged_attention(q.narrow(0, 0, decode_rows), k_cache, v_cache, tables.narrow(0, 0, decode_reqs),
                    starts.narrow(0, 0, decode_reqs + 1), lens.narrow(0, 0, decode_reqs), scale, decode_out);
  }
  prefill_attention(q, k_cache, v_cache, tables, starts, lens, decode_reqs, scale, out);
}

const at::Tensor* opt(const std::vector<at::Tensor>& v, size_t i) { return v.empty() ? nullptr : &v[i]; }

void check_bf16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.is_contiguous(), name,
              " must be a contiguous bf16 CPU tensor");
}

// The dense weights (and the embedding) are bf16, or fp32 where the CPU has no native bf16
// (dense_matmul.h).
void check_dense(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous(), name,
              " must be contiguous CPU tensors, all bf16 or all fp32");
}

}  // namespace

// The model's weights, held by reference (the tensors the Python model owns), and its KV cache.
class FusedDecoder {
 public:
  // The dense matrices (bf16, or fp32: dense_matmul.h) are the model's own tensors, one per
  // layer; the int4 copies are optional (set_int4_weights). The embedding is bf16 or fp32 (its rows
  // start the fp32 residual stream), every other tensor bf16.
  FusedDecoder(at::Tensor embed, at::Tensor rope_cos, at::Tensor rope_sin, at::Tensor final_norm,
               std::vector<at::Tensor> attn_norm, std::vector<at::Tensor> qkv_bias, std::vector<at::Tensor> q_norm,
               std::vector<at::Tensor> k_norm, std::vector<at::Tensor> mlp_norm, std::vector<at::Tensor> qkv,
               std::vector<at::Tensor> o, std::vector<at::Tensor> gate_up, std::vector<at::Tensor> down,
               int64_t n_heads, int64_t n_kv, int64_t head_dim, double eps, double scale)
      : embed_(std::move(embed)), cos_(std::move(rope_cos)), sin_(std::move(rope_sin)),
        final_norm_(std::move(final_norm)), attn_norm_(std::move(attn_norm)), qkv_bias_(std::move(qkv_bias)),
        q_norm_(std::move(q_norm)), k_norm_(std::move(k_norm)), mlp_norm_(std::move(mlp_norm)),
        layout_{n_heads, n_kv, head_dim}, eps_(eps), scale_(scale) {
    const size_t L = attn_norm_.size();
    TORCH_CHECK(mlp_norm_.size() == L, "one mlp_norm per layer");
    for (const auto* v : {&qkv_bias_, &q_norm_, &k_norm_}) {
      TORCH_CHECK(v->empty() || v->size() == L, "optional per-layer lists are empty or one per layer");
    }
    TORCH_CHECK(head_dim % 2 == 0 && n_heads % n_kv == 0, "need an even head_dim and n_heads % n_kv == 0");
    for (auto* t : {&cos_, &sin_, &final_norm_}) check_bf16(*t, "rope tables and norms");
    TORCH_CHECK(embed_.scalar_type() == at::kBFloat16 || embed_.scalar_type() == at::kFloat,
                "the embedding must be bf16 or fp32");
    for (const auto& t : attn_norm_) check_bf16(t, "attn_norm");
    for (const auto& t : mlp_norm_) check_bf16(t, "mlp_norm");
    TORCH_CHECK(!qkv.empty(), "at least one layer");
    const at::ScalarType dense_dtype = qkv[0].scalar_type();
    TORCH_CHECK(dense_dtype == at::kBFloat16 || dense_dtype == at::kFloat, "dense weights must be bf16 or fp32");
    for (const auto* v : {&qkv, &o, &gate_up, &down}) {
      TORCH_CHECK(v->size() == L, "one dense matrix per layer");
      for (const auto& t : *v) check_dense(t, dense_dtype, "dense weights");
    }
    qkv_.dense = std::move(qkv);
    o_.dense = std::move(o);
    gate_up_.dense = std::move(gate_up);
    down_.dense = std::move(down);
  }

  // The layers' int4 copies (int4_matmul.h's layout: packed weights and their scales and zeros),
  // for the decode rows of steps of as few requests as they serve, and for prefill rows where
  // forward's prefill_int4 says so.
  void set_int4_weights(std::vector<at::Tensor> qkv, std::vector<at::Tensor> qkv_sz, std::vector<at::Tensor> o,
                        std::vector<at::Tensor> o_sz, std::vector<at::Tensor> gate_up,
                        std::vector<at::Tensor> gate_up_sz, std::vector<at::Tensor> down,
                        std::vector<at::Tensor> down_sz) {
    for (const auto* v : {&qkv, &qkv_sz, &o, &o_sz, &gate_up, &gate_up_sz, &down, &down_sz}) {
      TORCH_CHECK(v->size() == attn_norm_.size(), "one int4 matrix (and scales and zeros) per layer");
    }
    qkv_.packed = std::move(qkv);
    qkv_.scales_zeros = std::move(qkv_sz);
    o_.packed = std::move(o);
    o_.scales_zeros = std::move(o_sz);
    gate_up_.packed = std::move(gate_up);
    gate_up_.scales_zeros = std::move(gate_up_sz);
    down_.packed = std::move(down);
    down_.scales_zeros = std::move(down_sz);
  }

  void set_kv_caches(std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches) {
    TORCH_CHECK(k_caches.size() == attn_norm_.size() && v_caches.size() == attn_norm_.size(),
                "one K and one V cache per layer");
    for (const auto& t : k_caches) check_bf16(t, "k_cache");
    for (const auto& t : v_caches) check_bf16(t, "v_cache");
    k_caches_ = std::move(k_caches);
    v_caches_ = std::move(v_caches);
  }

  // input_ids, positions, slot_mapping: int64 [T], one per row; block_tables: int32 [R,
  // max_blocks], seq_lens: int32 [R] (context after this step) and query_start_loc: int32 [R + 1]
  // (request r's rows are query_start_loc[r]:query_start_loc[r + 1]), one per request, as in
  // attention/base.py's AttentionMetadata. A request's rows are consecutive positions ending at
  // its seq_len: one decode row, a decode row and the drafts it verifies, or a prefill chunk.
  // The decode requests come first, their rows [0, decode_rows); their matmuls by the int4
  // copies (set_int4_weights) if int4, else by bf16_matmul.h's kernel if bf16_rows (bf16 dense
  // weights), else by the library's dense matmul in calls of at most decode_chunk rows if it is
  // > 0; the prefill rows' by the int4 copies if prefill_int4, else by the library's in calls of
  // exactly prefill_block rows if it is > 0;
  // other library calls padded to a multiple of row_multiple rows, and on fp32 copies of bf16
  // weights if widen (RowPlan). Returns the final-normed hidden states [T, hidden] (bf16).
  at::Tensor forward(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& block_tables,
                     const at::Tensor& seq_lens, const at::Tensor& query_start_loc, const at::Tensor& slot_mapping,
                     int64_t decode_rows, bool int4, bool prefill_int4, bool bf16_rows, int64_t decode_chunk,
                     int64_t prefill_block, int64_t row_multiple, bool widen) {
    TORCH_CHECK(!k_caches_.empty(), "set_kv_caches first");
    TORCH_CHECK(decode_rows >= 0 && decode_rows <= input_ids.size(0), "decode_rows must be within the step's rows");
    TORCH_CHECK(!int4 || decode_rows == 0 || !qkv_.packed.empty(), "set_int4_weights first");
    TORCH_CHECK(!prefill_int4 || decode_rows == input_ids.size(0) || !qkv_.packed.empty(), "set_int4_weights first");
    TORCH_CHECK(!(int4 && bf16_rows), "the decode rows on int4 or on bf16_matmul, not both");
    const bool bf16_weights = qkv_.dense[0].scalar_type() == at::kBFloat16;
    TORCH_CHECK(bf16_weights || (!bf16_rows && !widen), "bf16_rows and widen need bf16 dense weights");
    TORCH_CHECK(row_multiple >= 1 && (prefill_block <= 0 || prefill_block % row_multiple == 0),
                "row_multiple >= 1, dividing prefill_block");
    const RowPlan plan{decode_rows, int4, prefill_int4, bf16_rows, decode_chunk, prefill_block, row_multiple, widen};
    TORCH_CHECK(input_ids.dim() == 1 && positions.sizes() == input_ids.sizes() &&
                    slot_mapping.sizes() == input_ids.sizes() && block_tables.size(0) == seq_lens.size(0) &&
                    query_start_loc.size(0) == seq_lens.size(0) + 1,
                "ids, positions and slots one per row; block tables and seq_lens one per request, "
                "query_start_loc one more");
    TORCH_CHECK(positions.scalar_type() == at::kLong && slot_mapping.scalar_type() == at::kLong &&
                    block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                    query_start_loc.scalar_type() == at::kInt,
                "positions and slots int64, block tables, seq_lens and query_start_loc int32");
    at::Tensor pos = positions.contiguous(), slots = slot_mapping.contiguous();
    const int64_t T = input_ids.size(0), n = layout_.n_heads, d = layout_.d;
    at::Tensor tables = block_tables.stride(1) == 1 ? block_tables : block_tables.contiguous();
    at::Tensor lens = seq_lens.contiguous(), starts = query_start_loc.contiguous();
    const int32_t* qs = starts.data_ptr<int32_t>();
    TORCH_CHECK(qs[0] == 0 && qs[seq_lens.size(0)] == T, "query_start_loc must run from 0 to the number of rows");
    int64_t decode_reqs = 0;
    while (decode_reqs < seq_lens.size(0) && qs[decode_reqs + 1] <= decode_rows) ++decode_reqs;
    TORCH_CHECK(qs[decode_reqs] == decode_rows, "decode_rows must end a request's rows");
    // The residual stream in fp32: SmolLM2's reaches ~700 in a few dimensions and later layers
    // cancel most of it, where a bf16 stream (1 ulp = 4 at 700) loses the small remainder.
    at::Tensor h = embed_.index_select(0, input_ids).to(at::kFloat);
    const at::TensorOptions bf16_options = h.options().dtype(at::kBFloat16);
    at::Tensor x = at::empty({T, h.size(1)}, bf16_options);
    at::Tensor q = at::empty({T, n, d}, h.options());
    at::Tensor attn = at::empty({T, n * d}, bf16_options);
    add_rms_norm<float>(h, nullptr, attn_norm_[0], eps_, x);
    const size_t L = attn_norm_.size();
    for (size_t i = 0; i < L; ++i) {
      at::Tensor qkv = qkv_(x, i, plan);
      {
        // Named for torch.profiler (benchmarks/decode_profile.py); free when it is off.
        RECORD_FUNCTION("novainfer::rope_write_kv", std::vector<c10::IValue>());
        rope_write_kv(qkv, opt(qkv_bias_, i), opt(q_norm_, i), opt(k_norm_, i), eps_, pos, cos_, sin_, slots, layout_,
                      q, k_caches_[i], v_caches_[i]);
      }
      {
        RECORD_FUNCTION("novainfer::paged_attention", std::vector<c10::IValue>());
        step_attention(q, k_caches_[i], v_caches_[i], tables, starts, lens, decode_reqs, decode_rows, scale_, attn);
      }
      at::Tensor o = o_(attn, i, plan);
      {
        RECORD_FUNCTION("novainfer::add_rms_norm", std::vector<c10::IValue>());
        add_rms_norm<float>(h, &o, mlp_norm_[i], eps_, x);
      }
      at::Tensor gate_up = gate_up_(x, i, plan);
      at::Tensor act = at::empty({T, gate_up.size(1) / 2}, bf16_options);
      {
        RECORD_FUNCTION("novainfer::silu_mul", std::vector<c10::IValue>());
        silu_mul(gate_up, act);
      }
      at::Tensor down = down_(act, i, plan);
      {
        RECORD_FUNCTION("novainfer::add_rms_norm", std::vector<c10::IValue>());
        add_rms_norm<float>(h, &down, i + 1 < L ? attn_norm_[i + 1] : final_norm_, eps_, x);
      }
    }
    return x;
  }

 private:
  at::Tensor embed_, cos_, sin_, final_norm_;
  std::vector<at::Tensor> attn_norm_;
  Matrix qkv_;
  std::vector<at::Tensor> qkv_bias_, q_norm_, k_norm_;
  Matrix o_;
  std::vector<at::Tensor> mlp_norm_;
  Matrix gate_up_, down_;
  std::vector<at::Tensor> k_caches_, v_caches_;
  QKVLayout layout_;
  double eps_, scale_;
};

}  // namespace novainfer

namespace py = pybind11;
using novainfer::FusedDecoder;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Local to this module: two builds of these sources can then load in one process (a
  // benchmark's before/after, benchmarks/int4_matmul_kernel.py --baseline).
  py::class_<FusedDecoder>(m, "FusedDecoder", py::module_local())
      .def(py::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t, int64_t,
                    int64_t, double, double>())
      .def("set_int4_weights", &FusedDecoder::set_int4_weights)
      .def("set_kv_caches", &FusedDecoder::set_kv_caches)
      .def("forward", &FusedDecoder::forward, py::call_guard<py::gil_scoped_release>());

  // The kernels one by one, for the tests (tests/engine_core/fused_cpu/) and benchmarks.
  m.def("dense_matmul", &novainfer::dense_matmul, py::call_guard<py::gil_scoped_release>(),
        "x [M, K] bf16 @ w.T -> [M, N] bf16, w [N, K] bf16 or fp32, as one call of `rows` >= M rows "
        "(zero-padded)");
  m.def("int4_matmul", &novainfer::int4_matmul, py::call_guard<py::gil_scoped_release>(),
        "x [M, K] bf16 (quantized to int8 per row and 32-block) @ W.T -> [M, N] bf16, W as "
        "fused_cpu/int4_matmul.py repack()s it");
  m.def("quantize_rows", &novainfer::quantize_rows_tensors, py::call_guard<py::gil_scoped_release>(),
        "x [M, K] bf16 -> the int4 matmul's int8 activations: (q int8 [M, K], d, c, s fp32 [M, K / 32])");
  m.def(
      "bf16_matmul",
      [](const at::Tensor& x, const at::Tensor& w, bool bf16_out) {
        if (!bf16_out) return novainfer::bf16_matmul(x, w);
        at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options().dtype(at::kBFloat16));
        novainfer::bf16_matmul_into(x, w, out);  // what a fused step's layer gets
        return out;
      },
      py::arg("x"), py::arg("w"), py::arg("bf16_out") = false, py::call_guard<py::gil_scoped_release>(),
      "x [M, K] bf16 or fp32 @ w.T -> [M, N] fp32 (bf16 if bf16_out), w bf16 [N, K] (row-invariant: "
      "csrc/bf16_matmul.h)");
  m.def("int8_matmul", &novainfer::int8_matmul, py::call_guard<py::gil_scoped_release>(),
        "x [M, K] bf16 or fp32 @ (q * scale[:, None]).T -> [M, N] fp32, q int8 [N, K], scale fp32 [N] "
        "(the int8 LM head where oneDNN's int8 matmul is inexact: models/int8.py)");
  m.def(
      "add_rms_norm",
      [](at::Tensor h, std::optional<at::Tensor> delta, at::Tensor weight, double eps) {
        at::Tensor out = at::empty(h.sizes(), weight.options());
        if (h.scalar_type() == at::kFloat) {
          novainfer::add_rms_norm<float>(h, delta ? &*delta : nullptr, weight, eps, out);
        } else {
          novainfer::add_rms_norm<novainfer::bf16>(h, delta ? &*delta : nullptr, weight, eps, out);
        }
        return out;
      },
      "h [T, H] (fp32 or bf16; updated in place when delta is given) -> RMSNorm(h (+ delta)) * weight");
  m.def(
      "silu_mul",
      [](at::Tensor gate_up) {
        at::Tensor out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
        novainfer::silu_mul(gate_up, out);
        return out;
      },
      "gate_up [T, 2I] -> silu(gate) * up [T, I]");
  m.def(
      "rope_write_kv",
      [](at::Tensor qkv, std::optional<at::Tensor> bias, std::optional<at::Tensor> q_norm,
         std::optional<at::Tensor> k_norm, double eps, at::Tensor positions, at::Tensor cos, at::Tensor sin,
         at::Tensor slots, int64_t n_heads, at::Tensor k_cache, at::Tensor v_cache) {
        const int64_t n_kv = k_cache.size(2), d = k_cache.size(3);
        at::Tensor q = at::empty({qkv.size(0), n_heads, d}, qkv.options().dtype(at::kFloat));
        novainfer::rope_write_kv(qkv, bias ? &*bias : nullptr, q_norm ? &*q_norm : nullptr,
                                 k_norm ? &*k_norm : nullptr, eps, positions, cos, sin, slots, {n_heads, n_kv, d}, q,
                                 k_cache, v_cache);
        return q;
      },
      "rotates q and k of qkv, writes k and v to their cache slots; returns q (fp32)");
  m.def(
      "paged_attention",
      [](at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables, at::Tensor query_start_loc,
         at::Tensor seq_lens, double scale) {
        TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && q.dim() == 3,
                    "q must be a contiguous fp32 [T, heads, d]");
        TORCH_CHECK(block_tables.scalar_type() == at::kInt && query_start_loc.scalar_type() == at::kInt &&
                        seq_lens.scalar_type() == at::kInt,
                    "block tables, query_start_loc and seq_lens int32");
        TORCH_CHECK(query_start_loc.numel() == seq_lens.numel() + 1 && block_tables.size(0) == seq_lens.numel() &&
                        query_start_loc[-1].item<int64_t>() == q.size(0),
                    "one block table and seq_len per request, query_start_loc [R + 1] ending at T");
        at::Tensor out = at::empty({q.size(0), q.size(1) * q.size(2)}, k_cache.options());
        at::Tensor tables = block_tables.stride(1) == 1 ? block_tables : block_tables.contiguous();
        novainfer::paged_attention(q, k_cache, v_cache, tables, query_start_loc.contiguous(), seq_lens.contiguous(),
                                   scale, out);
        return out;
      },
      "paged causal attention of q [T, heads, d] (fp32), rows grouped by request -> [T, heads * d] (bf16)");
  m.def(
      "prefill_attention",
      [](at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables, at::Tensor query_start_loc,
         at::Tensor seq_lens, double scale) {
        TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && q.dim() == 3,
                    "q must be a contiguous fp32 [T, heads, d]");
        TORCH_CHECK(block_tables.scalar_type() == at::kInt && query_start_loc.scalar_type() == at::kInt &&
                        seq_lens.scalar_type() == at::kInt,
                    "block tables, query_start_loc and seq_lens int32");
        TORCH_CHECK(query_start_loc.numel() == seq_lens.numel() + 1 && block_tables.size(0) == seq_lens.numel() &&
                        query_start_loc[-1].item<int64_t>() == q.size(0),
                    "one block table and seq_len per request, query_start_loc [R + 1] ending at T");
        at::Tensor out = at::empty({q.size(0), q.size(1) * q.size(2)}, k_cache.options());
        at::Tensor tables = block_tables.stride(1) == 1 ? block_tables : block_tables.contiguous();
        novainfer::prefill_attention(q, k_cache, v_cache, tables, query_start_loc.contiguous(), seq_lens.contiguous(),
                                     0, scale, out);
        return out;
      },
      "prefill_attention.h's kernel, every request a prefill chunk: q [T, heads, d] (fp32) -> [T, heads * d] (bf16)");
}
