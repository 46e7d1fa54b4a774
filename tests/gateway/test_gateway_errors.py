"""Bad inputs, auth, size and backpressure limits, and worker-side errors."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from tests.gateway.fakes import (
    MODEL,
    Gateway,
    GatewayFactory,
    endless,
    fail_after_one,
    prompt_too_long,
    say_hello,
)


def assert_openai_error(status: int, body: Any, expected_status: int, param: str | None = None) -> dict:
    assert status == expected_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("invalid_request_error" if expected_status in (400, 401, 404, 413) else err["type"])
    assert err["param"] == param
    return err


COMPLETION_CASES = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"n": 0}, "n"),
    ({"n": 500}, "n"),
    ({"logprobs": 21}, "logprobs"),
    ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [1, "a"]}, "stop_token_ids[1]"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"seed": "x"}, "seed"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"prompt": None}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [[1], []]}, "prompt"),
    ({"prompt": {"text": "hi"}}, "prompt"),
    ({"suffix": "x"}, "suffix"),  # known to OpenAI, not supported here: an error, not a no-op
    ({"best_of": 2}, "best_of"),
    ({"max_token": 5}, "max_token"),  # a typo must not silently fall back to the default
    ({"no_stop_trim": True}, "no_stop_trim"),  # a router extension field at a value not implemented
    ({"return_hidden_states": True}, "return_hidden_states"),
]


@pytest.mark.parametrize("fields,param", COMPLETION_CASES)
async def test_completions_bad_parameters(gateway: Gateway, fields: dict, param: str) -> None:
    status, body, _ = await gateway.post("/v1/completions", {"model": MODEL, "prompt": "hi", **fields})
    assert_openai_error(status, body, 400, param)
    assert gateway.generates == []


CHAT_CASES = [
    ({"messages": None}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "function", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, "messages[0].tool_call_id"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content",
    ),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    ({"logprobs": 3}, "logprobs"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"modalities": ["audio"]}, "modalities"),
    ({"separate_reasoning": False}, "separate_reasoning"),
    ({"continue_final_message": True}, "continue_final_message"),
    ({"messages": [{"role": "user", "content": "hi", "nmae": "x"}]}, "messages[0].nmae"),
    ({"messages": [{"role": "assistant", "content": "hi", "audio": {"id": "a"}}]}, "messages[0].audio"),
]


@pytest.mark.parametrize("fields,param", CHAT_CASES)
async def test_chat_bad_parameters(gateway: Gateway, fields: dict, param: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    status, resp, _ = await gateway.post("/v1/chat/completions", body)
    assert_openai_error(status, resp, 400, param)


async def test_unknown_fields_name_the_argument(gateway: Gateway) -> None:
    status, body, _ = await gateway.post("/v1/completions", {"prompt": "hi", "frobnicate": 1})
    err = assert_openai_error(status, body, 400, "frobnicate")
    assert err["message"] == "Unrecognized request argument supplied: frobnicate"


# What vllm-router 0.x forwards (recorded): its typed request structs re-serialize SGLang's
# extension fields at their defaults into every body.
ROUTER_CHAT_FIELDS = {
    "stream": False,
    "logprobs": False,
    "no_stop_trim": False,
    "ignore_eos": False,
    "continue_final_message": False,
    "skip_special_tokens": True,
    "separate_reasoning": True,
    "stream_reasoning": True,
    "return_hidden_states": False,
    "include_reasoning": True,
}
ROUTER_COMPLETION_FIELDS = {
    "stream": False,
    "echo": False,
    "no_stop_trim": False,
    "ignore_eos": False,
    "skip_special_tokens": True,
    "return_hidden_states": False,
}


async def test_bodies_forwarded_by_vllm_router_are_accepted(gateway: Gateway) -> None:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, **ROUTER_CHAT_FIELDS}
    status, body, _ = await gateway.post("/v1/chat/completions", chat)
    assert status == 200, body
    completion = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, **ROUTER_COMPLETION_FIELDS}
    status, body, _ = await gateway.post("/v1/completions", completion)
    assert status == 200, body


async def test_an_assistant_reply_sent_back_as_history_is_accepted(gateway: Gateway) -> None:
    # What the openai client's ChatCompletionMessage.model_dump() gives, appended to the next turn.
    reply = {
        "role": "assistant",
        "content": "Hello!",
        "refusal": None,
        "annotations": [],
        "audio": None,
        "function_call": None,
        "tool_calls": None,
    }
    messages = [{"role": "user", "content": "hi"}, reply, {"role": "user", "content": "again"}]
    status, body, _ = await gateway.post("/v1/chat/completions", {"model": MODEL, "messages": messages})
    assert status == 200, body


@pytest.mark.parametrize("data", [b"{not json", b"", b"[1, 2]", b'"text"'])
async def test_malformed_body(gateway: Gateway, data: bytes) -> None:
    status, body, _ = await gateway.post("/v1/chat/completions", data=data)
    assert_openai_error(status, body, 400)


async def test_unknown_model_404_and_default_model(gateway: Gateway) -> None:
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as exc:
        await client.completions.create(model="gpt-4", prompt="hi")
    assert exc.value.body["code"] == "model_not_found" and exc.value.body["type"] == "invalid_request_error"
    status, body, _ = await gateway.post("/v1/completions", {"prompt": "hi"})  # no model: the served one
    assert status == 200 and body["model"] == MODEL
    status, body = await gateway.get("/v1/models/gpt-4")
    assert status == 404
    status, body = await gateway.get("/v1/nothing-here")
    assert status == 404 and b'"error"' in body


async def test_api_key(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(api_key="s3cret")
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await client.models.list()
    status, body, _ = await gw.post("/v1/completions", {"prompt": "hi"})
    assert assert_openai_error(status, body, 401)["code"] == "invalid_api_key"
    status, body, _ = await gw.post("/tokenize", {"prompt": "hi"})
    assert status == 401
    good = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="s3cret", max_retries=0)
    assert (await good.completions.create(model=MODEL, prompt="hi")).choices
    assert (await gw.get("/health"))[0] == 200
    assert (await gw.get("/metrics"))[0] == 200


async def test_body_too_large(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(max_body_bytes=1024)
    status, body, _ = await gw.post("/v1/completions", {"prompt": "x" * 2000})
    assert_openai_error(status, body, 413)
    status, body, _ = await gw.post("/v1/completions", {"prompt": "x" * 100})
    assert status == 200


async def test_backpressure_429(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(max_queued_requests=2)
    gw.set_script(endless)
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    busy = [asyncio.create_task(client.completions.create(model=MODEL, prompt="hi")) for _ in range(2)]
    await gw.wait_for(lambda: len(gw.generates) == 2)
    status, body, resp = await gw.post("/v1/completions", {"prompt": "hi"})
    assert assert_openai_error(status, body, 429)["code"] == "rate_limit_exceeded"
    assert resp.headers["Retry-After"] == "1"
    for g in gw.generates:
        parent = g.request_id.rsplit("-", 1)[0]
        assert (await gw.post(f"/v1/requests/{parent}/cancel"))[0] == 200
    done = await asyncio.gather(*busy)
    assert all(r.choices[0].finish_reason == "abort" for r in done)
    gw.set_script(say_hello)
    assert (await gw.post("/v1/completions", {"prompt": "hi"}))[0] == 200  # room again


@pytest.mark.parametrize("stream", [False, True])
async def test_prompt_too_long_is_a_400(gateway: Gateway, stream: bool) -> None:
    gateway.set_script(prompt_too_long)
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as exc:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "long"}], stream=stream, n=2
        )
    assert "maximum context length is 2048 tokens" in exc.value.body["message"]
    assert (exc.value.body["param"], exc.value.body["code"]) == ("messages", "context_length_exceeded")
    # The sibling choice was aborted with it.
    await gateway.wait_for(lambda: len(gateway.generates) == 2)


async def test_error_mid_stream_is_an_sse_error_event(gateway: Gateway) -> None:
    gateway.set_script(fail_after_one)
    status, body, resp = await gateway.post("/v1/completions", {"prompt": "hi", "stream": True})
    assert status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    events = body.decode().strip().split("\n\n")
    assert events[-1] == "data: [DONE]"
    assert '"error"' in events[-2] and "internal engine error" in events[-2]
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    stream = await client.completions.create(model=MODEL, prompt="hi", stream=True)
    with pytest.raises(openai.APIError, match="internal engine error"):
        async for _ in stream:
            pass


async def test_error_non_stream_uses_the_error_code(gateway: Gateway) -> None:
    gateway.set_script(fail_after_one)
    status, body, _ = await gateway.post("/v1/completions", {"prompt": "hi"})
    assert status == 500 and body["error"]["type"] == "server_error"
