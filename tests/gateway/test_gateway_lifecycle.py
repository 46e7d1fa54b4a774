"""Cancel, client disconnects and dead workers/engines: every request ends, nothing leaks."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import pytest

from services.gateway.serving import FRONTEND
from shared.protocol import RequestDelta, shard
from tests.gateway.conftest import MODEL, TIMEOUT_S, Gateway, GatewayFactory, endless, say_hello, silent


def client(gw: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)


def assert_aborts_routed(gw: Gateway, child_ids: set[str]) -> None:
    """Each child's abort went to the worker that got the child, and nothing else leaked."""
    assert gw.aborted() == child_ids
    for w in gw.workers:
        for ids in w.abort_messages:
            assert all(shard(cid, len(gw.workers)) == w.index for cid in ids)
    assert gw.app[FRONTEND].num_in_flight == 0


async def test_cancel_streaming_request(gateway: Gateway) -> None:
    gateway.set_script(endless)
    stream = await client(gateway).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "go"}], stream=True, n=3)
    chunks = []
    async for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 6:
            status, body, _ = await gateway.post(f"/v1/requests/{chunk.id}/cancel")
            assert status == 200 and body["cancelled"] is True
    finals = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert finals == {0: "abort", 1: "abort", 2: "abort"}
    assert_aborts_routed(gateway, {f"{chunks[0].id}-{i}" for i in range(3)})


async def test_cancel_non_streaming_request(gateway: Gateway) -> None:
    gateway.set_script(endless)
    task = asyncio.create_task(client(gateway).completions.create(model=MODEL, prompt="go", max_tokens=1000))
    await gateway.wait_for(lambda: len(gateway.generates) == 1)
    parent = gateway.generates[0].request_id.rsplit("-", 1)[0]
    assert (await gateway.post(f"/v1/requests/{parent}/cancel"))[0] == 200
    resp = await task
    assert resp.id == parent and resp.choices[0].finish_reason == "abort" and resp.choices[0].text.startswith("x")
    assert_aborts_routed(gateway, {f"{parent}-0"})
    status, body, _ = await gateway.post(f"/v1/requests/{parent}/cancel")
    assert status == 404 and body["error"]["code"] == "request_not_found"


async def test_stream_client_disconnect_aborts(gateway: Gateway) -> None:
    gateway.set_script(endless)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(gateway.url + "/v1/completions",
                                  json={"prompt": "go", "stream": True, "n": 2})
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")
        resp.close()  # drops the connection mid-stream
    await gateway.wait_for(lambda: len(gateway.aborted()) == 2)
    await gateway.wait_for(lambda: gateway.app[FRONTEND].num_in_flight == 0)
    assert_aborts_routed(gateway, {g.request_id for g in gateway.generates})


async def test_non_stream_client_disconnect_aborts(gateway: Gateway) -> None:
    gateway.set_script(silent)
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(session.post(gateway.url + "/v1/chat/completions",
                                                   json={"messages": [{"role": "user", "content": "go"}]}))
        await gateway.wait_for(lambda: len(gateway.generates) == 1)
        request.cancel()  # the client gives up and closes its connection
        with pytest.raises(asyncio.CancelledError):
            await request
    await gateway.wait_for(lambda: gateway.aborted() == {gateway.generates[0].request_id})
    await gateway.wait_for(lambda: gateway.app[FRONTEND].num_in_flight == 0)


@pytest.mark.parametrize("dead", ["worker", "engine"])
async def test_heartbeat_timeout_fails_in_flight_requests(gateway: Gateway, dead: str) -> None:
    gateway.set_script(silent)
    # A stream whose headers still wait for the first token ends with an HTTP 503.
    stream_task = asyncio.create_task(client(gateway).completions.create(model=MODEL, prompt="go", stream=True))
    blocking = asyncio.create_task(client(gateway).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "go"}]))
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
    assert gateway.app[FRONTEND].num_in_flight == 0

    status, body = await gateway.get("/health")
    assert status == 503 and dead.encode() in body
    status, body, _ = await gateway.post("/v1/completions", {"prompt": "hi"})
    assert status == 503 and body["error"]["type"] == "server_error"

    for w in gateway.workers:
        w.alive = w.engine_alive = True
    await gateway.wait_for(lambda: gateway.app[FRONTEND].health() is None)
    assert (await gateway.get("/health"))[0] == 200
    gateway.set_script(say_hello)
    assert (await gateway.post("/v1/completions", {"prompt": "hi"}))[0] == 200


async def test_silent_worker_makes_the_service_unavailable(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    gw.workers[1].alive = False
    await gw.wait_for(lambda: gw.app[FRONTEND].health() is not None, timeout=TIMEOUT_S + 2)
    status, body = await gw.get("/health")
    assert status == 503 and b"tokenizer worker 1" in body
    status, body, _ = await gw.post("/tokenize", {"prompt": "hi"})
    assert status == 503
