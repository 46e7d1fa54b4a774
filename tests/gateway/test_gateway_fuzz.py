"""Property-based fuzzing of the OpenAI request schema (hypothesis), through the real HTTP stack.

Bodies mix the fields each endpoint knows (with plausible and hostile values: huge and
negative numbers, deep or odd JSON, wrong types) with unknown ones, or are not JSON at all.
Whatever comes in: never a 5xx, never a hang, every error in OpenAI's shape, and a normal
request still answers afterwards. The budget is bounded (and derandomized) for CI;
NOVAINFER_FUZZ_EXAMPLES raises it for a longer local run.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gateway.fakes import MODEL, Gateway, start_gateway

EXAMPLES = int(os.environ.get("NOVAINFER_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: 2**64 and beyond
    | st.integers(min_value=-(2**65), max_value=2**65)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
small_ints = st.integers(min_value=-3, max_value=40)
token_ids = st.lists(st.integers(min_value=-2, max_value=70000) | st.integers(), min_size=0, max_size=6)
probability = st.floats(min_value=-0.5, max_value=2.5, allow_nan=False)


def field(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return plausible | json_values


SAMPLING = {
    "model": field(st.sampled_from([MODEL, "gpt-4"])),
    "max_tokens": field(small_ints),
    "temperature": field(probability),
    "top_p": field(probability),
    "top_k": field(small_ints),
    "min_p": field(probability),
    "n": field(st.integers(min_value=0, max_value=4)),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "stop": field(st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3)),
    "stop_token_ids": field(token_ids),
    "seed": field(st.integers()),
    "presence_penalty": field(st.floats(min_value=-3, max_value=3)),
    "frequency_penalty": field(st.floats(min_value=-3, max_value=3)),
    "repetition_penalty": field(st.floats(min_value=-1, max_value=3)),
    "ignore_eos": field(st.booleans()),
    "min_tokens": field(small_ints),
    "include_stop_str_in_output": field(st.booleans()),
    "skip_special_tokens": field(st.booleans()),
    "user": field(st.text(max_size=10)),
    "unknown_field": json_values,
}
message = st.fixed_dictionaries(
    {"role": field(st.sampled_from(["system", "developer", "user", "assistant", "tool"]))},
    optional={
        "content": field(
            st.text(max_size=20)
            | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)}), max_size=2)
        )
    },
)
COMPLETION = {
    **SAMPLING,
    "prompt": field(
        st.text(max_size=30) | token_ids | st.lists(st.text(max_size=10), max_size=3) | st.lists(token_ids, max_size=3)
    ),
    "echo": field(st.booleans()),
    "logprobs": field(small_ints),
}
CHAT = {
    **SAMPLING,
    "messages": field(st.lists(message, max_size=3)),
    "max_completion_tokens": field(small_ints),
    "logprobs": field(st.booleans()),
    "top_logprobs": field(small_ints),
    "add_generation_prompt": field(st.booleans()),
}
TOKENIZE = {
    "model": field(st.just(MODEL)),
    "prompt": field(st.text(max_size=30)),
    "messages": field(st.lists(message, max_size=2)),
    "add_special_tokens": field(st.booleans()),
}
DETOKENIZE = {"model": field(st.just(MODEL)), "tokens": field(token_ids)}


def bodies(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[bytes]:
    structured = st.fixed_dictionaries({}, optional=fields).map(msgspec.json.encode)
    deep = st.integers(min_value=1, max_value=3000).map(lambda d: b'{"prompt": ' + b"[" * d + b"]" * d + b"}")
    return structured | json_values.map(msgspec.json.encode) | st.binary(max_size=64) | deep


@pytest.fixture(scope="module")
def live_gateway() -> Iterator[Gateway]:
    """The gateway and its fake workers on a loop in a thread, so hypothesis drives a plain
    synchronous test."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    gw, stop = asyncio.run_coroutine_threadsafe(start_gateway(), loop).result(30)
    try:
        yield gw
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@dataclass
class Response:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


class Client:
    """A plain http.client, one connection per request: a malformed request closes its
    connection, and the 10 s timeout is the "no hang" check (the fakes answer in ms)."""

    def __init__(self, url: str) -> None:
        self.host, port = url.removeprefix("http://").rsplit(":", 1)
        self.port = int(port)

    def post(self, path: str, body: bytes) -> Response:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            return Response(r.status, r.getheader("Content-Type", ""), r.read())
        finally:
            conn.close()


def check(client: Client, path: str, body: bytes) -> None:
    resp = client.post(path, body)
    assert resp.status < 500, (path, body, resp.status, resp.body)
    if resp.status >= 400:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), err
        assert err["type"] == "invalid_request_error" or resp.status == 429, err
    elif resp.content_type.startswith("text/event-stream"):
        assert resp.body.endswith(b"data: [DONE]\n\n"), resp.body
    else:
        assert isinstance(resp.json(), dict)


@pytest.fixture(scope="module")
def client(live_gateway: Gateway) -> Client:
    return Client(live_gateway.url)


@pytest.mark.parametrize(
    "path,fields",
    [
        ("/v1/completions", COMPLETION),
        ("/v1/chat/completions", CHAT),
        ("/tokenize", TOKENIZE),
        ("/detokenize", DETOKENIZE),
    ],
)
def test_fuzz_request_schema(client: Client, path: str, fields: dict[str, st.SearchStrategy[Any]]) -> None:
    @FUZZ
    @given(body=bodies(fields))
    def run(body: bytes) -> None:
        check(client, path, body)

    run()
    resp = client.post("/v1/completions", msgspec.json.encode({"model": MODEL, "prompt": "hi", "max_tokens": 3}))
    assert resp.status == 200 and resp.json()["choices"][0]["text"]
