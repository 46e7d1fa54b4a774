"""One API request in the gateway: the handle its HTTP handler drains, and the bookkeeping of
each engine request (child) it was split into (n > 1 or a list of prompts makes several)."""

from __future__ import annotations

import asyncio

from services.gateway.metrics import RequestTimer
from shared.protocol import GenerateRequest, RequestDelta


class RequestHandle:
    """One API request: its child engine requests and the deltas not yet consumed."""

    __slots__ = ("_event", "_pending", "child_ids", "request_id")

    def __init__(self, request_id: str, child_ids: list[str]) -> None:
        self.request_id = request_id
        self.child_ids = child_ids
        self._pending: list[RequestDelta] = []
        self._event = asyncio.Event()

    def push(self, delta: RequestDelta) -> None:
        self._pending.append(delta)
        self._event.set()

    async def next_batch(self) -> list[RequestDelta]:
        """Every delta received since the last call (waits for at least one)."""
        while not self._pending:
            self._event.clear()
            await self._event.wait()
        batch, self._pending = self._pending, []
        return batch


class ChildState:
    """Per engine request bookkeeping: where it was routed, and its latency timer."""

    __slots__ = ("engine", "handle", "parked_at", "request", "timer", "wire_id", "worker")

    def __init__(
        self, handle: RequestHandle, request: GenerateRequest, worker: int, engine: int, timer: RequestTimer
    ) -> None:
        self.handle = handle
        self.request = request
        """Kept to resubmit it if its engine or worker dies before it started."""
        self.wire_id = request.request_id
        """Its id towards the workers; a resubmitted request gets a new one, so that nothing the
        dead incarnation still sends can be taken for the new one's output."""
        self.worker = worker
        self.engine = engine
        self.parked_at: float | None = None
        """Monotonic time since which it waits for a restarted engine or worker (its own died
        before it started, or it arrived while the one it needs was restarting); None: sent."""
        self.timer = timer

    @property
    def parked(self) -> bool:
        return self.parked_at is not None
