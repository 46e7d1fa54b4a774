"""Per-request acceptance tracking: how many drafts a request proposes, and when it stops.

A rejected draft costs verification compute for nothing. With adaptive draft lengths (the
default) the request keeps a running estimate of its acceptance rate alpha, and the draft
length is the one with the best expected tokens per unit of step time (draft_length.py); when
that is 0 the request backs off (exponentially, capped) and then probes afresh with the
drafts the prior alpha pays for (as many as cost what one does: 2 in the CPU default), so text
that starts repeating its input later is still sped up; a probe that fails backs off again at
once (it is the test, not the start of another run of failing drafts). With a fixed draft length a
request whose acceptance stays low over a window backs off the same way.
"""

from __future__ import annotations

from services.engine_core.speculative.draft_length import StepPlan

_WINDOW = 16
"""Fixed draft length: draft tokens judged together."""
_MIN_RATE = 0.2
"""Fixed draft length: below this acceptance rate over a window the request backs off."""
_FIRST_BACKOFF = 4
_MAX_BACKOFF = 64
"""Steps without proposals after a bad window (or a draft length of 0): doubling from the first to the max."""
_RECENCY = 0.7
"""Weight of the earlier verifications in alpha at each new one: text moves in and out of copying quickly."""
_PRIOR_ALPHA = 0.5
_PRIOR_WEIGHT = 1.0
"""alpha starts at the prior (and again at every probe), worth this many draft positions."""


class AcceptanceTracker:
    __slots__ = (
        "_accepted",
        "_accepted_sum",
        "_backoff",
        "_probe",
        "_probing",
        "_proposed",
        "_skip",
        "_tried_sum",
        "adaptive",
    )

    def __init__(self, adaptive: bool = False) -> None:
        self.adaptive = adaptive
        """Adaptive draft lengths (draft_length()); else a fixed one (should_propose())."""
        self._proposed = 0
        self._accepted = 0
        self._skip = 0
        self._backoff = 0
        self._probe = False
        """The next draft length of 0 is a probe instead (the backoff ran out)."""
        self._probing = False
        """The drafts being verified are a probe."""
        # Recency-weighted draft positions tried and accepted (a rejection ends a run, so a
        # verification of k drafts with a accepted tried a + 1 positions, k when all passed),
        # starting from the prior's pseudo-counts, which fade like any other verification's:
        # drafts that always fail drive alpha to 0, not to a floor that keeps paying for them.
        self._reset_alpha()

    def _reset_alpha(self) -> None:
        self._tried_sum = _PRIOR_WEIGHT
        self._accepted_sum = _PRIOR_ALPHA * _PRIOR_WEIGHT

    @property
    def alpha(self) -> float:
        """The estimated chance that a draft is accepted, given the drafts before it were."""
        return self._accepted_sum / self._tried_sum

    def draft_length(self, max_k: int, plan: StepPlan) -> int:
        """Adaptive: the drafts to propose this step (0: decode plainly), given the step's drafts
        so far. Called once per step the request decodes."""
        if self._skip > 0:
            self._skip -= 1
            return 0
        self._probing = False
        if self._probe:
            # The backoff ran out: the text may have changed since (a model that starts quoting
            # or looping), so alpha starts again from the prior, and the drafts it pays for probe it.
            self._probe = False
            self._probing = True
            self._reset_alpha()
            return max(plan.best(self.alpha, max_k), 1)
        k = plan.best(self.alpha, max_k)
        if k > 0:
            return k
        self._back_off()
        self._skip -= 1  # this step is the first of them
        return 0

    def _back_off(self) -> None:
        """No drafts for the next backoff steps (doubling from the last, capped), then a probe."""
        self._backoff = min(max(2 * self._backoff, _FIRST_BACKOFF), _MAX_BACKOFF)
        self._skip = self._backoff
        self._probe = True

    def should_propose(self) -> bool:
        """Fixed draft length: whether to propose this step. Called once per step the request decodes."""
        if self._skip > 0:
            self._skip -= 1
            return False
        return True

    def record(self, proposed: int, accepted: int) -> None:
        tried = accepted + (accepted < proposed)
        self._tried_sum = self._tried_sum * _RECENCY + tried
        self._accepted_sum = self._accepted_sum * _RECENCY + accepted
        if self.adaptive:
            if self._probing and accepted == 0:
                self._back_off()  # a failed probe: no run of drafts while alpha fades from the prior
            elif self.alpha >= _PRIOR_ALPHA:  # drafts pay again: a later backoff starts short
                self._backoff = 0
            self._probing = False
            return
        self._proposed += proposed
        self._accepted += accepted
        if self._proposed < _WINDOW:
            return
        if self._accepted < _MIN_RATE * self._proposed:
            self._backoff = min(max(2 * self._backoff, _FIRST_BACKOFF), _MAX_BACKOFF)
            self._skip = self._backoff
        else:
            self._backoff = 0
        self._proposed = self._accepted = 0
