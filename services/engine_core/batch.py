"""What the scheduler decides for one step and the model runner executes (vLLM's SchedulerOutput)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.engine_core.request import Request


@dataclass
class ScheduledBatch:
    requests: list[Request]
    """Order = row order in the model input."""
    num_new_tokens: list[int]
    """Request i computes all_token_ids[num_computed_tokens:] followed by its draft tokens,
    n tokens in all (drafts included)."""
    sample_flags: list[bool]
    """Whether request i samples a token this step: it reaches the end of its known tokens
    (the other rows are non-final prefill chunks). Decided at schedule time, so it stays
    right after update() has advanced the requests."""
    preempted: list[Request] = field(default_factory=list)
    """Preempted during this schedule() (informational; they hold no blocks now)."""
    spec_token_ids: list[list[int]] = field(default_factory=list)
    """Draft tokens request i verifies this step (the last len() of its n tokens); [] for
    most rows. Empty list (no rows at all) when nothing speculates."""

    @classmethod
    def of(
        cls,
        scheduled: dict[Request, int],
        preempted: list[Request],
        drafts: dict[Request, list[int]] | None = None,
    ) -> ScheduledBatch:
        """From the scheduler's {request: new tokens} (drafts included), in row order."""
        requests = list(scheduled)
        num_new_tokens = list(scheduled.values())
        spec = [drafts.get(r, []) for r in requests] if drafts else []
        flags = [
            r.num_computed_tokens + n - (len(spec[i]) if spec else 0) == r.num_tokens
            for i, (r, n) in enumerate(scheduled.items())
        ]
        return cls(requests, num_new_tokens, flags, preempted, spec)

    def drafts(self, i: int) -> list[int]:
        return self.spec_token_ids[i] if self.spec_token_ids else []

    def rows(self, lo: int, hi: int) -> ScheduledBatch:
        """Rows lo:hi as a batch of their own."""
        return ScheduledBatch(
            requests=self.requests[lo:hi],
            num_new_tokens=self.num_new_tokens[lo:hi],
            sample_flags=self.sample_flags[lo:hi],
            spec_token_ids=self.spec_token_ids[lo:hi],
        )

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.requests)
