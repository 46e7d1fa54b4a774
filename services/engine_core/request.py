"""A request's state inside the engine core."""

from __future__ import annotations

import enum
import time
from typing import Any

from services.engine_core.speculative.acceptance import AcceptanceTracker
from shared.protocol import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, ReasoningTokens, SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASON.get(self)


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
}
_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: FINISH_STOP,
    RequestStatus.FINISHED_LENGTH: FINISH_LENGTH,
    RequestStatus.FINISHED_ABORTED: FINISH_ABORT,
}


class Request:
    """Tokens [0, num_computed_tokens) have their K/V in the blocks of block_table.

    Preemption (by recompute) drops the blocks and resets num_computed_tokens to 0,
    keeping output_token_ids: on resume the prompt and the outputs so far are
    prefilled again, so generation continues exactly where it stopped.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: list[int] | tuple[int, ...] = (),
        arrival_time: float | None = None,
        max_tokens: int | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = tuple(eos_token_ids)
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.max_tokens = max_tokens if max_tokens is not None else (sampling_params.max_tokens or 1)
        """Resolved output limit (sampling_params.max_tokens capped by the context length)."""
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.chain_ids: list[int] = []
        """The prefix-cache chain ids of this request's full blocks, in order (BlockManager's)."""
        self.num_cached_tokens = 0
        """Prompt tokens served from the prefix cache, known from the first scheduling on."""
        self.first_scheduled_time: float | None = None
        self.stop_token_id: int | None = None
        self.grammar: Any = None
        """The RequestGrammar of a structured-output request (see structured_output.py)."""
        self.reasoning: ReasoningTokens | None = None
        """A reasoning model's thinking delimiters: the grammar applies after them."""
        self.spec_token_ids: list[int] = []
        """Draft tokens proposed for the next step (speculative decoding): verified, never trusted."""
        self.spec_acceptance = AcceptanceTracker()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.name}, prompt={self.num_prompt_tokens}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens})"
        )
