"""Iteration-level (continuous) batching with chunked prefill and preemption by recompute.

Every step, `schedule()` picks how many new tokens each request computes within a token
budget; the engine runs the model on that batch and hands the sampled tokens to
`update()`. Decodes (1 token) are scheduled before prefill chunks, so a long prompt is
spread over several steps instead of stalling the requests that are generating.

Speculative decoding: a decoding request may carry draft tokens (req.spec_token_ids, set by
the engine's proposer); its row then verifies them too, 1 + k tokens like a small prefill
chunk. Drafts are scheduled last, from the token budget and free blocks left once every
request has its share, so speculation never starves or preempts anyone. update() keeps the
accepted drafts' K/V and rolls the rest back: num_computed_tokens only ever counts accepted
tokens (so prefix-cache blocks only ever hold them), and blocks past them are freed; a
structured-output request's grammar advances by the tokens kept, in order, and no further.

Liveness: add_request only admits requests whose prompt + 1 token fits the whole cache,
and a request finishes (length) once it would outgrow the cache, so any one request can
always run alone. Only the newest running request is ever preempted, so the oldest one
always advances and every request finishes in a bounded number of steps.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

from services.engine_core.batch import ScheduledBatch
from services.engine_core.block_manager import BlockManager
from services.engine_core.request import Request, RequestStatus
from shared.config import EngineConfig
from shared.errors import InvalidRequest

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, max_model_len: int) -> None:
        if config.max_num_batched_tokens < 1 or config.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be at least 1")
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self._cache_tokens = block_manager.num_blocks * block_manager.block_size
        # A request stops once it has this many tokens: beyond the cache it could never run.
        self._len_limit = min(max_model_len, self._cache_tokens)
        self.running: list[Request] = []
        """Oldest admission first; preemption takes from the end."""
        self.waiting: OrderedDict[str, Request] = OrderedDict()
        """FCFS; preempted requests go to the front. Keyed by id for O(1) abort."""
        self._requests: dict[str, Request] = {}
        self.num_preempted = 0
        """Preempted requests currently waiting to resume."""
        self.preemptions_total = 0

    # --- gauges ----------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Includes preempted requests."""
        return len(self.waiting)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    # --- admission -------------------------------------------------------------------

    def add_request(self, req: Request) -> None:
        """The engine checked the prompt against the context length (check_context_length);
        what is left is the cache, which may be smaller than the context."""
        n = req.num_prompt_tokens
        if self.block_manager.blocks_needed(n + 1) > self.block_manager.num_blocks:
            raise InvalidRequest(
                f"the prompt has {n} tokens but this server's KV cache holds only {self._cache_tokens} tokens "
                f"({self.block_manager.num_blocks} blocks of {self.block_manager.block_size}); "
                "the prompt plus at least 1 output token must fit",
                param="prompt",
                code="context_length_exceeded",
            )
        if req.request_id in self._requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        req.status = RequestStatus.WAITING
        self._requests[req.request_id] = req
        self.waiting[req.request_id] = req

    # --- one step --------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        scheduled: dict[Request, int] = {}  # insertion order = row order
        preempted: list[Request] = []

        decodes = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        prefills = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        for req in decodes + prefills:
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not bm.allocate_slots(req, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim in scheduled:  # a decode scheduled before this prefill chunk
                    budget += scheduled.pop(victim)
                if victim is req:
                    break
            else:
                scheduled[req] = n
                budget -= n

        # Under memory pressure admitting more (or speculating) would only cause more preemption.
        drafts: dict[Request, list[int]] = {}
        if not preempted:
            budget = self._admit(scheduled, budget)
            self._schedule_drafts(scheduled, budget, drafts)

        return ScheduledBatch.of(scheduled, preempted, drafts)

    def _schedule_drafts(self, scheduled: dict[Request, int], budget: int, drafts: dict[Request, list[int]]) -> None:
        """Extend decode rows by their draft tokens while budget and free blocks last."""
        bm = self.block_manager
        for req, n in list(scheduled.items()):
            if budget <= 0:
                break
            if not req.spec_token_ids or n != 1 or req.num_computed_tokens + 1 != req.num_tokens:
                continue
            # No draft past what the request may still produce: the step adds up to k + 1 tokens.
            room = min(req.max_tokens - req.num_output_tokens, self._len_limit - req.num_tokens) - 1
            k = min(len(req.spec_token_ids), budget, room)
            if k <= 0 or not bm.allocate_slots(req, 1 + k):
                continue
            scheduled[req] = 1 + k
            drafts[req] = req.spec_token_ids[:k]
            budget -= k

    def _admit(self, scheduled: dict[Request, int], budget: int) -> int:
        """Admit waiting requests in order while they fit; returns the budget left."""
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = next(iter(self.waiting.values()))
            computed = bm.get_computed_blocks(req)  # waiting requests hold no blocks
            cached = len(computed) * bm.block_size
            n = min(req.num_tokens - cached, budget)
            if not bm.allocate_slots(req, n, computed):
                break  # FCFS: nobody overtakes the head of the queue
            del self.waiting[req.request_id]
            if req.status is RequestStatus.PREEMPTED:
                self.num_preempted -= 1
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.time()
                req.num_cached_tokens = min(cached, req.num_prompt_tokens)
            self.running.append(req)
            scheduled[req] = n
            budget -= n
        return budget

    def _preempt(self, req: Request) -> None:
        """Preemption by recompute: drop the K/V, keep the outputs, resume first."""
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        self.waiting[req.request_id] = req
        self.waiting.move_to_end(req.request_id, last=False)
        self.num_preempted += 1
        self.preemptions_total += 1

    def update(self, batch: ScheduledBatch, sampled: Sequence[Sequence[int]]) -> list[Request]:
        """Apply a step's results; sampled[i] are the tokens request i produced: [] for rows
        that did not sample, else its accepted draft tokens then one token of the target model
        (one token without drafts). Tokens after a stop are dropped. Returns the requests that
        finished in this step."""
        if len(sampled) != len(batch.requests):
            raise ValueError(f"got {len(sampled)} sampled rows for a batch of {len(batch.requests)}")
        bm = self.block_manager
        finished: list[Request] = []
        for i, (req, n) in enumerate(zip(batch.requests, batch.num_new_tokens, strict=True)):
            if req.status is not RequestStatus.RUNNING:  # aborted since schedule()
                continue
            drafts = batch.drafts(i)
            # The known tokens are computed now; a draft's K/V counts only once it is accepted.
            req.num_computed_tokens += n - len(drafts)
            tokens = sampled[i] if batch.sample_flags[i] else ()
            if len(tokens) > len(drafts) + 1:
                raise ValueError(f"{req.request_id}: {len(tokens)} tokens from {len(drafts)} drafts")
            status = None
            for j, token in enumerate(tokens):
                if j > 0:  # tokens[j - 1] equals the draft that was input at this position
                    req.num_computed_tokens += 1
                req.append_output_token(token)
                status = self._check_stop(req, token)
                if status is not None:
                    break
            bm.cache_full_blocks(req)
            if status is not None:
                req.status = status
                bm.free(req)
                del self._requests[req.request_id]
                finished.append(req)
            elif drafts:
                bm.release_unused_blocks(req)  # the rejected drafts' slots
        if finished:
            self.running = [r for r in self.running if not r.finished]
        return finished

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        sp = req.sampling_params
        # min_tokens needs no check here: the sampler masks stop tokens below it.
        if req.grammar is not None:
            if not req.grammar.accept(token):
                # The mask allowed only tokens the grammar accepts: a bug, so end this request
                # alone rather than fail the step for everyone.
                log.error("%s: sampled token %d is outside its grammar", req.request_id, token)
                return RequestStatus.FINISHED_ABORTED
            if req.grammar.is_terminated():  # it accepted an end token
                req.stop_token_id = token
                return RequestStatus.FINISHED_STOPPED
        if (token in req.eos_token_ids and not sp.ignore_eos) or token in sp.stop_token_ids:
            req.stop_token_id = token
            return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self._len_limit:
            return RequestStatus.FINISHED_LENGTH
        return None

    def abort(self, request_ids: list[str]) -> list[Request]:
        aborted: list[Request] = []
        drop_running = False
        for rid in request_ids:
            req = self._requests.pop(rid, None)
            if req is None:
                continue
            if req.status is RequestStatus.RUNNING:
                drop_running = True
            else:
                del self.waiting[rid]
                if req.status is RequestStatus.PREEMPTED:
                    self.num_preempted -= 1
            self.block_manager.free(req)
            req.status = RequestStatus.FINISHED_ABORTED
            aborted.append(req)
        if drop_running:
            self.running = [r for r in self.running if not r.finished]
        return aborted
