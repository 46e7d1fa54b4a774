"""services/gateway/admission.py: where a child request goes (its worker by the shard of its id,
its engine by the router or, when that one is down, the least busy live one) and whether it is
sent, parked for a restart, or refused."""

from __future__ import annotations

import time

import pytest

from services.gateway.admission import Admission
from services.gateway.engine_router import EngineRouter
from services.gateway.liveness import ENGINE, WORKER, Liveness, ServiceUnavailable
from shared.protocol import GenerateRequest, SamplingParams, shard


def admission(workers: int = 2, engines: int = 2, restart_wait_s: float = 60.0) -> Admission:
    liveness = Liveness(workers, engines, timeout_s=10.0)
    for kind, count in ((WORKER, workers), (ENGINE, engines)):
        for i in range(count):
            liveness.heard(kind, i)
    return Admission(liveness, EngineRouter(engines, "round-robin"), restart_wait_s)


def request(request_id: str) -> GenerateRequest:
    return GenerateRequest(request_id=request_id, sampling_params=SamplingParams(), prompt="hello")


def test_worker_is_the_shard_of_the_id() -> None:
    a = admission(workers=3)
    assert [a.worker_of(f"r{i}") for i in range(20)] == [shard(f"r{i}", 3) for i in range(20)]


def test_everything_up_is_sent_at_once() -> None:
    a = admission()
    assert a.check(["r1", "r2"], closing=False) is False
    assert a.live_engines() == [0, 1]


def test_routes_around_an_engine_that_is_down() -> None:
    a = admission(engines=3)
    a.liveness.went_down(ENGINE, 0, time.time())
    a.router.in_flight[:] = [0, 5, 2]
    engines = [a.route_engine(request(f"r{i}")) for i in range(3)]
    assert 0 not in engines
    assert sum(a.router.in_flight) == 7 + 3  # each routed request counted once, where it went


def test_a_restart_parks_and_a_dead_end_refuses() -> None:
    for restart_wait_s in (60.0, 0.0):
        a = admission(workers=1, engines=1, restart_wait_s=restart_wait_s)
        a.liveness.went_down(ENGINE, 0, time.time())
        if restart_wait_s:
            assert a.check(["r1"], closing=False) is True  # restarting: wait for it
        else:  # --restart-wait-s 0: no waiting
            with pytest.raises(ServiceUnavailable, match="engine 0 is restarting"):
                a.check(["r1"], closing=False)
    silent = Admission(Liveness(1, 1, timeout_s=10.0), EngineRouter(1), 60.0)  # nothing reported yet
    with pytest.raises(ServiceUnavailable, match="has not reported yet") as e:
        silent.check(["r1"], closing=False)
    assert e.value.retry_after is not None


def test_closing_refuses() -> None:
    with pytest.raises(ServiceUnavailable, match="shutting down"):
        admission().check(["r1"], closing=True)
