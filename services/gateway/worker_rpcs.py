"""Tokenize / detokenize calls from the gateway to the tokenizer workers.

They hold no state in a worker, so any live worker can answer one: a call goes to its
shard's worker, or the next live one. When the worker it went to dies (the launcher's
notice) or goes silent before answering, the call is sent again to another live worker
instead of failing, so a restarting worker does not make /tokenize a 503 while others are
up. Only with no live worker left, or no answer within the timeout, is it unavailable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec

from services.gateway.liveness import RETRY_AFTER_S, WORKER, Liveness, ServiceUnavailable
from shared.protocol import DetokenizeResult, TokenizeResult, encode, shard

RpcResult = TokenizeResult | DetokenizeResult


class _Call:
    __slots__ = ("deadline", "future", "payload", "worker")

    def __init__(self, future: asyncio.Future[RpcResult], payload: bytes, worker: int, deadline: float) -> None:
        self.future = future
        self.payload = payload
        self.worker = worker
        self.deadline = deadline
        """Loop time by which the worker it was last sent to must answer."""


class WorkerRpcs:
    def __init__(
        self, liveness: Liveness, timeout_s: float, heartbeat_s: float, send: Callable[[int, bytes], None]
    ) -> None:
        self._liveness = liveness
        # A worker answers in one pass of its loop, which also heartbeats: one that has not
        # answered by now has died, and counts as silent (timeout_s after its last heartbeat,
        # which may have come just after the call was sent) when the call's time is up.
        self._timeout_s = timeout_s + 2 * heartbeat_s
        self._send = send
        """Push an encoded message to a worker."""
        self._calls: dict[str, _Call] = {}

    def __bool__(self) -> bool:
        return bool(self._calls)

    async def call(self, request_id: str, req: msgspec.Struct) -> RpcResult:
        """req's answer from a live worker; raises ServiceUnavailable."""
        n = self._liveness.count(WORKER)
        first = shard(request_id, n)
        worker = self._live_worker(request_id, exclude=set())
        if worker is None:
            problem = self._liveness.problem(WORKER, first)
            raise ServiceUnavailable(f"the inference service is unavailable: {problem}", RETRY_AFTER_S)
        loop = asyncio.get_running_loop()
        call = _Call(loop.create_future(), encode(req), worker, loop.time() + self._timeout_s)
        self._calls[request_id] = call
        try:
            self._send(worker, call.payload)
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(call.future), max(0.0, call.deadline - loop.time()))
                except asyncio.TimeoutError:
                    if loop.time() < call.deadline:
                        continue  # sent again meanwhile: wait for that worker
                    # Silent by now (the watchdog may not have looked yet): another worker answers.
                    if self._liveness.problem(WORKER, call.worker) is not None and self._resend(request_id, call):
                        continue
                    raise ServiceUnavailable("the tokenizer worker did not answer in time") from None
        finally:
            del self._calls[request_id]

    def on_result(self, msg: RpcResult) -> None:
        call = self._calls.get(msg.request_id)
        if call is not None and not call.future.done():  # else a late answer of a call sent twice
            call.future.set_result(msg)

    def on_workers_down(self, workers: set[int], message: str) -> None:
        """The calls these workers took go to another live worker; with none, they fail (message)."""
        for request_id, call in self._calls.items():
            if call.worker in workers and not call.future.done() and not self._resend(request_id, call, workers):
                call.future.set_exception(ServiceUnavailable(message, RETRY_AFTER_S))

    def _resend(self, request_id: str, call: _Call, down: set[int] | None = None) -> bool:
        """Send the call to a live worker other than its own (and those down); False if none is."""
        worker = self._live_worker(request_id, exclude={call.worker} | (down or set()))
        if worker is None:
            return False
        call.worker, call.deadline = worker, asyncio.get_running_loop().time() + self._timeout_s
        self._send(worker, call.payload)
        return True

    def fail_all(self, message: str) -> None:
        for call in self._calls.values():
            if not call.future.done():
                call.future.set_exception(ServiceUnavailable(message))

    def _live_worker(self, request_id: str, exclude: set[int]) -> int | None:
        """The call's shard if it is live, else the first live worker; None when none is."""
        n = self._liveness.count(WORKER)
        first = shard(request_id, n)
        return next(
            (w for w in (first, *range(n)) if w not in exclude and self._liveness.problem(WORKER, w) is None), None
        )
