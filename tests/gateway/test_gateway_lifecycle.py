"""Cancel, client disconnects, dead workers/engines and shutdown: every request ends, nothing leaks."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.serving import POOL_CLIENT
from shared.protocol import GenerateRequest, RequestDelta, shard
from tests.gateway.fakes import (
    MODEL,
    TIMEOUT_S,
    FakeWorker,
    Gateway,
    GatewayFactory,
    endless,
    say_hello,
    silent,
)


def client(gw: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)


async def assert_aborts_routed(gw: Gateway, child_ids: set[str]) -> None:
    """Each child's abort went to the worker that got the child, and nothing else leaked."""
    await gw.wait_for(lambda: gw.aborted() == child_ids)  # the abort may trail the response
    for w in gw.workers:
        for ids in w.abort_messages:
            assert all(shard(cid, len(gw.workers)) == w.index for cid in ids)
    await gw.wait_for(lambda: gw.app[POOL_CLIENT].num_in_flight == 0)  # a stream is released after [DONE]


async def test_cancel_streaming_request(gateway: Gateway) -> None:
    gateway.set_script(endless)
    stream = await client(gateway).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "go"}], stream=True, n=3
    )
    chunks = []
    async for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 6:
            status, body, _ = await gateway.post(f"/v1/requests/{chunk.id}/cancel")
            assert status == 200 and body["cancelled"] is True
    finals = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert finals == {0: "abort", 1: "abort", 2: "abort"}
    await assert_aborts_routed(gateway, {f"{chunks[0].id}-{i}" for i in range(3)})


async def test_cancel_non_streaming_request(gateway: Gateway) -> None:
    gateway.set_script(endless)
    task = asyncio.create_task(client(gateway).completions.create(model=MODEL, prompt="go", max_tokens=1000))
    await gateway.wait_for(lambda: len(gateway.generates) == 1)
    parent = gateway.generates[0].request_id.rsplit("-", 1)[0]
    assert (await gateway.post(f"/v1/requests/{parent}/cancel"))[0] == 200
    resp = await task
    assert resp.id == parent and resp.choices[0].finish_reason == "abort" and resp.choices[0].text.startswith("x")
    await assert_aborts_routed(gateway, {f"{parent}-0"})
    status, body, _ = await gateway.post(f"/v1/requests/{parent}/cancel")
    assert status == 404 and body["error"]["code"] == "request_not_found"


async def test_stream_client_disconnect_aborts(gateway: Gateway) -> None:
    gateway.set_script(endless)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(gateway.url + "/v1/completions", json={"prompt": "go", "stream": True, "n": 2})
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")
        resp.close()  # drops the connection mid-stream
    await gateway.wait_for(lambda: len(gateway.aborted()) == 2)
    await gateway.wait_for(lambda: gateway.app[POOL_CLIENT].num_in_flight == 0)
    await assert_aborts_routed(gateway, {g.request_id for g in gateway.generates})


async def test_non_stream_client_disconnect_aborts(gateway: Gateway) -> None:
    gateway.set_script(silent)
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(
            session.post(gateway.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "go"}]})
        )
        await gateway.wait_for(lambda: len(gateway.generates) == 1)
        request.cancel()  # the client gives up and closes its connection
        with pytest.raises(asyncio.CancelledError):
            await request
    await gateway.wait_for(lambda: gateway.aborted() == {gateway.generates[0].request_id})
    await gateway.wait_for(lambda: gateway.app[POOL_CLIENT].num_in_flight == 0)


@pytest.mark.parametrize("dead", ["worker", "engine"])
async def test_heartbeat_timeout_fails_in_flight_requests(gateway: Gateway, dead: str) -> None:
    gateway.set_script(silent)
    # A stream whose headers still wait for the first token ends with an HTTP 503.
    stream_task = asyncio.create_task(client(gateway).completions.create(model=MODEL, prompt="go", stream=True))
    blocking = asyncio.create_task(
        client(gateway).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}])
    )
    await gateway.wait_for(lambda: len(gateway.generates) == 2)
    # A stream that already started gets the failure in-band.
    started = asyncio.create_task(client(gateway).completions.create(model=MODEL, prompt="x", stream=True))
    await gateway.wait_for(lambda: len(gateway.generates) == 3)
    (first,) = [g for g in gateway.generates if g.prompt == "x"]
    owner = gateway.workers[shard(first.request_id, 2)]
    owner.send(RequestDelta(request_id=first.request_id, text="a", token_ids=[1], num_output_tokens=1))
    started_stream = await started
    first_chunk = await started_stream.__anext__()
    assert first_chunk.choices[0].text == "a"

    t0 = time.monotonic()
    for w in gateway.workers:
        if dead == "worker":
            w.alive = False
        else:
            w.engine_alive = False
    with pytest.raises(openai.InternalServerError) as exc:
        await blocking
    assert exc.value.status_code == 503
    with pytest.raises(openai.InternalServerError):
        await stream_task
    with pytest.raises(openai.APIError, match="unavailable"):
        async for _ in started_stream:
            pass
    assert time.monotonic() - t0 < TIMEOUT_S + 1.5
    await gateway.wait_for(lambda: gateway.app[POOL_CLIENT].num_in_flight == 0)

    status, body = await gateway.get("/health")
    assert status == 503 and dead.encode() in body
    up = {
        (s.labels["component"], s.labels["index"]): s.value
        for fam in text_string_to_metric_families((await gateway.get("/metrics"))[1].decode())
        if fam.name == "novainfer_component_up"
        for s in fam.samples
    }
    workers_up = [v for (component, _), v in up.items() if component == "tokenizer_worker"]
    if dead == "worker":  # the first worker to time out fails the requests; the other may lag
        assert 0 in workers_up
    else:
        assert up[("engine", "0")] == 0 and workers_up == [1, 1]
    status, body, _ = await gateway.post("/v1/completions", {"prompt": "hi"})
    assert status == 503 and body["error"]["type"] == "server_error"

    for w in gateway.workers:
        w.alive = w.engine_alive = True
    await gateway.wait_for(lambda: gateway.app[POOL_CLIENT].health() is None)
    assert (await gateway.get("/health"))[0] == 200
    gateway.set_script(say_hello)
    assert (await gateway.post("/v1/completions", {"prompt": "hi"}))[0] == 200


async def test_silent_worker_makes_the_service_unavailable(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    gw.workers[1].alive = False
    await gw.wait_for(lambda: gw.app[POOL_CLIENT].health() is not None, timeout=TIMEOUT_S + 2)
    status, body = await gw.get("/health")
    assert status == 503 and b"tokenizer worker 1" in body
    # Requests are routed around it (tokenize RPCs to any worker, generations get a new id)...
    assert (await gw.post("/tokenize", {"prompt": "hi"}))[0] == 200
    for _ in range(4):
        assert (await gw.post("/v1/completions", {"prompt": "hi"}))[0] == 200
    assert all(g.request_id not in {x.request_id for x in gw.workers[1].generates} for g in gw.generates)
    assert len(gw.workers[0].generates) == 4
    # ...except one whose id the client chose: it can only go to worker 1.
    client_id = next(f"id{i}" for i in range(100) if shard(f"cmpl-id{i}-0", 2) == 1)
    status, body, resp = await gw.post("/v1/completions", {"prompt": "hi"}, headers={"X-Request-Id": client_id})
    assert status == 503 and "tokenizer worker 1" in body["error"]["message"]
    assert resp.headers["Retry-After"] == "2"


async def test_shutdown_drains_in_flight_streams(gateway: Gateway) -> None:
    async def slow_ten(worker: FakeWorker, req: GenerateRequest) -> None:
        for i in range(10):
            worker.send(
                RequestDelta(
                    request_id=req.request_id,
                    text=str(i),
                    token_ids=[i],
                    num_output_tokens=i + 1,
                    finish_reason="stop" if i == 9 else None,
                )
            )
            await asyncio.sleep(0.03)

    gateway.set_script(slow_ten)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(gateway.url + "/v1/completions", json={"prompt": "go", "stream": True})
        await resp.content.readuntil(b"\n\n")
        stopping = asyncio.create_task(gateway.runner.cleanup())  # what SIGTERM does in serve()
        body = (await resp.read()).decode()
        await stopping
    assert body.endswith("data: [DONE]\n\n") and '"finish_reason":"stop"' in body
    with pytest.raises(aiohttp.ClientConnectionError):
        await gateway.get("/health")
