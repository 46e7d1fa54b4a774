"""Per-request acceptance tracking: stop proposing for a request whose drafts keep failing.

A rejected draft costs a verification row's compute for nothing, so a request whose
acceptance stays low backs off (exponentially, capped) and re-probes now and then: text
that starts repeating its input later is still sped up.
"""

from __future__ import annotations

_WINDOW = 16
"""Draft tokens judged together."""
_MIN_RATE = 0.2
"""Below this acceptance rate over a window the request backs off."""
_FIRST_BACKOFF = 4
_MAX_BACKOFF = 64
"""Steps without proposals after a bad window: doubling from the first to the max."""


class AcceptanceTracker:
    __slots__ = ("_accepted", "_backoff", "_proposed", "_skip")

    def __init__(self) -> None:
        self._proposed = 0
        self._accepted = 0
        self._skip = 0
        self._backoff = 0

    def should_propose(self) -> bool:
        """Called once per step the request decodes."""
        if self._skip > 0:
            self._skip -= 1
            return False
        return True

    def record(self, proposed: int, accepted: int) -> None:
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
