"""The engine: scheduler + block manager + model runner, stepped by its caller.

Used in-process by the offline `LLM` and by the engine-core process's loop.
"""

from __future__ import annotations

import logging
import time

import msgspec

from services.engine_core.batch import ScheduledBatch
from services.engine_core.block_manager import BlockManager
from services.engine_core.model_runner import ModelRunner
from services.engine_core.request import Request, RequestStatus
from services.engine_core.scheduler import Scheduler
from services.engine_core.speculative.acceptance import AcceptanceTracker
from services.engine_core.speculative.draft_length import StepCost, StepPlan
from services.engine_core.speculative.proposer import make_proposer
from services.engine_core.structured_output import CompileJob, GrammarError, StructuredOutputManager
from shared.config import EngineConfig
from shared.errors import InvalidRequest, check_context_length
from shared.model_files import resolve_model
from shared.model_info import eos_token_ids
from shared.protocol import (
    FINISH_ABORT,
    EngineOutput,
    EngineStats,
    ErrorInfo,
    ReasoningTokens,
    SamplingParams,
    TokenLogprob,
)

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, engine_index: int = 0, record_kv_events: bool = False) -> None:
        self.config = config
        self.engine_index = engine_index
        self.runner = ModelRunner(config)
        self.model_config = self.runner.model_config
        self.max_model_len = self.runner.max_model_len
        self.eos_token_ids = eos_token_ids(resolve_model(config.model))
        """For requests that bring none (the tokenizer pool sends its own, the same plus the tokenizer's EOS)."""
        self.block_manager = BlockManager(
            self.runner.num_blocks,
            config.block_size,
            config.enable_prefix_caching,
            record_events=record_kv_events,
            medium="GPU" if self.runner.device.type == "cuda" else "CPU",
        )
        self.scheduler = Scheduler(config, self.block_manager, self.max_model_len)
        self.structured_output = StructuredOutputManager(config, self.model_config.vocab_size)
        self.proposer = make_proposer(config)
        self._compiling: dict[str, tuple[Request, CompileJob]] = {}
        """Structured-output requests whose grammar is compiling; the scheduler has not seen them."""
        self._steps = 0
        self._last_step_time = 0.0
        self._last_batch_size = 0
        self._last_num_tokens = 0
        # Speculative decoding counters (vLLM's): verification rows with drafts, their draft
        # tokens, the accepted ones, and accepted ones by draft position.
        self._spec_drafts = 0
        self._spec_draft_tokens = 0
        self._spec_accepted_tokens = 0
        self._spec_accepted_per_pos = [0] * (config.num_speculative_tokens if self.proposer else 0)
        self._adaptive_k = self.proposer is not None and config.speculative_adaptive_draft_length
        self._step_cost = StepCost()
        """Time of decode/verify steps by their decode rows and draft tokens: what a draft costs (adaptive k)."""

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: list[int] | None = None,
        arrival_time: float | None = None,
        reasoning: ReasoningTokens | None = None,
    ) -> None:
        """Raise InvalidRequest if the client must change the request. reasoning: a reasoning
        model's thinking delimiters; a grammar then constrains only the answer after them."""
        sampling_params.validate()
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        vocab = self.model_config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if any(not 0 <= t < vocab for t in sampling_params.stop_token_ids):
            raise InvalidRequest(f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
        if sampling_params.logit_bias and max(sampling_params.logit_bias) >= vocab:
            raise InvalidRequest(f"logit_bias token ids must be in [0, {vocab})", param="logit_bias")
        n = len(prompt_token_ids)
        check_context_length(n, sampling_params.max_tokens, self.max_model_len, "prompt")
        if eos_token_ids is None:
            eos_token_ids = self.eos_token_ids
        max_tokens = self.max_model_len - n if sampling_params.max_tokens is None else sampling_params.max_tokens
        req = Request(request_id, prompt_token_ids, sampling_params, eos_token_ids, arrival_time, max_tokens)
        if self._adaptive_k:
            req.spec_acceptance = AcceptanceTracker(adaptive=True)
        spec = sampling_params.structured_output
        if spec is None:
            self.scheduler.add_request(req)
            return
        if request_id in self._compiling or self.scheduler.get_request(request_id) is not None:
            raise ValueError(f"request id {request_id!r} is already in use")
        job = self.structured_output.submit(spec)
        if job.error is not None:
            raise GrammarError(job.error)
        if reasoning is not None and all(0 <= t < vocab for t in reasoning.end):
            # (a `</think>` the model cannot write would never end the thinking: then the grammar
            # applies from the first token)
            start = reasoning.start if reasoning.start is not None and 0 <= reasoning.start < vocab else None
            req.reasoning = msgspec.structs.replace(reasoning, start=start)
        self._compiling[request_id] = (req, job)

    def set_tokenizer_vocab(self, tokenizer_json: str, eos_token_ids: list[int]) -> None:
        """The vocabulary structured outputs mask over (a tokenizers JSON document)."""
        self.structured_output.set_vocab(tokenizer_json, eos_token_ids)

    def _admit_compiled(self) -> list[EngineOutput]:
        """Hand requests whose grammar is ready to the scheduler; fail those whose grammar
        cannot be served. Returns the failures."""
        failed: list[EngineOutput] = []
        for request_id, (req, job) in list(self._compiling.items()):
            try:
                compiled = self.structured_output.poll(job)
                if compiled is None:
                    continue
                req.grammar = self.structured_output.matcher(compiled, req.eos_token_ids, req.reasoning)
                self.scheduler.add_request(req)
            except InvalidRequest as e:  # GrammarError, or the scheduler refusing the request
                failed.append(
                    EngineOutput(
                        request_id=request_id,
                        finish_reason=FINISH_ABORT,
                        num_prompt_tokens=req.num_prompt_tokens,
                        error=ErrorInfo.invalid(e),
                    )
                )
            except Exception as e:
                log.exception("failed to admit request %s", request_id)
                failed.append(
                    EngineOutput(
                        request_id=request_id,
                        finish_reason=FINISH_ABORT,
                        num_prompt_tokens=req.num_prompt_tokens,
                        error=ErrorInfo(message=f"internal error: {e}", status=500),
                    )
                )
            del self._compiling[request_id]
        return failed

    def abort(self, request_ids: list[str]) -> list[EngineOutput]:
        compiling = [self._compiling.pop(rid)[0] for rid in request_ids if rid in self._compiling]
        aborted = self.scheduler.abort(request_ids)
        self._release(aborted)
        return [
            EngineOutput(
                request_id=r.request_id,
                finish_reason=FINISH_ABORT,
                num_prompt_tokens=r.num_prompt_tokens,
                num_cached_tokens=r.num_cached_tokens,
            )
            for r in compiling + aborted
        ]

    def _release(self, requests: list[Request]) -> None:
        """Requests that left the scheduler: the proposer may keep their tokens as a corpus."""
        if self.proposer is not None:
            for r in requests:
                self.proposer.finish(r.request_id, r.all_token_ids, r.num_prompt_tokens)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or bool(self._compiling)

    @property
    def only_compiling(self) -> bool:
        """Nothing to step but grammars to wait for: the caller may sleep a little between polls."""
        return not self.scheduler.has_unfinished and bool(self._compiling)

    def step(self) -> list[EngineOutput]:
        """One iteration: schedule, run the model, sample, and report every request that
        got a new token or finished."""
        t0 = time.perf_counter()
        outputs = self._admit_compiled() if self._compiling else []
        if self.proposer is not None:
            # Here rather than after the previous step: its outputs are already on their way.
            self._propose()
        batch = self.scheduler.schedule()
        if not batch.requests:
            return outputs
        try:
            t_exec = time.perf_counter()
            sampled, logprobs = self.runner.execute(batch)
            if self._adaptive_k and _only_decodes(batch):
                num_decodes = len(batch.requests)
                self._step_cost.record(num_decodes, batch.total_tokens - num_decodes, time.perf_counter() - t_exec)
        except Exception as e:
            log.exception("engine step of %d requests failed: finding the request(s) responsible", len(batch))
            sampled, logprobs, failed = self._execute_isolated(batch)
            outputs += self._fail(failed, f"internal engine error while running this request: {e!r}")
        num_before = [r.num_output_tokens for r in batch.requests]
        finished = self.scheduler.update(batch, sampled)
        if batch.spec_token_ids:
            self._count_acceptance(batch, sampled)
        if self.proposer is not None:
            self._release(finished)
        for i, req in enumerate(batch.requests):
            # The tokens update() appended: a stop inside an accepted run drops those after it.
            new_tokens = req.output_token_ids[num_before[i] :]
            if not new_tokens:
                continue
            first = num_before[i] == 0
            lp = logprobs[i]
            outputs.append(
                EngineOutput(
                    request_id=req.request_id,
                    new_token_ids=new_tokens,
                    finish_reason=req.status.finish_reason,
                    stop_token_id=req.stop_token_id if req.status is RequestStatus.FINISHED_STOPPED else None,
                    logprobs=lp[: len(new_tokens)] if lp is not None else None,
                    num_prompt_tokens=req.num_prompt_tokens,
                    num_cached_tokens=req.num_cached_tokens,
                    first_scheduled_time=req.first_scheduled_time if first else None,
                )
            )
        self._steps += 1
        self._last_step_time = time.perf_counter() - t0
        self._last_batch_size = len(batch.requests)
        self._last_num_tokens = batch.total_tokens
        return outputs

    def _propose(self) -> None:
        """Draft tokens for every request whose next step is a decode. A structured-output
        request's drafts stop before the first token its grammar rejects: the target could
        never sample it there, so verifying it and what follows would be wasted rows."""
        assert self.proposer is not None
        max_k = self.config.num_speculative_tokens
        decodes = []
        for req in self.scheduler.running:
            req.spec_token_ids = []
            if req.num_tokens - req.num_computed_tokens == 1:
                decodes.append(req)
        # The requests choose their draft lengths in turn, each given the drafts of those before it.
        plan = StepPlan(self._step_cost, len(decodes)) if self._adaptive_k else None
        for req in decodes:
            tracker = req.spec_acceptance
            k = tracker.draft_length(max_k, plan) if plan is not None else max_k * tracker.should_propose()
            if k > 0:
                drafts = self.proposer.propose(req.request_id, req.all_token_ids, req.num_prompt_tokens, k)[:k]
                if drafts and req.grammar is not None:
                    drafts = drafts[: req.grammar.validate(drafts)]
                req.spec_token_ids = drafts
                if plan is not None:
                    plan.add(len(drafts), tracker.alpha)

    def _count_acceptance(self, batch: ScheduledBatch, sampled: list[list[int]]) -> None:
        for i, drafts in enumerate(batch.spec_token_ids):
            if not drafts or not sampled[i]:
                continue
            accepted = len(sampled[i]) - 1
            batch.requests[i].spec_acceptance.record(len(drafts), accepted)
            self._spec_drafts += 1
            self._spec_draft_tokens += len(drafts)
            self._spec_accepted_tokens += accepted
            for pos in range(accepted):
                self._spec_accepted_per_pos[pos] += 1

    def _execute_isolated(
        self, batch: ScheduledBatch
    ) -> tuple[list[list[int]], list[list[TokenLogprob] | None], list[Request]]:
        """Run a batch whose step raised by halves, down to the single requests that still
        raise: those are returned as failed (with no token), every other request gets its
        step. One poisoned request costs about 2 log2(batch size) extra forwards, once.

        Re-running rows is safe: a forward writes the same KV slots with the same values,
        and nothing else changes before scheduler.update()."""
        try:
            whole, whole_logprobs = self.runner.execute(batch)
            return whole, whole_logprobs, []
        except Exception:
            if len(batch) == 1:
                return [[]], [None], list(batch.requests)
        mid = len(batch) // 2
        halves = [batch.rows(lo, hi) for lo, hi in ((0, mid), (mid, len(batch)))]
        sampled: list[list[int]] = []
        logprobs: list[list[TokenLogprob] | None] = []
        failed: list[Request] = []
        for half in halves:
            s, lp, f = self._execute_isolated(half)
            sampled += s
            logprobs += lp
            failed += f
        return sampled, logprobs, failed

    def _fail(self, requests: list[Request], message: str) -> list[EngineOutput]:
        """End these requests with an error (their KV blocks are freed); the others carry on."""
        for req in requests:
            log.error("request %s failed in the engine: %s", req.request_id, message)
        failed = self.scheduler.abort([r.request_id for r in requests])
        self._release(failed)
        return [
            EngineOutput(
                request_id=r.request_id,
                finish_reason=FINISH_ABORT,
                num_prompt_tokens=r.num_prompt_tokens,
                error=ErrorInfo(message=message, status=500),
            )
            for r in failed
        ]

    def stats(self) -> EngineStats:
        bm, sched = self.block_manager, self.scheduler
        return EngineStats(
            engine_index=self.engine_index,
            timestamp=time.time(),
            run_mode=self.runner.mode,
            num_running=sched.num_running,
            num_waiting=sched.num_waiting + len(self._compiling),
            num_preempted=sched.num_preempted,
            kv_usage=bm.usage,
            num_blocks=bm.num_blocks,
            prefix_queries_total=bm.prefix_queries_total,
            prefix_hits_total=bm.prefix_hits_total,
            preemptions_total=sched.preemptions_total,
            steps_total=self._steps,
            last_step_time_s=self._last_step_time,
            last_batch_size=self._last_batch_size,
            last_num_batched_tokens=self._last_num_tokens,
            spec_num_drafts=self._spec_drafts,
            spec_num_draft_tokens=self._spec_draft_tokens,
            spec_num_accepted_tokens=self._spec_accepted_tokens,
            spec_num_accepted_tokens_per_pos=list(self._spec_accepted_per_pos),
        )


def _only_decodes(batch: ScheduledBatch) -> bool:
    """Every row decodes one token or verifies drafts: no prefill chunk in the step."""
    return all(batch.sample_flags) and all(n == 1 + len(batch.drafts(i)) for i, n in enumerate(batch.num_new_tokens))
