"""Whether and where a child request can go now: its tokenizer worker (by the shard of its id),
its engine (the router's choice, or the least busy live one when that one is down), and, when
what it needs is down, whether it waits for a restart (parked) or fails at once.

The gateway is the one place that says no: a request is refused here (503) when no engine or
worker can take it and none is restarting, and by PoolClient.submit (429) when too many are in
flight or (409) when its client-chosen id is already in flight."""

from __future__ import annotations

from services.gateway.engine_router import EngineRouter, prompt_text
from services.gateway.liveness import ENGINE, RETRY_AFTER_S, WORKER, Liveness, ServiceUnavailable
from shared.protocol import GenerateRequest, shard


class Overloaded(Exception):
    """More requests in flight than serve.max_queued_requests."""


class DuplicateRequest(Exception):
    """A client-chosen request id (X-Request-Id) that is already in flight."""


class Admission:
    def __init__(self, liveness: Liveness, router: EngineRouter, restart_wait_s: float) -> None:
        self.liveness = liveness
        self.router = router
        self.restart_wait_s = restart_wait_s

    def worker_of(self, child_id: str) -> int:
        return shard(child_id, self.liveness.count(WORKER))

    def live_engines(self) -> list[int]:
        return [e for e in range(self.liveness.count(ENGINE)) if self.liveness.problem(ENGINE, e) is None]

    def route_problem(self, child_id: str) -> tuple[str, bool] | None:
        """Why a child request cannot be sent now (its worker is down, or every engine is), and
        whether that is a restart worth waiting for; None when it can be sent."""
        liveness = self.liveness
        worker = self.worker_of(child_id)
        worker_problem = liveness.problem(WORKER, worker)
        if worker_problem is not None:
            return worker_problem, liveness.restarting((WORKER, worker))
        if self.live_engines():
            return None
        engines = range(liveness.count(ENGINE))
        waitable = any(liveness.restarting((ENGINE, e)) for e in engines)
        return liveness.problem(ENGINE, 0) or "no engine is up", waitable

    def route_engine(self, child: GenerateRequest) -> int:
        """The router's engine for this request, or the least busy live one when that one is down."""
        router = self.router
        engine = router.route(prompt_text(child) if router.num_engines > 1 else "")
        live = self.live_engines()
        if live and engine not in live:
            router.finished(engine)
            engine = min(live, key=router.in_flight.__getitem__)
            router.in_flight[engine] += 1
        child.engine = engine
        return engine

    def check(self, child_ids: list[str], closing: bool) -> bool:
        """Raise ServiceUnavailable when the request cannot be served now; True when it must
        wait for a restart (parked), False when it can be sent at once."""
        if closing:
            raise ServiceUnavailable("the server is shutting down")
        wait = False
        for cid in child_ids:
            route_problem = self.route_problem(cid)
            if route_problem is None:
                continue
            problem, waitable = route_problem
            if not waitable or self.restart_wait_s <= 0:
                raise ServiceUnavailable(f"the inference service is unavailable: {problem}", RETRY_AFTER_S)
            wait = True
        return wait
