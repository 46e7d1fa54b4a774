"""The gateway's ZMQ client: the only code that talks to the tokenizer workers.

One PULL input (every worker pushes GatewayOutputs, heartbeats and RPC results to it)
read by ONE reader task, and one PUSH per worker. The reader hands each RequestDelta
to the handle of the API request it belongs to; the HTTP handler drains that handle
in batches, so a burst of deltas costs one wake-up and one socket write. A watchdog
fails every in-flight request at once when a worker or engine goes silent, which is
what guarantees that an accepted request always ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from services.gateway.engine_router import EngineRouter, prompt_text
from services.gateway.metrics import GatewayMetrics, RequestTimer
from shared.config import Config
from shared.protocol import (
    FINISH_ABORT,
    AbortRequest,
    DetokenizeRequest,
    DetokenizeResult,
    EngineStats,
    ErrorInfo,
    GatewayInput,
    GatewayOutputs,
    GenerateRequest,
    RequestDelta,
    TokenizeRequest,
    TokenizeResult,
    WorkerHeartbeat,
    decoder,
    encode,
    shard,
)
from shared.zmq_utils import new_async_context, pull_socket, push_socket

log = logging.getLogger(__name__)


class ServiceUnavailable(Exception):
    """A worker or engine is down (or the gateway is shutting down)."""


class Overloaded(Exception):
    """More requests in flight than serve.max_queued_requests."""


class DuplicateRequest(Exception):
    """A client-chosen request id (X-Request-Id) that is already in flight."""


class RequestHandle:
    """One API request: its child engine requests and the deltas not yet consumed."""

    __slots__ = ("request_id", "child_ids", "_pending", "_event")

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

    __slots__ = ("engine", "handle", "timer", "worker")

    def __init__(self, handle: RequestHandle, worker: int, engine: int, timer: RequestTimer) -> None:
        self.handle = handle
        self.worker = worker
        self.engine = engine
        self.timer = timer


class PoolClient:
    def __init__(self, config: Config, metrics: GatewayMetrics) -> None:
        serve = config.serve
        if not serve.gateway_addr or not serve.tokenizer_addrs:
            raise ValueError("the gateway needs gateway_addr and tokenizer_addrs (see Config.with_default_addresses)")
        self.config = config
        self.metrics = metrics
        self.timeout_s = serve.engine_timeout_s
        self.max_in_flight = serve.max_queued_requests
        self.max_model_len = config.engine.max_model_len or 0
        n_engines = len(serve.engine_addrs) or serve.num_engines
        self.router = EngineRouter(n_engines, serve.engine_routing)
        self._worker_seen: list[float | None] = [None] * len(serve.tokenizer_addrs)
        self._engine_seen: list[float | None] = [None] * n_engines
        self._requests: dict[str, RequestHandle] = {}
        self._children: dict[str, ChildState] = {}
        self._rpcs: dict[str, asyncio.Future[TokenizeResult | DetokenizeResult]] = {}
        self._decoder = decoder(GatewayInput)
        # One handler per message type of GatewayInput.
        self._handlers: dict[type, Callable[[Any, float], None]] = {
            GatewayOutputs: self._on_outputs,
            WorkerHeartbeat: self._on_heartbeat,
            TokenizeResult: self._on_rpc_result,
            DetokenizeResult: self._on_rpc_result,
        }
        self._ctx: zmq.asyncio.Context | None = None
        self._input: zmq.asyncio.Socket | None = None
        self._outputs: list[zmq.Socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        metrics.watch_components(self.components)

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        serve = self.config.serve
        self._ctx = new_async_context()
        assert serve.gateway_addr is not None  # checked in __init__
        self._input = pull_socket(self._ctx, serve.gateway_addr)
        # Plain sockets for sending: a PUSH with an unbounded HWM never blocks, so a send
        # needs no await and aborts can go out from `finally` blocks of cancelled handlers.
        sync_ctx: zmq.Context[zmq.Socket] = zmq.Context.shadow(self._ctx.underlying)
        self._outputs = [push_socket(sync_ctx, addr) for addr in serve.tokenizer_addrs]
        self._tasks = [
            asyncio.create_task(self._read_loop(), name="gateway-reader"),
            asyncio.create_task(self._watchdog(), name="gateway-watchdog"),
        ]

    def begin_shutdown(self) -> None:
        """Refuse new requests; those in flight keep streaming (the server drains them)."""
        self._closing = True

    async def close(self) -> None:
        self._closing = True
        self._fail_all("the server is shutting down", 503)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # The push sockets belong to a shadow context that destroy() does not track:
        # left open, they would block the context's termination forever.
        for sock in self._outputs:
            sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.destroy(linger=0)

    # --- health ------------------------------------------------------------------

    def health(self) -> str | None:
        """None when every worker and engine has been heard from recently, else why not."""
        now = time.monotonic()
        for kind, seen in (("tokenizer worker", self._worker_seen), ("engine", self._engine_seen)):
            for i, t in enumerate(seen):
                if t is None:
                    return f"{kind} {i} has not reported yet"
                if now - t > self.timeout_s:
                    return f"{kind} {i} has not reported for {now - t:.1f}s"
        return None

    def components(self) -> list[tuple[str, int, bool]]:
        """(component, index, up) of every worker and engine, for the metrics."""
        now = time.monotonic()
        return [
            (kind, i, t is not None and now - t <= self.timeout_s)
            for kind, seen in (("tokenizer_worker", self._worker_seen), ("engine", self._engine_seen))
            for i, t in enumerate(seen)
        ]

    async def _watchdog(self) -> None:
        interval = max(0.02, min(self.config.serve.heartbeat_s, self.timeout_s / 4))
        while True:
            await asyncio.sleep(interval)
            problem = self.health()
            # Requests are only admitted while healthy, so anything in flight now was
            # routed to a component that has since gone silent: it will never answer.
            if problem is not None and self._children:
                log.error("failing %d in-flight requests: %s", len(self._requests), problem)
                self._fail_all(f"the inference service is unavailable: {problem}", 503)

    def _check_admission(self) -> None:
        if self._closing:
            raise ServiceUnavailable("the server is shutting down")
        problem = self.health()
        if problem is not None:
            raise ServiceUnavailable(f"the inference service is unavailable: {problem}")

    # --- generation ----------------------------------------------------------------

    @property
    def num_in_flight(self) -> int:
        return len(self._requests)

    def submit(self, request_id: str, children: list[GenerateRequest]) -> RequestHandle:
        """Send the child requests of one API request; raises ServiceUnavailable / Overloaded."""
        self._check_admission()
        if len(self._requests) >= self.max_in_flight:
            raise Overloaded(f"too many requests in flight ({self.max_in_flight}); retry later")
        if request_id in self._requests:
            raise DuplicateRequest(f"a request with id {request_id!r} is already in flight")
        handle = RequestHandle(request_id, [c.request_id for c in children])
        self._requests[request_id] = handle
        arrival, arrival_wall = time.monotonic(), time.time()
        n_workers = len(self._outputs)
        for child in children:
            child.arrival_time = arrival_wall
            worker = shard(child.request_id, n_workers)
            child.engine = self.router.route(prompt_text(child) if self.router.num_engines > 1 else "")
            self._children[child.request_id] = ChildState(
                handle, worker, child.engine, RequestTimer(arrival, arrival_wall)
            )
            self._outputs[worker].send(encode(child))
        self.metrics.in_flight.set(len(self._requests))
        return handle

    def abort(self, request_id: str) -> bool:
        """Abort a request's unfinished children; it then ends with finish_reason 'abort'.

        The final deltas are made here rather than awaited from the workers, so the request
        ends at once even if a worker never answers the abort.
        """
        handle = self._requests.get(request_id)
        if handle is None:
            return False
        self._end_children(handle, None)
        return True

    def release(self, handle: RequestHandle) -> None:
        """The HTTP handler is done with the request (finished, failed or disconnected)."""
        self._end_children(handle, None)
        self._requests.pop(handle.request_id, None)
        self.metrics.in_flight.set(len(self._requests))

    def _end_children(self, handle: RequestHandle, error: ErrorInfo | None) -> None:
        by_worker: dict[int, list[str]] = {}
        now = time.monotonic()
        for cid in handle.child_ids:
            child = self._children.pop(cid, None)
            if child is None:
                continue
            self.router.finished(child.engine)
            by_worker.setdefault(child.worker, []).append(cid)
            self.metrics.on_finish(child.timer, now, "error" if error else FINISH_ABORT)
            handle.push(RequestDelta(request_id=cid, finish_reason=FINISH_ABORT, error=error))
        for worker, ids in by_worker.items():
            self._outputs[worker].send(encode(AbortRequest(request_ids=ids)))

    def _fail_all(self, message: str, status: int) -> None:
        error = ErrorInfo(message=message, status=status)
        for handle in list(self._requests.values()):
            self._end_children(handle, error)
        for fut in self._rpcs.values():
            if not fut.done():
                fut.set_exception(ServiceUnavailable(message))

    # --- tokenize / detokenize RPCs ------------------------------------------------------

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResult:
        result = await self._rpc(req.request_id, req)
        assert isinstance(result, TokenizeResult)
        return result

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResult:
        result = await self._rpc(req.request_id, req)
        assert isinstance(result, DetokenizeResult)
        return result

    async def _rpc(self, request_id: str, req: msgspec.Struct) -> TokenizeResult | DetokenizeResult:
        self._check_admission()
        fut: asyncio.Future[TokenizeResult | DetokenizeResult] = asyncio.get_running_loop().create_future()
        self._rpcs[request_id] = fut
        try:
            self._outputs[shard(request_id, len(self._outputs))].send(encode(req))
            return await asyncio.wait_for(fut, self.timeout_s)
        except asyncio.TimeoutError:
            raise ServiceUnavailable("the tokenizer worker did not answer in time") from None
        finally:
            self._rpcs.pop(request_id, None)

    # --- the reader ----------------------------------------------------------------------

    async def _read_loop(self) -> None:
        assert self._input is not None
        while True:
            raw = await self._input.recv()
            try:
                msg = self._decoder.decode(raw)
            except msgspec.DecodeError as e:
                log.error("dropping undecodable message: %s", e)
                continue
            try:
                self._dispatch(msg)
            except Exception:
                # One bad message must not stop the only reader: every request would hang.
                log.exception("failed to handle %s", type(msg).__name__)

    def _dispatch(self, msg: GatewayOutputs | TokenizeResult | DetokenizeResult | WorkerHeartbeat) -> None:
        self._handlers[type(msg)](msg, time.monotonic())

    def _on_outputs(self, msg: GatewayOutputs, now: float) -> None:
        self._mark_worker(msg.worker, now)
        if msg.stats is not None:
            self._on_stats(msg.stats, now)
        for delta in msg.deltas:
            self._on_delta(delta, now)

    def _on_heartbeat(self, msg: WorkerHeartbeat, now: float) -> None:
        self._mark_worker(msg.worker, now)
        if msg.max_model_len:
            self.max_model_len = msg.max_model_len

    def _on_rpc_result(self, msg: TokenizeResult | DetokenizeResult, now: float) -> None:
        fut = self._rpcs.get(msg.request_id)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def _mark_worker(self, worker: int, now: float) -> None:
        if 0 <= worker < len(self._worker_seen):
            self._worker_seen[worker] = now

    def _on_stats(self, stats: EngineStats, now: float) -> None:
        if 0 <= stats.engine_index < len(self._engine_seen):
            self._engine_seen[stats.engine_index] = now
        self.metrics.on_engine_stats(stats)

    def _on_delta(self, delta: RequestDelta, now: float) -> None:
        child = self._children.get(delta.request_id)
        if child is None:  # already aborted or failed here: the worker's late output is moot
            return
        self.metrics.on_delta(child.timer, delta, now)
        if delta.finish_reason is not None or delta.error is not None:
            del self._children[delta.request_id]
            self.router.finished(child.engine)
            self.metrics.on_finish(child.timer, now, "error" if delta.error else delta.finish_reason)
        child.handle.push(delta)
