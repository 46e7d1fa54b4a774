"""What the scheduler decides for one step and the model runner executes (vLLM's SchedulerOutput)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.engine_core.request import Request


@dataclass
class ScheduledBatch:
    requests: list[Request]
    """Order = row order in the model input."""
    num_new_tokens: list[int]
    """Request i computes all_token_ids[num_computed_tokens : num_computed_tokens + n]."""
    sample_flags: list[bool]
    """Whether request i samples a token this step: it reaches the end of its known tokens
    (the other rows are non-final prefill chunks). Decided at schedule time, so it stays
    right after update() has advanced the requests."""
    preempted: list[Request] = field(default_factory=list)
    """Preempted during this schedule() (informational; they hold no blocks now)."""

    @classmethod
    def of(cls, scheduled: dict[Request, int], preempted: list[Request]) -> ScheduledBatch:
        """From the scheduler's {request: new tokens}, in row order."""
        requests = list(scheduled)
        num_new_tokens = list(scheduled.values())
        flags = [r.num_computed_tokens + n == r.num_tokens for r, n in scheduled.items()]
        return cls(requests, num_new_tokens, flags, preempted)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.requests)
