"""Steps of the CPU fast mode as one C++ call (csrc/decode_step.cpp).

The default CPU mode (bf16 activations; for a 4-bit GGUF, int4 layer matrices, models/int4.py)
spends a single-stream decode step mostly on issuing ~900 small eager ops, not on reading
weights (docs/benchmarks.md, the decode profile). Here a step, each request a decode row, a decode row
and the speculative drafts it verifies, or a prefill chunk, is one call into C++ that runs the
whole forward: the int4 matmuls NovaInfer's own kernel (csrc/int4_matmul.h: the rows quantized
to int8 per 32-input block, integer dot products with the int4 weights repacked by
int4_matmul.py, so extra rows cost little), the dense ones torch's, the
norms, RoPE + KV-cache write, SiLU x mul and paged attention fused kernels (csrc/*.h, after
sgl-kernel's CPU kernels; the decode and draft rows' attention csrc/attention.h, the prefill
rows', whatever the chunk's length, csrc/prefill_attention.h). It runs for any model with bf16
activations on a CPU, with int4 copies (a Q4_0/Q4_1 GGUF, or --quantization int4) or without (a
float checkpoint, e.g. a Hugging Face directory: every row on the dense weights); every other
mode (--dtype float32, the exact mode in particular) keeps the eager path.

The dense weights are bf16, except for a 4-bit checkpoint's on a CPU without native bf16, where
they are fp32 (run_mode.py: `...+fused-decode+fp32-dense`): oneDNN emulates bf16 there, ~6x slower
than MKL's fp32 GEMM, so the step converts a dense call's bf16 rows to fp32, multiplies by MKL and
rounds the product to bf16 (csrc/dense_matmul.h). A float checkpoint keeps bf16 dense weights on
such a CPU too (widen): its decode rows go through the extension's own row-invariant kernel on
them (csrc/bf16_matmul.h: half the bytes of fp32 weights, and no padded calls), and the library
calls that remain (prefill rows, steps of many requests) multiply fp32 copies made once a step per
matrix. The probes below run on the weights the library multiplies, in their dtype, so they find
what that library does on this CPU.

Which weights, by row set (model_runner puts the decoding requests first,
AttentionMetadata.num_prefill_reqs says where the prefill chunks start):
- decode rows (and their drafts): the int4 copies whenever the model has them and the step's
  decoding requests are few enough for them (models/int4.py fused_max_requests: 64 without AMX,
  8 with; what a step of the same requests without drafts
  or prefill chunks multiplies by), however many rows the drafts add; else, with bf16 dense
  weights on a CPU without native bf16, csrc/bf16_matmul.h's kernel on them, for steps of up to
  BF16_ROWS_MAX_REQUESTS decoding requests, chosen alike; else the dense weights
  (oneDNN's bf16 matmul or MKL's fp32 one). Each fused kernel of such a step is
  row-invariant (a row's result does not depend on the step's other rows or their count: the
  int4 and bf16 matmuls and the int8 LM head by test, the attention by its fixed KV splits), so a draft
  verified there gets the bits it would get decoded alone, and greedy output is the same with
  speculation on or off (tests/engine_core/fused_cpu/test_verify.py, test_float_checkpoint.py).
  The dense matmul is not row-invariant across
  row counts (the library picks its kernel by the count), but up to some count (32 on an AMX
  Xeon; row_invariant_chunk checks it at start-up, the LM head included), with every call padded
  to a multiple of some rows where the library needs it (4 for MKL's fp32 GEMM on an AVX2 EPYC:
  dense_calls), every row gets its lone bits: the decode rows of up to that many requests are
  multiplied (and, with a dense LM head, their logits computed: CausalLM.dense_head_chunk) in
  chunks of that many rows, so their drafts
  get their decodes' bits too (a float checkpoint's: test_float_checkpoint.py); past it a
  draft's logits may differ in the last bits.
- prefill rows: where the model has int4 copies and the CPU no AMX (models/int4.py
  fused_prefill_int4: FusedDecode.prefill_int4), the int4 copies too, whatever the step's decode
  rows use: faster than the dense weights at hundreds of rows too (a 200-token prompt 146 vs 223
  ms, a 2000-token one 2488 vs 2710 on a 2-core Zen 4; docs/benchmarks.md, "Prefill rows on the
  int4 kernel"), for +0.65 % perplexity from the int8 activations; where the decode rows are on
  int4 as well, one int4 call takes all of a matrix's rows. The int4 kernel gives a row its own
  bits by construction, so no call sizes are needed there. Else (a float checkpoint, or AMX) the
  dense weights, in calls of exactly prefill_block rows, the last one zero-padded, where the
  library computes a row by the same operations wherever it sits in the call and whatever the
  other rows hold (position_invariant_block checks it at start-up; lone-bits chunks would do too
  but cost more at hundreds of rows: benchmarks/prefill_step_cost.py --prefill-block 128 32).
  Either way a prompt's K/V do not depend on how the scheduler cut it into chunks or on what shared its steps, both of
  which speculation changes (tests/engine_core/fused_cpu/test_mixed.py); their attention is
  csrc/prefill_attention.h's flash-attention tiles over key blocks at fixed absolute positions,
  row-invariant too (test_prefill_attention.py), and fast enough that every step runs fused
  however long its prefill chunks (benchmarks/prefill_step_cost.py), so decode rows never take
  the eager path's bits because a long prompt shares their step.

Numerics: the fused kernels accumulate in fp32 and round once where the eager ops round after
each op (and keep q and the residual stream in fp32), so outputs differ from the eager fast mode
in the last bf16 bits, except in the int4 rows: their activations are quantized to int8 per row
and 32-input block (llama.cpp's q8_1 scheme; the eager path's torch kernel multiplies bf16
activations), which costs 0.4-0.9 % of a row's rms per product (benchmarks/int8_activations/
README.md) and +0.30 % perplexity on SmolLM2's fused decode rows (7.8255 -> 7.8492,
benchmarks/perplexity.py --modes default-fused), +0.65 % on its prefill rows (7.8279 on the dense
weights -> 7.8785, --modes default-fused-prefill-dense default-fused-prefill), so fused and
eager int4 steps (and prefill rows: the eager path's are dense) differ by more than last bits
there. Greedy tokens mostly agree (tests/engine_core/fused_cpu/test_decode.py).
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from services.engine_core import run_mode
from services.engine_core.attention.base import AttentionMetadata
from services.engine_core.fused_cpu.probe_cache import cached_probes
from services.engine_core.fused_cpu.repack_cache import cached_repack
from services.engine_core.models import int4
from services.engine_core.models.llama import CausalLM

log = logging.getLogger(__name__)


def supported(model: CausalLM, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the fused path cannot run this model, or None when it can. dtype: the activations'."""
    if device.type != "cpu":
        return "not on a CPU"
    if dtype != torch.bfloat16:
        return f"activations are {str(dtype).removeprefix('torch.')}, the kernels are bf16"
    if model.layers[0].qkv_weight.dtype not in (torch.bfloat16, torch.float32):
        return f"dense weights are {str(model.layers[0].qkv_weight.dtype).removeprefix('torch.')}, not bf16 or fp32"
    if model.cfg.head_dim % 2:
        return "an odd head_dim"
    return None


MATRICES = ("qkv", "o", "gate_up", "down")
_CHUNKS = (32, 16, 8, 4)
_MULTIPLES = (1, 2, 4, 8)
"""Row counts a dense call may be padded to a multiple of, smallest first (dense_calls)."""
_HEAD_PROBE_ROWS = 4096
"""The LM head rows row_invariant_chunk probes: the whole head (49152 rows for SmolLM2) would
take seconds of start-up; a slice keeps its K and its kind of shape (many output columns)."""
PREFILL_BLOCKS = (128, 64)
"""Candidate row counts of the prefill rows' dense calls, largest first (the first that
position_invariant_block accepts). A call costs about the same whatever part of it is padding, so
this trades the padding of a short prompt's last call against the slower small calls of a long
one (benchmarks/prefill_step_cost.py)."""


BF16_ROWS_MAX_REQUESTS = 64
"""The most decoding requests a step's decode rows go through csrc/bf16_matmul.h for (bf16 dense
weights on a CPU without native bf16); past it the library, on fp32 copies made once a step. The
kernel's rows cost about their fmas, like sgemm's, so the cut-off only bounds where it was measured
(benchmarks/cpu_linear_kernels.py --kernels bf16_fused fp32_widened)."""
_BF16_PROBE_ROWS = 16


def dense_call(x: Tensor, w: Tensor, rows: int) -> Tensor:
    """The product csrc/dense_matmul.h computes for bf16 rows x, as one call of `rows` rows (x,
    then zero rows), before it rounds an fp32 product to bf16 (so a probe of it sees every bit)."""
    x = x.to(w.dtype)
    if rows > x.shape[0]:
        return F.linear(torch.cat([x, x.new_zeros(rows - x.shape[0], x.shape[1])]), w)[: x.shape[0]]
    return F.linear(x, w)


def padded_rows(m: int, multiple: int) -> int:
    return -(-m // multiple) * multiple


def _rows(n: int, k: int, gen: torch.Generator) -> Tensor:
    """n random activation rows (bf16, as the step's)."""
    return torch.randn(n, k, generator=gen).to(torch.bfloat16)


@torch.inference_mode()
def row_invariant_chunk(weights: list[Tensor], multiple: int = 1, rows: int = 256) -> int:
    """The largest row count C (of _CHUNKS, a multiple of `multiple`) up to which a dense call
    whose rows are padded to a multiple of `multiple` gives every row the bits it gets alone (its
    call padded alike), for each of the weights; 0 if none.

    oneDNN and MKL pick their kernel (and so the summation order) by the row count: on the 2-core
    AMX Xeon every bf16 call of up to 32 rows gives each row exactly its lone (1-row) bits, and
    calls of 33 or more rows another kernel's (test_row_invariance.py); on a 2-core AVX2 EPYC an
    fp32 call of 1-3, 5-7 or 9 rows rounds differently from one of a multiple of 4, which all
    agree. That depends on the CPU's ISA and the libraries' heuristics, so it is checked here, on
    random rows, instead of assumed: calls of C rows and of every multiple of `multiple` up to C."""
    gen = torch.Generator().manual_seed(0)
    chunks = [c for c in _CHUNKS if c % multiple == 0]
    for w in weights:
        if not chunks:
            break
        x = _rows(rows, w.shape[1], gen)
        lone = torch.cat([dense_call(x[i : i + 1], w, multiple) for i in range(rows)])
        while chunks:
            c = chunks[0]
            chunked = torch.cat([dense_call(x[s : s + c], w, c) for s in range(0, rows, c)])
            sizes = range(multiple, c, multiple)
            if torch.equal(chunked, lone) and all(torch.equal(dense_call(x[:m], w, m), lone[:m]) for m in sizes):
                break
            chunks.pop(0)
    return chunks[0] if chunks else 0


def dense_calls(weights: list[Tensor]) -> tuple[int, int]:
    """(row multiple, chunk): the smallest multiple of _MULTIPLES for which row_invariant_chunk
    finds a chunk, and that chunk; (1, 0) if none does. 1 for oneDNN's bf16 matmul on an AMX Xeon
    (no padding), 4 for MKL's fp32 one on an AVX2 EPYC."""
    for multiple in _MULTIPLES:
        chunk = row_invariant_chunk(weights, multiple)
        if chunk:
            return multiple, chunk
    return 1, 0


@torch.inference_mode()
def position_invariant_block(weights: list[Tensor], candidates: tuple[int, ...] = PREFILL_BLOCKS) -> int:
    """The first of candidates, B, for which a dense call of exactly B rows gives each row the
    same bits wherever it sits among the B rows and whatever the others hold (zero padding
    included), for each of the weights; 0 if none.

    The prefill rows are multiplied in calls of B rows (the last one padded), so a prompt row's
    bits, and so its K/V, do not depend on how the scheduler cut the prompt into chunks or on
    what else the step holds. oneDNN (bf16) and MKL (fp32) compute a row of a fixed-shape call by
    the same sequence of operations wherever it sits (its tiles all whole for such B); checked here
    on random rows, as row_invariant_chunk is, since that is the libraries' choice, not a promise."""
    gen = torch.Generator().manual_seed(1)
    for b in candidates:
        ok = True
        for w in weights:
            x = _rows(2 * b, w.shape[1], gen)
            ref = dense_call(x[:b], w, b)
            for shift in (1, b // 2 + 3, b - 1):  # row j at index j - shift, beside other rows
                if not torch.equal(dense_call(x[shift : shift + b], w, b)[: b - shift], ref[shift:]):
                    ok = False
            for m in (1, b // 3):  # the last call of a prefill: m rows and zero padding
                if not torch.equal(dense_call(x[:m], w, b), ref[:m]):
                    ok = False
            if not ok:
                break
        if ok:
            return b
    return 0


@torch.inference_mode()
def bf16_rows_invariant(ext: ModuleType, weights: list[Tensor], rows: int = _BF16_PROBE_ROWS) -> bool:
    """Whether ext.bf16_matmul gives every row its lone bits in calls of 1..rows rows (every row
    blocking of csrc/bf16_matmul.h), for each of the weights: true by its construction (a fixed
    sequence of fp32 operations per element), checked at start-up as the libraries' kernels are,
    since a compiler that contracted or reordered it would break what speculation relies on."""
    gen = torch.Generator().manual_seed(3)
    for w in weights:
        x = _rows(rows, w.shape[1], gen)
        lone = torch.cat([ext.bf16_matmul(x[i : i + 1], w) for i in range(rows)])
        if not all(torch.equal(ext.bf16_matmul(x[:m], w), lone[:m]) for m in range(2, rows + 1)):
            return False
    return True


class FusedDecode:
    def __init__(self, ext: ModuleType, model: CausalLM, cache_dir: str | None = None) -> None:
        """cache_dir: where the start-up probes' answer (probe_cache.py) and the int4 copies in
        the kernel's layout (repack_cache.py) are kept for later starts (None: redone every time)."""
        layers = model.layers

        def each(attr: str) -> list[Tensor]:
            values = [getattr(layer, attr) for layer in layers]
            return [] if values[0] is None else [v.contiguous() for v in values]

        self.ext = ext
        cfg = model.cfg
        first = layers[0]
        dense = [[getattr(layer, f"{m}_weight") for layer in layers] for m in MATRICES]
        self._decoder: Any = ext.FusedDecoder(
            model.embed,
            model.rope_cos,
            model.rope_sin,
            model.norm,
            each("attn_norm"),
            each("qkv_bias"),
            each("q_norm"),
            each("k_norm"),
            each("mlp_norm"),
            *dense,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            first.eps,
            first.scale,
        )
        # A model without int4 copies (a float checkpoint) multiplies every row by the dense weights.
        self.int4_max_requests = int4.fused_max_requests(first.qkv_weight.dtype) if first.int4 is not None else 0
        # The prefill rows on the int4 copies too, where they beat the dense weights at hundreds of rows.
        self.prefill_int4 = self.int4_max_requests > 0 and int4.fused_prefill_int4(first.qkv_weight.dtype)
        # Per matrix, per layer: (packed, scales_zeros) in csrc/int4_matmul.h's layout (shared
        # with the C++ decoder; benchmarks/verify_step_cost.py times ext.int4_matmul on them).
        self.int4: dict[str, list[tuple[Tensor, Tensor]]] = {}
        if self.int4_max_requests:
            repacked = iter(cached_repack(cache_dir, [getattr(layer.int4, m) for m in MATRICES for layer in layers]))
            self.int4 = {m: [next(repacked) for _ in layers] for m in MATRICES}
            self._decoder.set_int4_weights(
                *(side for m in MATRICES for side in ([p for p, _ in self.int4[m]], [sz for _, sz in self.int4[m]]))
            )
        first_layer = [matrices[0] for matrices in dense]
        head = model.embed if model.lm_head is None else model.lm_head
        # bf16 weights the library would multiply emulated (a float checkpoint on a CPU without
        # native bf16): its calls on fp32 copies, the decode rows on the extension's bf16 kernel.
        self.widen = first_layer[0].dtype == torch.bfloat16 and not run_mode.cpu_has_native_bf16()
        self.bf16_rows_max_requests = 0
        if self.widen:
            if bf16_rows_invariant(ext, [*first_layer, head[:_HEAD_PROBE_ROWS]]):
                self.bf16_rows_max_requests = BF16_ROWS_MAX_REQUESTS
            else:
                log.warning("the fused bf16 matmul is not row-invariant here: decode rows on the dense library's")
        # Every library call padded to a multiple of row_multiple rows; decode rows in calls of up to
        # dense_chunk rows, where each row gets its lone bits.
        probed = [w.float() if self.widen else w for w in (*first_layer, head[:_HEAD_PROBE_ROWS])]

        def probe() -> tuple[int, int, int]:
            multiple, chunk = dense_calls(probed)
            # The prefill rows' calls: of B rows where the kernel for B rows is position-invariant,
            # else of dense_chunk rows (lone bits: any such call), else (neither holds) all rows in
            # one call, and a prompt's K/V then depend on its chunking in the last bits.
            return multiple, chunk, position_invariant_block(probed[: len(first_layer)]) or chunk

        self.row_multiple, self.dense_chunk, self.prefill_block = cached_probes(cache_dir, probed, probe)
        self._kv_caches: list[tuple[Tensor, Tensor]] | None = None

    @staticmethod
    def decode_rows(md: AttentionMetadata) -> int:
        """The rows of the step's decode requests (the first num_reqs - num_prefill_reqs)."""
        return md.num_tokens - sum(md.query_lens_cpu[md.num_reqs - md.num_prefill_reqs :])

    def _dense_chunk(self, md: AttentionMetadata) -> int:
        """Rows per dense matmul call of the decode rows: dense_chunk where the step's decode
        requests fit in one chunk (so their step without drafts is one call, and a draft's row
        gets its lone decode's bits), else all decode rows in one call (0)."""
        return self.dense_chunk if md.num_reqs - md.num_prefill_reqs <= self.dense_chunk else 0

    def uses_int4(self, md: AttentionMetadata) -> bool:
        """Whether the step's decode rows multiply by the int4 copies: by its number of decode
        requests, as the step of the same requests without drafts or prefill chunks would."""
        return self.int4_max_requests > 0 and md.num_reqs - md.num_prefill_reqs <= self.int4_max_requests

    def uses_bf16_rows(self, md: AttentionMetadata) -> bool:
        """Whether the step's decode rows go through csrc/bf16_matmul.h (not the int4 copies): by
        its number of decode requests, as uses_int4."""
        requests = md.num_reqs - md.num_prefill_reqs
        return not self.uses_int4(md) and 0 < requests <= self.bf16_rows_max_requests

    def can_run(self, md: AttentionMetadata) -> bool:
        """A step whose decode requests (all but the last num_prefill_reqs) are one new token
        each, with the drafts it verifies, if any (what model_runner makes): every step
        model_runner makes, however long its prefill chunks."""
        return self.decode_rows(md) - md.num_draft_tokens == md.num_reqs - md.num_prefill_reqs

    def run(
        self, input_ids: Tensor, positions: Tensor, kv_caches: list[tuple[Tensor, Tensor]], md: AttentionMetadata
    ) -> Tensor:
        """The final hidden states [num_tokens, hidden] of a step."""
        if kv_caches is not self._kv_caches:
            self._decoder.set_kv_caches([k for k, _ in kv_caches], [v for _, v in kv_caches])
            self._kv_caches = kv_caches
        return self._decoder.forward(
            input_ids,
            positions,
            md.block_tables,
            md.seq_lens,
            md.query_start_loc,
            md.slot_mapping,
            self.decode_rows(md),
            self.uses_int4(md),
            self.prefill_int4,
            self.uses_bf16_rows(md),
            self._dense_chunk(md),
            self.prefill_block,
            self.row_multiple,
            self.widen,
        )
