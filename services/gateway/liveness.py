"""Which tokenizer workers and engine cores are alive, as the gateway knows it.

Two sources: reports (worker heartbeats, engine stats relayed by the workers) and the
launcher's ComponentDown notices. A component that has not reported for engine_timeout_s
is silent (a hung or unreachable process: nothing will answer its requests); one the
launcher reported dead is restarting until it reports again, and only a report made after
its death counts, since the dead process's last messages may still be on their way.
"""

from __future__ import annotations

import time

WORKER = "tokenizer_worker"
ENGINE = "engine"
Component = tuple[str, int]
# Seconds a client should wait before retrying a request refused while a component restarts.
RETRY_AFTER_S = 2


class ServiceUnavailable(Exception):
    """A worker or engine is down (or the gateway is shutting down): a 503."""

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Liveness:
    def __init__(self, num_workers: int, num_engines: int, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._seen: dict[str, list[float | None]] = {WORKER: [None] * num_workers, ENGINE: [None] * num_engines}
        """Monotonic time of the last report."""
        self._down: dict[Component, float] = {}
        """Restarting components, with the wall time of their death."""

    def count(self, kind: str) -> int:
        return len(self._seen[kind])

    def heard(self, kind: str, index: int, timestamp: float | None = None) -> bool:
        """Record a report (timestamp: when the component made it, wall time, if known).
        True when the report revives a restarting component."""
        seen = self._seen[kind]
        if not 0 <= index < len(seen):
            return False
        died = self._down.get((kind, index))
        if died is not None:
            if timestamp is None or timestamp <= died:
                return False  # the dead process's late message
            del self._down[(kind, index)]
            seen[index] = time.monotonic()
            return True
        seen[index] = time.monotonic()
        return False

    def went_down(self, kind: str, index: int, timestamp: float) -> bool:
        """The launcher saw it die and restarts it. False for an unknown component."""
        if kind not in self._seen or not 0 <= index < len(self._seen[kind]):
            return False
        self._down[(kind, index)] = timestamp
        self._seen[kind][index] = None
        return True

    def problem(self, kind: str, index: int) -> str | None:
        """Why this component cannot take requests now, or None."""
        name = f"{kind.replace('_', ' ')} {index}"
        if (kind, index) in self._down:
            return f"{name} is restarting"
        t = self._seen[kind][index]
        if t is None:
            return f"{name} has not reported yet"
        age = time.monotonic() - t
        if age > self.timeout_s:
            return f"{name} has not reported for {age:.1f}s"
        return None

    def restarting(self, component: Component) -> bool:
        return component in self._down

    def silent(self) -> set[Component]:
        """Components that are neither reporting nor known to be restarting."""
        return {
            (kind, i)
            for kind, seen in self._seen.items()
            for i in range(len(seen))
            if (kind, i) not in self._down and self.problem(kind, i) is not None
        }

    def health(self) -> str | None:
        """None when every component is up, else the first problem."""
        for kind, seen in self._seen.items():
            for i in range(len(seen)):
                problem = self.problem(kind, i)
                if problem is not None:
                    return problem
        return None

    def components(self) -> list[tuple[str, int, bool]]:
        """(component, index, up) of every worker and engine, for the metrics."""
        return [(kind, i, self.problem(kind, i) is None) for kind, seen in self._seen.items() for i in range(len(seen))]
