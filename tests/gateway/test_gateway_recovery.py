"""Crash recovery as the gateway sees it: the launcher's ComponentDown notice fails the
requests the dead component had started at once, parks the ones it had not and resubmits
them when it reports again, holds new requests that need it until it is back (up to
restart_wait_s, then 503 + Retry-After), while the rest keep being served."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import msgspec
import zmq
import zmq.asyncio

from services.gateway.serving import POOL_CLIENT
from shared.protocol import ComponentDown, GenerateRequest, encode, shard
from shared.zmq_utils import push_socket
from tests.gateway.fakes import FakeWorker, Gateway, GatewayFactory, endless, say_hello


async def notify(gw: Gateway, component: str, index: int) -> None:
    """What the launcher sends when it sees a child die."""
    ctx = zmq.asyncio.Context()
    sock = push_socket(ctx, gw.config.serve.gateway_addr)  # type: ignore[arg-type]
    await sock.send(encode(ComponentDown(component=component, index=index, reason="killed", timestamp=time.time())))
    sock.close(linger=1000)
    ctx.term()


async def stream_events(resp: aiohttp.ClientResponse) -> list[str]:
    return (await resp.read()).decode().strip().split("\n\n")


async def scripted(worker: FakeWorker, req: GenerateRequest) -> None:
    """'go' prompts stream tokens until aborted; 'wait' prompts are queued (never start)."""
    if req.prompt == "go":
        await endless(worker, req)


async def test_engine_crash_fails_started_parks_queued_and_resubmits(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    gw.set_script(scripted)
    async with aiohttp.ClientSession() as session:
        running = await session.post(gw.url + "/v1/completions", json={"prompt": "go", "stream": True})
        await running.content.readuntil(b"\n\n")  # it started: tokens are flowing
        queued = asyncio.create_task(session.post(gw.url + "/v1/completions", json={"prompt": "wait"}))
        await gw.wait_for(lambda: len(gw.generates) == 2)
        (waiting,) = [g for g in gw.generates if g.prompt == "wait"]
        for w in gw.workers:
            w.engine_alive = False  # the engine is gone: no stats until it is back
        t0 = time.monotonic()
        await notify(gw, "engine", 0)

        events = await asyncio.wait_for(stream_events(running), 1.0)
        assert time.monotonic() - t0 < 1.0
        assert events[-1] == "data: [DONE]" and "engine 0 crashed" in events[-2]
        err = msgspec.json.decode(events[-2].removeprefix("data: "))["error"]
        assert err["type"] == "server_error"
        # The queued one is parked, not failed: its worker was told to forget it.
        await gw.wait_for(lambda: waiting.request_id in gw.aborted())
        assert not queued.done()
        status, body = await gw.get("/health")
        assert status == 503 and b"engine 0 is restarting" in body
        # New requests (streamed or not) wait for the restart rather than failing.
        arrivals = [
            asyncio.create_task(session.post(gw.url + "/v1/completions", json={"prompt": "hi", "stream": stream}))
            for stream in (False, True)
        ]
        await gw.wait_for(lambda: gw.app[POOL_CLIENT].num_in_flight == 3)
        await asyncio.sleep(0.2)
        assert not any(t.done() for t in arrivals)
        assert len(gw.generates) == 2  # nothing sent to the dead engine's workers

        gw.set_script(say_hello)
        for w in gw.workers:
            w.engine_alive = True  # the restarted engine reports
        resp = await asyncio.wait_for(queued, 5)
        assert resp.status == 200 and (await resp.json())["choices"][0]["text"] == "Hello, world"
        plain, streamed = await asyncio.wait_for(asyncio.gather(*arrivals), 5)
        assert plain.status == 200 and (await plain.json())["choices"][0]["text"] == "Hello, world"
        assert streamed.status == 200 and (await stream_events(streamed))[-1] == "data: [DONE]"
        # The same request, sent again after the restart under a new wire id.
        (again,) = [g for g in gw.generates if g.request_id.startswith(waiting.request_id + ".")]
        assert again.prompt == "wait" and again.sampling_params == waiting.sampling_params
        assert (await gw.get("/health"))[0] == 200
        assert gw.app[POOL_CLIENT].num_in_flight == 0


async def test_worker_crash_others_keep_serving(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    gw.set_script(scripted)
    dead = gw.workers[1]
    wait_id = next(f"w{i}" for i in range(100) if shard(f"cmpl-w{i}-0", 2) == 1)
    async with aiohttp.ClientSession() as session:
        queued = asyncio.create_task(
            session.post(gw.url + "/v1/completions", json={"prompt": "wait"}, headers={"X-Request-Id": wait_id})
        )
        await gw.wait_for(lambda: len(dead.generates) == 1)
        dead.alive = False
        gw.set_script(say_hello)
        await notify(gw, "tokenizer_worker", 1)
        await gw.wait_for(lambda: gw.app[POOL_CLIENT].health() == "tokenizer worker 1 is restarting")
        # The queued request goes again, at once, through the live worker (under a new wire id).
        resp = await asyncio.wait_for(queued, 5)
        assert resp.status == 200 and resp.headers["X-Request-Id"] == f"cmpl-{wait_id}"
        (again,) = [g for g in gw.workers[0].generates if g.prompt == "wait"]
        assert again.request_id.startswith(f"cmpl-{wait_id}-0.")
        # New requests with random ids are routed to worker 0, and answered.
        for _ in range(4):
            async with session.post(gw.url + "/v1/completions", json={"prompt": "hi"}) as r:
                assert r.status == 200
        assert len(dead.generates) == 1
        dead.alive = True
        await gw.wait_for(lambda: gw.app[POOL_CLIENT].health() is None)


async def test_late_reports_of_the_dead_do_not_revive_it(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    t_dead = time.time()
    for w in gw.workers:
        w.engine_alive = False
    pool = gw.app[POOL_CLIENT]
    assert pool.liveness.went_down("engine", 0, t_dead)
    assert not pool.liveness.heard("engine", 0, t_dead - 1)  # stats made before the death
    assert pool.health() == "engine 0 is restarting"
    assert pool.liveness.heard("engine", 0, t_dead + 1)
    assert not pool.liveness.went_down("engine", 5, t_dead)  # no such engine
    assert not pool.liveness.went_down("sampler", 0, t_dead)


async def test_waiting_for_a_restart_is_bounded(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(restart_wait_s=0.5)
    for w in gw.workers:
        w.engine_alive = False
    await notify(gw, "engine", 0)
    await gw.wait_for(lambda: gw.app[POOL_CLIENT].health() == "engine 0 is restarting")
    async with aiohttp.ClientSession() as session:
        t0 = time.monotonic()
        for stream in (False, True):
            async with session.post(gw.url + "/v1/completions", json={"prompt": "hi", "stream": stream}) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "2"
                error = (await r.json())["error"]
                assert error["type"] == "server_error" and "did not come back within 0.5s" in error["message"]
        assert time.monotonic() - t0 < 5
    assert gw.app[POOL_CLIENT].num_in_flight == 0
    assert gw.generates == []


async def test_no_wait_when_the_engine_is_silent_rather_than_restarting(make_gateway: GatewayFactory) -> None:
    """Only a restart the launcher announced is worth waiting for; a silent engine is a 503 at once."""
    gw = await make_gateway()
    for w in gw.workers:
        w.engine_alive = False
    await gw.wait_for(lambda: (gw.app[POOL_CLIENT].health() or "").startswith("engine 0 has not reported"))
    status, body, _ = await gw.post("/v1/completions", {"prompt": "hi"})
    assert status == 503 and "has not reported" in body["error"]["message"]


async def test_shutdown_fails_the_waiting_requests_at_once(make_gateway: GatewayFactory) -> None:
    """The launcher stops the service after too many crashes: nothing will restart."""
    gw = await make_gateway()
    for w in gw.workers:
        w.engine_alive = False
    await notify(gw, "engine", 0)
    await gw.wait_for(lambda: gw.app[POOL_CLIENT].health() == "engine 0 is restarting")
    async with aiohttp.ClientSession() as session:
        waiting = asyncio.create_task(session.post(gw.url + "/v1/completions", json={"prompt": "hi"}))
        await gw.wait_for(lambda: gw.app[POOL_CLIENT].num_in_flight == 1)
        gw.app[POOL_CLIENT].begin_shutdown()
        resp = await asyncio.wait_for(waiting, 2)
        assert resp.status == 503 and resp.headers["Retry-After"] == "2"
        assert "shutting down" in (await resp.json())["error"]["message"]


async def test_tokenize_calls_on_a_dying_worker_go_to_a_live_one(make_gateway: GatewayFactory) -> None:
    """/tokenize and /detokenize are stateless: a call the dead worker took is sent again to the
    live one, whether the launcher reports the death or the worker just goes silent."""
    gw = await make_gateway()
    dead = gw.workers[1]
    tokenized = {"count": 3, "max_model_len": 2048, "tokens": [1, 2, 3]}
    for reported in (True, False):
        dead.alive = False
        dead.rpcs_dropped.clear()
        async with aiohttp.ClientSession() as session:

            async def call(path: str, body: dict[str, object]) -> tuple[int, object]:
                async with session.post(gw.url + path, json=body) as r:
                    return r.status, await r.json()

            # Random ids, sharded over the two workers: the dead one takes about half of them.
            calls = [call("/tokenize", {"prompt": "a bb ccc"}) for _ in range(12)]
            calls += [call("/detokenize", {"tokens": [1, 2]}) for _ in range(12)]
            results = asyncio.gather(*calls)
            await gw.wait_for(lambda: len(dead.rpcs_dropped) > 0)
            if reported:
                await notify(gw, "tokenizer_worker", 1)
            assert await asyncio.wait_for(results, 10) == [(200, tokenized)] * 12 + [(200, {"prompt": "1 2"})] * 12
        # New calls while it is down go to the live worker only.
        before = len(dead.rpcs_dropped)
        assert (await gw.post("/tokenize", {"prompt": "a bb ccc"}))[:2] == (200, tokenized)
        assert len(dead.rpcs_dropped) == before
        dead.alive = True
        await gw.wait_for(lambda: gw.app[POOL_CLIENT].health() is None, timeout=5)
