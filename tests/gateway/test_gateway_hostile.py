"""Hostile input through the real HTTP stack: huge numbers, deep nesting, broken encodings and
framing. Each gets a 4xx in OpenAI's error shape, nothing reaches a worker, and the gateway
still serves a normal request afterwards."""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import aiohttp
import msgspec
import openai
import pytest

from tests.gateway.fakes import MODEL, Gateway, endless
from tests.gateway.test_gateway_errors import assert_openai_error

BIG = [2**64, 10**30, -(2**64)]


async def assert_still_serves(gw: Gateway) -> None:
    status, body, _ = await gw.post("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3})
    assert status == 200 and body["choices"][0]["text"], body


@pytest.mark.parametrize("value", BIG)
@pytest.mark.parametrize("field", ["max_tokens", "seed", "n", "top_k", "min_tokens", "logprobs"])
async def test_integers_past_64_bits_are_400(gateway: Gateway, field: str, value: int) -> None:
    status, body, _ = await gateway.post("/v1/completions", {"prompt": "Hi", field: value})
    assert_openai_error(status, body, 400, field)
    assert gateway.generates == []


@pytest.mark.parametrize(
    "path,fields,param",
    [
        ("/v1/completions", {"prompt": [2**64]}, "prompt"),
        ("/v1/completions", {"prompt": [[1, 2], [10**30]]}, "prompt"),
        ("/v1/completions", {"prompt": "Hi", "stop_token_ids": [2**64]}, "stop_token_ids[0]"),
        ("/v1/chat/completions", {"max_completion_tokens": 2**64}, "max_completion_tokens"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 10**30}, "top_logprobs"),
        ("/detokenize", {"tokens": [1, 2**64]}, "tokens[1]"),
    ],
)
async def test_huge_token_ids_and_limits_are_400(gateway: Gateway, path: str, fields: dict, param: str) -> None:
    if path == "/v1/chat/completions":
        fields = {"messages": [{"role": "user", "content": "hi"}], **fields}
    status, body, _ = await gateway.post(path, fields)
    assert_openai_error(status, body, 400, param)
    await assert_still_serves(gateway)


async def test_seed_at_the_int64_edge_with_n(gateway: Gateway) -> None:
    # The second child's seed (seed + 1) wraps around instead of overflowing the wire format.
    status, body, _ = await gateway.post("/v1/completions", {"prompt": "Hi", "seed": 2**63 - 1, "n": 2})
    assert status == 200 and len(body["choices"]) == 2
    assert sorted(g.sampling_params.seed for g in gateway.generates) == [-(2**63), 2**63 - 1]


@pytest.mark.parametrize(
    "where,param", [("prompt", None), ("unknown_field", "unknown_field"), ("messages", "messages[0]")]
)
async def test_deep_nesting_is_400(gateway: Gateway, where: str, param: str | None) -> None:
    nested = b"[" * 1000 + b"]" * 1000
    if where == "messages":
        data = b'{"messages": ' + nested + b"}"
        path = "/v1/chat/completions"
    else:
        data = b'{"prompt": "hi", "' + where.encode() + b'": ' + nested + b"}"
        path = "/v1/completions"
    status, body, _ = await gateway.post(path, data=data)
    if where == "prompt" and isinstance(body, dict) and body.get("error", {}).get("param") == "prompt":
        # msgspec's guard is the interpreter's recursion limit, which a library imported earlier
        # in the process may have raised past 1000 levels: then the nested list decodes and is
        # rejected as a prompt instead, a 400 all the same.
        param = "prompt"
    assert_openai_error(status, body, 400, param)
    await assert_still_serves(gateway)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "x-nonsense"])
async def test_wrong_content_encoding_is_400(gateway: Gateway, encoding: str) -> None:
    data = msgspec.json.encode({"prompt": "Hi", "max_tokens": 2})
    status, body = await raw_request(gateway, _request(data, f"Content-Encoding: {encoding}", "Connection: close"))
    assert_openai_error(status, body, 415 if encoding == "x-nonsense" else 400)
    await assert_still_serves(gateway)


@pytest.mark.parametrize("size", [10, 1_000_000])
async def test_unreadable_body_closes_the_connection_after_the_answer(gateway: Gateway, size: int) -> None:
    """aiohttp's parser stops at an undecodable body, so the connection cannot carry another
    request: the 400 says `Connection: close`, a request pipelined behind it is not answered,
    and the rest of a large body is drained rather than answered with a reset (a close with
    unread bytes makes the kernel send a RST, which can destroy the 400 before it is read)."""
    data = msgspec.json.encode({"prompt": "a" * size, "max_tokens": 2})
    pipelined = _request(BODY)
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(_request(data, "Content-Encoding: gzip") + pipelined)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 20)  # to EOF, not ConnectionResetError
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"\r\nConnection: close" in head, head
    assert_openai_error(400, msgspec.json.decode(body), 400)
    assert gateway.generates == []
    await assert_still_serves(gateway)


async def test_unreadable_bodies_do_not_break_a_pooled_client(gateway: Gateway) -> None:
    """The soak's connection resets: a pooled aiohttp client reused a connection the server
    closed after a bad-encoding 400 that did not say it would. Every request gets its answer."""
    bad = msgspec.json.encode({"prompt": "Hi", "max_tokens": 2})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4)) as session:

        async def one(i: int) -> int:
            if i % 3:
                async with session.post(gateway.url + "/v1/completions", json={"prompt": "Hi"}) as r:
                    return r.status
            headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
            async with session.post(gateway.url + "/v1/completions", data=bad, headers=headers) as r:
                assert r.headers["Connection"] == "close"
                assert_openai_error(r.status, await r.json(), 400)
                return r.status

        statuses = await asyncio.gather(*(one(i) for i in range(90)))  # a ClientError fails the test
    assert sorted(set(statuses)) == [200, 400]


async def test_real_gzip_body_is_accepted(gateway: Gateway) -> None:
    data = gzip.compress(msgspec.json.encode({"prompt": "Hi", "max_tokens": 2}))
    status, body, _ = await gateway.post("/v1/completions", data=data, headers={"Content-Encoding": "gzip"})
    assert status == 200, body


def _request(body: bytes, *headers: str, length: str | None = None) -> bytes:
    head = ["POST /v1/completions HTTP/1.1", "Host: x", "Content-Type: application/json"]
    head += [f"Content-Length: {len(body) if length is None else length}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


BODY = b'{"prompt": "Hi", "max_tokens": 2}'
FRAMING_CASES = [
    b"GARBAGE\r\n\r\n",
    b"POST /v1/completions HTTP/9.9\r\nHost: x\r\n\r\n",
    b"POST /v1/completions\r\n\r\n",
    b"POST /v1/com pletions HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n" + BODY,
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n" + BODY,
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n" + BODY,
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked, x\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n: empty-name\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-A: \x00\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n folded: line\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n",
    b"POST /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32,  # a TLS ClientHello on the plain port
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc\r\n0\r\n\r\n",
]


async def raw_request(gw: Gateway, data: bytes) -> tuple[int, Any]:
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 20)  # every error closes the connection
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"application/json" in head, raw[:300]
    return status, msgspec.json.decode(body)


@pytest.mark.parametrize("data", FRAMING_CASES, ids=range(len(FRAMING_CASES)))
async def test_malformed_framing_gets_openai_errors(gateway: Gateway, data: bytes) -> None:
    status, body = await raw_request(gateway, data)
    assert 400 <= status < 500
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert gateway.generates == []
    await assert_still_serves(gateway)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_stream_options_without_stream_is_400(gateway: Gateway, path: str) -> None:
    body: dict[str, Any] = {"stream_options": {"include_usage": True}}
    body.update({"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    status, resp, _ = await gateway.post(path, {**body, "stream": False})
    assert_openai_error(status, resp, 400, "stream_options")
    status, resp, _ = await gateway.post(path, {**body, "stream_options": None})  # null is "not given"
    assert status == 200


async def test_echo_with_logprobs_is_refused(gateway: Gateway) -> None:
    status, body, _ = await gateway.post("/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 1})
    assert_openai_error(status, body, 400, "logprobs")


async def test_non_streaming_request_can_be_cancelled_by_client_id(gateway: Gateway) -> None:
    gateway.set_script(endless)
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    task = asyncio.create_task(
        client.completions.create(model=MODEL, prompt="go", max_tokens=1000, extra_headers={"X-Request-Id": "job-7"})
    )
    await gateway.wait_for(lambda: len(gateway.generates) == 1)
    assert gateway.generates[0].request_id == "cmpl-job-7-0"
    # A second request with the same id while the first runs is refused, not merged into it.
    status, body, _ = await gateway.post("/v1/completions", {"prompt": "x"}, headers={"X-Request-Id": "job-7"})
    assert_openai_error(status, body, 400, "X-Request-Id")
    status, body, _ = await gateway.post("/v1/requests/job-7/cancel")
    assert status == 200, body
    resp = await task
    assert resp.id == "cmpl-job-7" and resp.choices[0].finish_reason == "abort"


async def test_non_streaming_response_has_request_id_header(gateway: Gateway) -> None:
    status, body, resp = await gateway.post("/v1/completions", {"prompt": "hi"})
    assert status == 200 and resp.headers["X-Request-Id"] == body["id"]
    status, body, _ = await gateway.post("/v1/completions", {"prompt": "hi"}, headers={"X-Request-Id": "a b"})
    assert_openai_error(status, body, 400, "X-Request-Id")


@pytest.mark.parametrize("value", ["1e400", "-1e400"])
async def test_non_finite_floats_are_400(gateway: Gateway, value: str) -> None:
    data = b'{"prompt": "hi", "temperature": ' + value.encode() + b"}"
    status, body, _ = await gateway.post("/v1/completions", data=data)
    assert_openai_error(status, body, 400, "temperature")
