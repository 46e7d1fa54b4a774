"""Turns a scheduled batch into one forward pass and sampled tokens.

Owns the weights, the paged KV cache and the attention backend. The batch is
flattened into one row per new token (see attention/base.py), so decodes and
prefill chunks run in the same forward.

Speculative decoding: a row with k draft tokens is a (k + 1)-token chunk, causal within
itself like a prefill chunk; its last k + 1 positions are all sampled, each as if the
drafts before it were accepted (their penalties, min_tokens and seeded draw are those of
that position, and a grammar request's mask is its grammar's state after those drafts).
The drafts are accepted up to the first position where the sampled token differs, and that
sampled token is the step's last token (verify_drafts).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from services.engine_core.attention import AttentionMetadata, get_backend
from services.engine_core.batch import ScheduledBatch
from services.engine_core.compiled_decode import CompiledDecode, use_cache_dir
from services.engine_core.cuda_graph import DecodeGraphs, Graph
from services.engine_core.fused_cpu import decode as fused_decode
from services.engine_core.fused_cpu import extension as fused_extension
from services.engine_core.models import dense
from services.engine_core.models.int4 import Int4Weight
from services.engine_core.models.int8 import Int8Weight
from services.engine_core.request import Request
from services.engine_core.run_mode import (
    describe,
    fused_fp32_dense,
    resolve_device,
    resolve_dtype,
    use_batch_invariant_blas,
)
from services.engine_core.sampler import Sampler, SamplingBatch
from services.engine_core.speculative.verify import verify_drafts
from services.engine_core.structured_output import RequestGrammar, fill_bitmask
from services.engine_core.weight_loader import load_model
from shared.config import EngineConfig, available_cores, resolve_cache_dir
from shared.model_info import max_model_len
from shared.protocol import TokenLogprob

log = logging.getLogger(__name__)

_MODE_HINT = " (--exact: float32, token for token with transformers and batch-invariant)"


def _decodes(req: Request, n: int, drafts: list[int]) -> bool:
    """Whether a request's rows this step decode: its one new token followed by the drafts it
    verifies, that token an output token (sampled by the last step) or drafts following it;
    else they are a prefill chunk (a 1-token one too: the prompt's K/V must not depend on it)."""
    return n == 1 + len(drafts) and (bool(drafts) or req.num_computed_tokens >= req.num_prompt_tokens)


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        # The activations' (and KV cache's) dtype, and the large matrices'.
        self.dtype = resolve_dtype(config, self.device)
        self.weight_dtype = self.dtype
        if fused_fp32_dense(config, self.device) and fused_extension.load(resolve_cache_dir(config.cache_dir)):
            self.dtype, self.weight_dtype = torch.bfloat16, torch.float32
        if config.compile_decode and self.device.type != "cpu":
            raise ValueError("--compile-decode is for CPUs (on CUDA, decode steps replay CUDA graphs)")
        if self.device.type == "cpu":
            # Before any compilation: Inductor bakes the thread count into its kernels.
            torch.set_num_threads(config.num_threads or available_cores())
        torch.manual_seed(config.seed)
        # Before any float32 GEMM of this process: MKL reads its mode at the first one.
        blas_invariant = config.exact and self.device.type == "cpu" and use_batch_invariant_blas()

        t0 = time.perf_counter()
        self.model, self.model_config = load_model(config, self.device, self.dtype, self.weight_dtype)
        if (
            self.weight_dtype != self.dtype
            and self.model.layers[0].int4 is None
            and fused_decode.supported(self.model, self.dtype, self.device) is None
        ):
            # A float checkpoint on a CPU without native bf16: its dense weights in bf16, as where
            # the CPU has it, for the fused step's own bf16 kernel (fused_cpu/decode.py: half the
            # bytes of fp32 ones a decode row streams, and a verify row its lone decode's bits).
            # Not where the fused step cannot run the model: eager bf16 matmuls are emulated there.
            self.model.cast_dense(self.dtype)
            self.weight_dtype = self.dtype
        self.load_time_s = time.perf_counter() - t0
        self._fused_int8_head()
        self.max_model_len = max_model_len(config)
        if config.max_model_len and config.max_model_len > self.max_model_len:
            log.warning(
                "--max-model-len %d exceeds the model's context: using %d", config.max_model_len, self.max_model_len
            )
        self.backend = get_backend(config.attention_backend, self.device, batch_invariant=config.exact)
        self.block_size = config.block_size
        self.num_blocks = self._num_kv_blocks()
        self.kv_caches = self._allocate_kv_cache(self.num_blocks)
        self.sampler = Sampler()
        # Host-side step inputs are staged in pinned memory so their copies to the GPU are
        # asynchronous; on a CPU there is nothing to copy.
        self._pin = self.device.type == "cuda"
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            if self.backend.name == "triton":
                self.graphs = self._capture_graphs()
            else:
                log.info("CUDA graphs need the triton attention backend: running %s eagerly", self.backend.name)
        self.compiled = self._compile_decode() if config.compile_decode else None
        self.fused = self._fused_decode()
        head = self.model.lm_head_quantized
        self.mode = describe(
            self.dtype,
            int4=self.model.layers[0].int4 is not None,
            lm_head="int4" if isinstance(head, Int4Weight) else "int8" if isinstance(head, Int8Weight) else None,
            compiled=self.compiled is not None,
            exact=config.exact,
            fused=self.fused is not None,
            weight_dtype=self.weight_dtype,
        )
        log.info("run mode: %s%s", self.mode, _MODE_HINT if self.device.type == "cpu" and not config.exact else "")
        if config.exact and self.device.type == "cpu":
            self._pad_dense_calls()
        if config.exact and self.device.type == "cpu" and not blas_invariant:
            log.warning(
                "exact mode without MKL's strict CNR mode (MKL_CBWR=AUTO,STRICT, read at this process's first "
                "float32 GEMM: set it before using torch): greedy output is unaffected, but logits depend on the "
                "batch in the last bits, so a seeded sampled output can differ with the batch and speculation"
            )
        log.info(
            "model %s loaded in %.2fs on %s (%s, %s attention); KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB)",
            self.model_config.architecture,
            self.load_time_s,
            self.device,
            str(self.dtype).removeprefix("torch."),
            self.backend.name,
            self.num_blocks,
            self.block_size,
            self.num_blocks * self.block_size,
            self.num_blocks * self._block_bytes() / 2**20,
        )

    # --- KV cache -------------------------------------------------------------------

    def _block_bytes(self) -> int:
        mc = self.model_config
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * mc.num_layers * self.block_size * mc.num_kv_heads * mc.head_dim * elem

    def _num_kv_blocks(self) -> int:
        budget = self._cuda_kv_budget() if self.device.type == "cuda" else self.config.kv_cache_bytes
        num_blocks = budget // self._block_bytes()
        if num_blocks < 2:
            raise ValueError(
                f"KV-cache budget of {budget / 2**20:.1f} MiB holds {num_blocks} blocks "
                f"({self._block_bytes() / 2**20:.2f} MiB each): raise kv_cache_bytes / gpu_memory_utilization"
            )
        return int(num_blocks)

    def _cuda_kv_budget(self) -> int:
        # Peak activation memory is measured by a dummy forward of a full token budget,
        # so the cache takes what is really left under the utilisation cap.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_forward()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        total = torch.cuda.get_device_properties(self.device).total_memory
        return int(total * self.config.gpu_memory_utilization - peak)

    @torch.inference_mode()
    def _profile_forward(self) -> torch.Tensor:
        """The largest step the scheduler can make (a full token budget, and as many logits
        rows as requests, times 1 + k when they verify k drafts), through a one-block cache.
        Returns the logits."""
        n = self.config.max_num_batched_tokens
        rows_per_req = 1 + self.config.num_speculative_tokens if self.config.speculative_method != "none" else 1
        probe_caches = self._allocate_kv_cache(1)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        hidden = self.model(ids, torch.zeros_like(ids), probe_caches, self._dummy_metadata(n), self.backend)
        return self.model.compute_logits(hidden[-min(n, self.config.max_num_seqs * rows_per_req) :])

    def _dummy_metadata(self, n: int) -> AttentionMetadata:
        # One request of n tokens, every one in block 0 (written to slot 0): enough to size
        # activations. The block table still has an entry for every block of the context: a
        # kernel reads an entry for every block it attends over.
        i32: dict[str, Any] = dict(dtype=torch.int32, device=self.device)
        return AttentionMetadata(
            num_reqs=1,
            num_tokens=n,
            query_start_loc=torch.tensor([0, n], **i32),
            seq_lens=torch.tensor([n], **i32),
            block_tables=torch.zeros((1, -(-n // self.block_size)), **i32),
            slot_mapping=torch.zeros(n, dtype=torch.long, device=self.device),
            max_query_len=n,
            max_seq_len=n,
            query_lens_cpu=[n],
            seq_lens_cpu=[n],
        )

    def _allocate_kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        mc = self.model_config
        shape = (num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim)
        return [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(mc.num_layers)
        ]

    def _capture_graphs(self) -> DecodeGraphs | None:
        # Graphs only save launch overhead: a driver or library that cannot capture must cost
        # speed, not the service.
        try:
            graphs = self._decode_graphs()
            graphs.capture()
            return graphs
        except Exception:
            log.warning("CUDA graph capture failed: running every step eagerly", exc_info=True)
            return None

    def _compile_decode(self) -> CompiledDecode | None:
        # Like graph capture, compiling only buys speed: a host without a working C++ compiler
        # (Inductor needs one) must cost speed, not the service.
        use_cache_dir(resolve_cache_dir(self.config.cache_dir))
        try:
            compiled = CompiledDecode(self.model, self.backend, self.config.max_num_seqs)
            compiled.compile(self.kv_caches)
            return compiled
        except Exception:
            log.warning("compiling the decode step failed: running every step eagerly", exc_info=True)
            return None

    def _pad_dense_calls(self) -> None:
        """The exact mode's batch invariance where the float32 GEMM needs help: the smallest row
        count from which its calls agree, measured here (models/dense.py), pads smaller calls."""
        t0 = time.perf_counter()
        layer = self.model.layers[0]
        head = self.model.embed if self.model.lm_head is None else self.model.lm_head
        weights = [layer.qkv_weight, layer.o_weight, layer.gate_up_weight, layer.down_weight, head[:4096]]
        rows = dense.min_invariant_rows(weights)
        if rows > 1:
            self.model.pad_dense_calls(rows)
            log.info(
                "exact mode: this CPU's float32 GEMM rounds calls of fewer than %d rows differently: padding "
                "them to %d rows (probed in %.2fs)",
                rows,
                rows,
                time.perf_counter() - t0,
            )
        elif rows == 0:
            log.warning("exact mode: no padding makes this CPU's float32 GEMM row-invariant: logits vary by batch")

    def _fused_int8_head(self) -> None:
        """The int8 LM head multiplies by the fused extension's int8 kernel where oneDNN's int8
        matmul is not used (a CPU without VNNI: models/int8.py), in the fused mode and the eager
        one alike (a build, once, where the fused mode did not build it: --no-fused-cpu-decode
        asks for neither)."""
        head = self.model.lm_head_quantized
        if not isinstance(head, Int8Weight) or head.uses_onednn or not self.config.fused_cpu_decode:
            return
        ext = fused_extension.load(resolve_cache_dir(self.config.cache_dir))
        if ext is None:  # already warned: the weight-only fallback
            return
        head.use_kernel(ext.int8_matmul)
        self.model.lm_head_max_rows = head.max_rows
        log.info("the int8 LM head multiplies by the fused CPU extension's kernel (up to %d rows)", head.max_rows)

    def _fused_decode(self) -> fused_decode.FusedDecode | None:
        """The fused C++ decode path where it applies (fused_cpu/decode.py), else None."""
        if not self.config.fused_cpu_decode or self.config.exact or self.compiled is not None:
            return None
        why_not = fused_decode.supported(self.model, self.dtype, self.device)
        if why_not is not None:
            if self.device.type == "cpu":
                log.info("fused CPU decode not used: %s", why_not)
            return None
        t0 = time.perf_counter()
        cache_dir = resolve_cache_dir(self.config.cache_dir)
        ext = fused_extension.load(cache_dir)
        if ext is None:  # already warned
            return None
        try:
            fused = fused_decode.FusedDecode(ext, self.model, cache_dir)
        except Exception:
            log.warning("the fused CPU decode path failed to start: running decode steps eagerly", exc_info=True)
            return None
        # A verify step's dense LM head rows in the chunks its layers' rows use (CausalLM.compute_logits),
        # or on the bf16 kernel its layers' decode rows use.
        self.model.dense_head_chunk, self.model.dense_head_multiple = fused.dense_chunk, fused.row_multiple
        if fused.widen:
            self.model.widen_head = True
            if fused.bf16_rows_max_requests:
                self.model.bf16_head_kernel = ext.bf16_matmul
                self.model.bf16_head_max_rows = fused.bf16_rows_max_requests
        log.info(
            "fused CPU kernels ready in %.2fs (decode rows on int4 for steps of up to %d decoding requests, else "
            "on the bf16 kernel for up to %d, else dense in row-invariant chunks of %d rows, 0: none; prefill rows "
            "%s; %s dense calls padded to a multiple of %d rows)",
            time.perf_counter() - t0,
            fused.int4_max_requests,
            fused.bf16_rows_max_requests,
            fused.dense_chunk,
            "on int4" if fused.prefill_int4 else f"dense in calls of {fused.prefill_block} rows",
            "fp32 (of bf16 weights)" if fused.widen else str(self.weight_dtype).removeprefix("torch."),
            fused.row_multiple,
        )
        return fused

    def _decode_graphs(self, make_graph: Callable[[], Graph] | None = None) -> DecodeGraphs:
        """make_graph: see DecodeGraphs (tests pass EagerGraph to run the graph path on a CPU)."""
        return DecodeGraphs(
            self.model,
            self.kv_caches,
            self.backend,
            self.config.max_num_seqs,
            self.max_model_len,
            self.block_size,
            self.model_config.hidden_size,
            self.dtype,
            self.device,
            make_graph,
        )

    # --- one step -------------------------------------------------------------------

    def _prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        query_lens: list[int] = []
        num_drafts = 0
        # Decode requests (one new output token, and its drafts) first, then prefill chunks: the
        # fused CPU path multiplies the two row sets by different weights (fused_cpu/decode.py).
        decodes = [
            _decodes(r, n, batch.drafts(i))
            for i, (r, n) in enumerate(zip(batch.requests, batch.num_new_tokens, strict=True))
        ]
        order = [i for i, d in enumerate(decodes) if d] + [i for i, d in enumerate(decodes) if not d]
        first_row = [0] * len(batch.requests)
        # Filled row by row through numpy: building a nested list and converting it costs 3x
        # as much (1.7 vs 0.55 ms for 256 requests x 129 blocks).
        max_blocks = max(len(r.block_table) for r in batch.requests)
        tables = torch.zeros((len(batch.requests), max_blocks), dtype=torch.int32, pin_memory=self._pin)
        table_rows = tables.numpy()
        for row, i in enumerate(order):
            req, n = batch.requests[i], batch.num_new_tokens[i]
            start = req.num_computed_tokens
            end = start + n
            drafts = batch.drafts(i)
            input_ids.extend(req.all_token_ids[start : end - len(drafts)])
            input_ids.extend(drafts)
            num_drafts += len(drafts)
            positions.extend(range(start, end))
            table = req.block_table
            table_rows[row, : len(table)] = table
            for blk in range(start // bs, (end - 1) // bs + 1):  # per block, not per token
                base = (table[blk] - blk) * bs
                slots.extend(range(base + max(start, blk * bs), base + min(end, (blk + 1) * bs)))
            first_row[i] = query_start[-1]
            query_start.append(query_start[-1] + n)
            query_lens.append(n)
            seq_lens.append(end)
        # In the batch's order (execute() reads the sampled rows so): every draft position too, each is verified.
        sample_rows: list[int] = []
        for i, n in enumerate(batch.num_new_tokens):
            if batch.sample_flags[i]:
                sample_rows.extend(range(first_row[i] + n - 1 - len(batch.drafts(i)), first_row[i] + n))

        i32 = torch.int32
        md = AttentionMetadata(
            num_reqs=len(batch.requests),
            num_tokens=len(input_ids),
            query_start_loc=self._to_device(query_start, i32),
            seq_lens=self._to_device(seq_lens, i32),
            block_tables=tables.to(self.device, non_blocking=True) if self._pin else tables,
            slot_mapping=self._to_device(slots, torch.long),
            max_query_len=max(batch.num_new_tokens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            num_draft_tokens=num_drafts,
            num_prefill_reqs=decodes.count(False),
        )
        ids = self._to_device(input_ids, torch.long)
        pos = self._to_device(positions, torch.long)
        return ids, pos, md, sample_rows

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        if not self._pin:
            return torch.tensor(values, dtype=dtype)
        # Pinned staging makes the copy asynchronous; the step's single sync (reading the
        # sampled tokens back) orders it, and the caching host allocator keeps the staging
        # memory alive until the copy has run.
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(self.device, non_blocking=True)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        """The final hidden states [num_tokens, hidden] of one step: through the CUDA graphs or
        the compiled CPU decode where they apply, else eagerly."""
        if self.graphs is not None and self.graphs.can_run(md):
            return self.graphs.run(input_ids, positions, md)
        if self.fused is not None and self.fused.can_run(md):
            return self.fused.run(input_ids, positions, self.kv_caches, md)
        if self.compiled is not None and self.compiled.can_run(md):
            return self.compiled.run(input_ids, positions, self.kv_caches, md)
        return self.model(input_ids, positions, self.kv_caches, md, self.backend)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[list[int]], list[list[TokenLogprob] | None]]:
        """Run one step. Returns, per request of the batch, its new tokens ([] for a request
        still in the middle of its prefill; its accepted drafts then one sampled token for a
        row that verifies drafts, else one sampled token) and their logprobs if asked for."""
        ids, pos, md, sample_rows = self._prepare(batch)
        hidden = self.forward(ids, pos, md)
        sampled: list[list[int]] = [[] for _ in batch.requests]
        logprobs: list[list[TokenLogprob] | None] = [None] * len(batch.requests)
        if not sample_rows:
            return sampled, logprobs

        # One sampling row per verified position: row j of a request with drafts d sees the
        # outputs so far plus d[:j], as it would have had those drafts been sampled.
        sampling_reqs = [i for i, flag in enumerate(batch.sample_flags) if flag]
        row_reqs: list[int] = []
        outputs: list[list[int]] = []
        num_outputs: list[int] = []
        # A grammar request's rows are masked each by its grammar's state after the drafts
        # before that row: (its first row, grammar, drafts).
        grammars: list[tuple[int, RequestGrammar, list[int]]] = []
        for i in sampling_reqs:
            req, drafts = batch.requests[i], batch.drafts(i)
            if req.grammar is not None:
                grammars.append((len(row_reqs), req.grammar, drafts))
            so_far = req.output_token_ids
            row_reqs += [i] * (len(drafts) + 1)
            num_outputs += range(len(so_far), len(so_far) + len(drafts) + 1)
            sp = req.sampling_params
            if drafts and (sp.repetition_penalty != 1.0 or sp.frequency_penalty or sp.presence_penalty):
                outputs += [so_far + drafts[:j] for j in range(len(drafts) + 1)]
            else:  # only the counts matter (seeds, min_tokens): no copies
                outputs += [so_far] * (len(drafts) + 1)
        reqs = [batch.requests[i] for i in row_reqs]
        row_index = self._to_device(sample_rows, torch.long)
        logits = self.model.compute_logits(hidden.index_select(0, row_index), len(sampling_reqs))
        sbatch = SamplingBatch.build(
            params=[r.sampling_params for r in reqs],
            prompt_token_ids=[r.prompt_token_ids for r in reqs],
            output_token_ids=outputs,
            eos_token_ids=[r.eos_token_ids for r in reqs],
            device=self.device,
            num_output_tokens=num_outputs,
        )
        if grammars:
            # On a GPU the forward is still running: the masks are filled while it does.
            sbatch.grammar_bitmask = fill_bitmask(grammars, len(reqs), logits.shape[1])
            sbatch.grammar_rows = [r for first, _, drafts in grammars for r in range(first, first + len(drafts) + 1)]
        out = self.sampler(logits, sbatch)
        tokens = out.token_ids.tolist()  # the one device->host copy of the step
        lp = out.logprobs.tolist() if out.logprobs is not None else None
        top = None
        if out.top_logprobs is not None:
            top = (out.top_logprobs[0].tolist(), out.top_logprobs[1].tolist())
        row = 0
        for i in sampling_reqs:
            drafts = batch.drafts(i)
            accepted = verify_drafts(drafts, tokens[row : row + len(drafts) + 1])
            sampled[i] = accepted
            k = batch.requests[i].sampling_params.logprobs
            if k is not None and lp is not None:
                logprobs[i] = [
                    TokenLogprob(
                        tokens[j], lp[j], list(zip(top[1][j][:k], top[0][j][:k], strict=True)) if (top and k) else []
                    )
                    for j in range(row, row + len(accepted))
                ]
            row += len(drafts) + 1
        return sampled, logprobs
