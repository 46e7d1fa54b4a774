"""The gateway's ZMQ client: the only code that talks to the tokenizer workers.

One PULL input (every worker pushes GatewayOutputs, heartbeats and RPC results to it)
read by ONE reader task, and one PUSH per worker. The reader hands each RequestDelta
to the handle of the API request it belongs to; the HTTP handler drains that handle
in batches, so a burst of deltas costs one wake-up and one socket write. A watchdog
fails the requests of a worker or engine that goes silent, which is what guarantees
that an accepted request always ends. When the launcher reports a child dead (it restarts
it), the requests that child had started fail at once and those it had not are parked and
resubmitted once it reports again; so are new requests that arrive meanwhile and have no
other engine or worker to go to. A parked request waits at most serve.restart_wait_s, then
fails with 503 + Retry-After. Where a request goes and whether it is admitted: admission.py;
the handle an HTTP handler drains: request_handle.py; tokenize / detokenize calls: worker_rpcs.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from services.gateway.admission import Admission, DuplicateRequest, Overloaded
from services.gateway.engine_router import EngineRouter
from services.gateway.liveness import ENGINE, RETRY_AFTER_S, WORKER, Component, Liveness, ServiceUnavailable
from services.gateway.metrics import GatewayMetrics, RequestTimer
from services.gateway.request_handle import ChildState, RequestHandle
from services.gateway.worker_rpcs import WorkerRpcs
from shared.config import Config
from shared.protocol import (
    FINISH_ABORT,
    AbortRequest,
    ComponentDown,
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
)
from shared.zmq_utils import new_async_context, pull_socket, push_socket

log = logging.getLogger(__name__)


class PoolClient:
    def __init__(self, config: Config, metrics: GatewayMetrics) -> None:
        serve = config.serve
        if not serve.gateway_addr or not serve.tokenizer_addrs:
            raise ValueError("the gateway needs gateway_addr and tokenizer_addrs (see Config.with_default_addresses)")
        self.config = config
        self.metrics = metrics
        self.timeout_s = serve.engine_timeout_s
        self.restart_wait_s = serve.restart_wait_s
        self.max_in_flight = serve.max_queued_requests
        self.max_model_len = config.engine.max_model_len or 0
        # The engines' resolved dtype/quantization (the config may say auto), once one reports.
        self.run_mode = ""
        n_engines = len(serve.engine_addrs) or serve.num_engines
        self.router = EngineRouter(n_engines, serve.engine_routing)
        self.liveness = Liveness(len(serve.tokenizer_addrs), n_engines, self.timeout_s)
        self.admission = Admission(self.liveness, self.router, self.restart_wait_s)
        self._requests: dict[str, RequestHandle] = {}
        self._children: dict[str, ChildState] = {}
        self._rpcs = WorkerRpcs(self.liveness, self.timeout_s, serve.heartbeat_s, self._send_worker)
        self._resubmitted: dict[str, str] = {}
        """wire id -> child id, for resubmitted children."""
        self._decoder = decoder(GatewayInput)
        # One handler per message type of GatewayInput.
        self._handlers: dict[type, Callable[[Any, float], None]] = {
            GatewayOutputs: self._on_outputs,
            WorkerHeartbeat: self._on_heartbeat,
            TokenizeResult: self._on_rpc_result,
            DetokenizeResult: self._on_rpc_result,
            ComponentDown: self._on_component_down,
        }
        self._ctx: zmq.asyncio.Context | None = None
        self._input: zmq.asyncio.Socket | None = None
        self._outputs: list[zmq.Socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        metrics.watch_components(self.liveness.components)

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
        """Refuse new requests; those in flight keep streaming (the server drains them). Those
        waiting for a restart fail now: nothing is restarted during a shutdown (it may be the
        launcher giving up on a crash loop)."""
        self._closing = True
        for child in list(self._children.values()):
            if child.parked and child.request.request_id in self._children:
                error = ErrorInfo(message="the server is shutting down", status=503, retry_after=RETRY_AFTER_S)
                self._end_children(child.handle, error)

    async def close(self) -> None:
        self._closing = True
        self.fail_all("the server is shutting down", 503)
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
        """None when every worker and engine is up, else why not."""
        if self._closing:
            return "the server is shutting down"
        return self.liveness.health()

    async def _watchdog(self) -> None:
        interval = max(0.02, min(self.config.serve.heartbeat_s, self.timeout_s / 4))
        while True:
            await asyncio.sleep(interval)
            silent = self.liveness.silent()
            # Requests are only admitted to components that report, so a request routed to
            # one that has gone silent since will never be answered.
            if silent and (self._children or self._rpcs):
                self._fail_routed_to(silent, "the inference service is unavailable: ")
            self._fail_waited_too_long()

    def _fail_waited_too_long(self) -> None:
        """Parked requests whose engine or worker has not come back within restart_wait_s."""
        deadline = time.monotonic() - self.restart_wait_s
        for child in list(self._children.values()):
            if child.parked_at is None or child.parked_at > deadline or child.request.request_id not in self._children:
                continue
            message = (
                f"the inference service is unavailable: it is restarting and did not come back within "
                f"{self.restart_wait_s:g}s (--restart-wait-s); retry later"
            )
            log.error("failing request %s: it waited %gs for a restart", child.handle.request_id, self.restart_wait_s)
            self._end_children(child.handle, ErrorInfo(message=message, status=503, retry_after=RETRY_AFTER_S))

    def _fail_routed_to(self, components: set[Component], prefix: str) -> None:
        """Fail every request with a child (and every RPC) routed to one of these components."""
        for child in list(self._children.values()):
            for component in ((WORKER, child.worker), (ENGINE, child.engine)):
                if component in components and child.request.request_id in self._children:
                    problem = self.liveness.problem(*component) or "it stopped reporting"
                    log.error("failing request %s: %s", child.handle.request_id, problem)
                    self._end_children(child.handle, ErrorInfo(message=prefix + problem, status=503))
        workers = {index for kind, index in components if kind == WORKER}
        if workers:
            self._rpcs.on_workers_down(workers, prefix + "no tokenizer worker is up")

    # --- generation ----------------------------------------------------------------

    @property
    def num_in_flight(self) -> int:
        return len(self._requests)

    def submit(self, request_id: str, children: list[GenerateRequest]) -> RequestHandle:
        """Send the child requests of one API request, or park them when what they need is
        restarting; raises ServiceUnavailable / Overloaded."""
        wait = self.admission.check([c.request_id for c in children], self._closing)
        if len(self._requests) >= self.max_in_flight:
            raise Overloaded(f"too many requests in flight ({self.max_in_flight}); retry later")
        if request_id in self._requests:
            raise DuplicateRequest(f"a request with id {request_id!r} is already in flight")
        handle = RequestHandle(request_id, [c.request_id for c in children])
        self._requests[request_id] = handle
        arrival, arrival_wall = time.monotonic(), time.time()
        for child in children:
            child.arrival_time = arrival_wall
            worker = self.admission.worker_of(child.request_id)
            child.engine = self.admission.route_engine(child)
            state = ChildState(handle, child, worker, child.engine, RequestTimer(arrival, arrival_wall))
            self._children[child.request_id] = state
            if wait:
                state.parked_at = arrival
            else:
                self._outputs[worker].send(encode(child))
        if wait:
            log.info("request %s waits for a restart", request_id)
            self._resubmit_parked()  # at once through another worker, if one is up
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
            by_worker.setdefault(child.worker, []).append(child.wire_id)
            self._resubmitted.pop(child.wire_id, None)
            self.metrics.on_finish(child.timer, now, "error" if error else FINISH_ABORT)
            handle.push(RequestDelta(request_id=cid, finish_reason=FINISH_ABORT, error=error))
        for worker, ids in by_worker.items():
            self._outputs[worker].send(encode(AbortRequest(request_ids=ids)))

    def fail_all(self, message: str, status: int = 503) -> None:
        error = ErrorInfo(message=message, status=status)
        for handle in list(self._requests.values()):
            self._end_children(handle, error)
        self._rpcs.fail_all(message)

    # --- crash recovery ------------------------------------------------------------------

    def _on_component_down(self, msg: ComponentDown, now: float) -> None:
        if not self.liveness.went_down(msg.component, msg.index, msg.timestamp):
            log.error("ignoring a ComponentDown for unknown %s %d", msg.component, msg.index)
            return
        log.error("%s %d died (%s); it is being restarted", msg.component, msg.index, msg.reason)
        dead = {(msg.component, msg.index)}
        started: dict[int, RequestHandle] = {}
        for child in self._children.values():
            if (WORKER, child.worker) not in dead and (ENGINE, child.engine) not in dead:
                continue
            if child.timer.started:
                started[id(child.handle)] = child.handle
            elif not child.parked:
                child.parked_at = now
                # Clears the worker's state for it; a restarted worker passes the abort on to the
                # engine, which may still hold the request.
                self._outputs[child.worker].send(encode(AbortRequest(request_ids=[child.wire_id])))
        name = f"{msg.component.replace('_', ' ')} {msg.index}"
        for handle in started.values():
            message = f"the request was lost: {name} crashed ({msg.reason}); retry it"
            self._end_children(handle, ErrorInfo(message=message, status=503, retry_after=RETRY_AFTER_S))
        if msg.component == WORKER:
            self._rpcs.on_workers_down({msg.index}, f"{name} crashed and no other tokenizer worker is up; retry")
        self._resubmit_parked()  # to the other engines or workers, if there are any

    def _resubmit_parked(self) -> None:
        """Send the parked requests again, as soon as a worker and an engine can take them:
        under a new wire id, so a new route too (another engine or worker when there are
        several) and no confusion with what the dead incarnation may still send."""
        if not self.admission.live_engines():
            return
        for cid, child in self._children.items():
            if not child.parked:
                continue
            ids = (f"{cid}.{uuid.uuid4().hex[:8]}" for _ in range(16))
            wire_id = next((w for w in ids if self.liveness.problem(WORKER, self.admission.worker_of(w)) is None), None)
            if wire_id is None:
                continue  # no live worker: wait for the restart
            self._resubmitted.pop(child.wire_id, None)
            child.wire_id = wire_id
            self._resubmitted[wire_id] = cid
            request = msgspec.structs.replace(child.request, request_id=wire_id)
            child.worker = self.admission.worker_of(wire_id)
            self.router.finished(child.engine)
            child.engine = self.admission.route_engine(request)
            child.parked_at = None
            log.info("resubmitting %s as %s to engine %d", cid, wire_id, child.engine)
            self._outputs[child.worker].send(encode(request))

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
        if self._closing:
            raise ServiceUnavailable("the server is shutting down")
        return await self._rpcs.call(request_id, req)

    def _send_worker(self, worker: int, payload: bytes) -> None:
        self._outputs[worker].send(payload)

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

    def _dispatch(
        self, msg: GatewayOutputs | TokenizeResult | DetokenizeResult | WorkerHeartbeat | ComponentDown
    ) -> None:
        self._handlers[type(msg)](msg, time.monotonic())

    def _on_outputs(self, msg: GatewayOutputs, now: float) -> None:
        self.liveness.heard(WORKER, msg.worker)
        if msg.stats is not None:
            self._on_stats(msg.stats)
        for delta in msg.deltas:
            self._on_delta(delta, now)

    def _on_heartbeat(self, msg: WorkerHeartbeat, now: float) -> None:
        if self.liveness.heard(WORKER, msg.worker, msg.timestamp):
            self._resubmit_parked()
        if msg.max_model_len:
            self.max_model_len = msg.max_model_len

    def _on_rpc_result(self, msg: TokenizeResult | DetokenizeResult, now: float) -> None:
        self._rpcs.on_result(msg)

    def _on_stats(self, stats: EngineStats) -> None:
        if self.liveness.heard(ENGINE, stats.engine_index, stats.timestamp):
            self._resubmit_parked()
        if stats.run_mode:
            self.run_mode = stats.run_mode
        self.metrics.on_engine_stats(stats)

    def _on_delta(self, delta: RequestDelta, now: float) -> None:
        cid = self._resubmitted.get(delta.request_id, delta.request_id)
        child = self._children.get(cid)
        # None: already aborted or failed here, the worker's late output is moot. Parked or
        # another wire id: output of a dead incarnation; the request starts over after the restart.
        if child is None or child.parked or delta.request_id != child.wire_id:
            return
        if cid != delta.request_id:
            delta = msgspec.structs.replace(delta, request_id=cid)
        self.metrics.on_delta(child.timer, delta, now)
        if delta.finish_reason is not None or delta.error is not None:
            del self._children[cid]
            self._resubmitted.pop(child.wire_id, None)
            self.router.finished(child.engine)
            self.metrics.on_finish(child.timer, now, "error" if delta.error else delta.finish_reason)
        child.handle.push(delta)
