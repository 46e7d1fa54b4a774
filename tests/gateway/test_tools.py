"""Chat tools at the gateway: what reaches the workers, the 400s, and tool-call deltas in
OpenAI's shapes (whole and streamed) through the official client."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from shared.protocol import GenerateRequest, RequestDelta, ToolCallDelta
from tests.gateway.fakes import MODEL, FakeWorker, Gateway
from tests.gateway.test_gateway_errors import assert_openai_error

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": PARAMS}}]
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "weather?"}]}


async def post(gateway: Gateway, body: dict) -> GenerateRequest:
    """POST a chat completion; the request the worker got for it."""
    before = {g.request_id for g in gateway.generates}
    status, resp, _ = await gateway.post("/v1/chat/completions", body)
    assert status == 200, resp
    (req,) = [g for g in gateway.generates if g.request_id not in before]
    return req


async def test_tool_choices_reach_the_workers(gateway: Gateway) -> None:
    req = await post(gateway, {**CHAT, "tools": TOOLS})
    assert (req.tool_choice, req.tools, req.sampling_params.structured_output) == ("auto", TOOLS, None)
    named = {"type": "function", "function": {"name": "get_weather"}}
    req = await post(gateway, {**CHAT, "tools": TOOLS, "tool_choice": named})
    assert (req.tool_choice, req.tool_name) == ("named", "get_weather")
    assert json.loads(req.sampling_params.structured_output.spec) == PARAMS
    req = await post(gateway, {**CHAT, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False})
    spec = json.loads(req.sampling_params.structured_output.spec)
    assert spec["minItems"] == 1 and spec["maxItems"] == 1
    assert spec["items"]["anyOf"][0]["properties"] == {"name": {"const": "get_weather"}, "parameters": PARAMS}
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    sent = (await post(gateway, {**CHAT, "messages": messages, "tools": TOOLS})).messages
    assert sent[1].tool_calls[0]["function"]["name"] == "get_weather" and sent[2].tool_call_id == "c1"


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        ({"tools": TOOLS * 2}, "tools[1].function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ],
)
async def test_bad_tools_400(gateway: Gateway, fields: dict, param: str) -> None:
    status, body, _ = await gateway.post("/v1/chat/completions", {**CHAT, **fields})
    assert_openai_error(status, body, 400, param)


async def two_calls(worker: FakeWorker, req: GenerateRequest) -> None:
    """As a tokenizer worker's parser reports calls: ids and names first, then argument text."""
    deltas = [
        RequestDelta(request_id=req.request_id, text="Sure.", num_prompt_tokens=5, num_output_tokens=2),
        RequestDelta(
            request_id=req.request_id,
            tool_calls=[ToolCallDelta(index=0, id="call_a", name="get_weather", arguments="")],
            num_output_tokens=4,
        ),
        RequestDelta(
            request_id=req.request_id, tool_calls=[ToolCallDelta(index=0, arguments='{"city": ')], num_output_tokens=6
        ),
        RequestDelta(
            request_id=req.request_id,
            tool_calls=[
                ToolCallDelta(index=0, arguments='"Paris"}'),
                ToolCallDelta(index=1, id="call_b", name="get_weather", arguments='{"city": "Rome"}'),
            ],
            num_output_tokens=9,
            finish_reason="tool_calls",
        ),
    ]
    for d in deltas:
        worker.send(d)
        await asyncio.sleep(0.005)


async def test_tool_calls_in_openai_shapes(gateway: Gateway) -> None:
    gateway.set_script(two_calls)
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    resp = await client.chat.completions.create(model=MODEL, messages=CHAT["messages"], tools=TOOLS)
    msg = resp.choices[0].message
    assert resp.choices[0].finish_reason == "tool_calls" and msg.content == "Sure."
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [
        ("call_a", "get_weather", {"city": "Paris"}),
        ("call_b", "get_weather", {"city": "Rome"}),
    ]
    stream = await client.chat.completions.create(model=MODEL, messages=CHAT["messages"], tools=TOOLS, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    async for chunk in stream:
        for tc in chunk.choices[0].delta.tool_calls or []:
            if tc.id:
                assert tc.function.name and tc.type == "function"
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments or ""}
            else:
                calls[tc.index]["arguments"] += tc.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [json.loads(c["arguments"]) for c in calls.values()] == [{"city": "Paris"}, {"city": "Rome"}]


async def test_parallel_tool_calls_and_template_kwargs_reach_the_workers(gateway: Gateway) -> None:
    req = await post(gateway, {**CHAT, "tools": TOOLS})
    assert req.parallel_tool_calls and req.chat_template_kwargs is None
    req = await post(
        gateway,
        {**CHAT, "tools": TOOLS, "parallel_tool_calls": False, "chat_template_kwargs": {"enable_thinking": False}},
    )
    assert not req.parallel_tool_calls and req.chat_template_kwargs == {"enable_thinking": False}
    status, body, _ = await gateway.post("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"messages": []}})
    assert_openai_error(status, body, 400, "chat_template_kwargs")


async def think_then_answer(worker: FakeWorker, req: GenerateRequest) -> None:
    """As a tokenizer worker's reasoning parser reports a thinking model's output."""
    deltas = [
        RequestDelta(request_id=req.request_id, reasoning_text="The user", num_prompt_tokens=5, num_output_tokens=2),
        RequestDelta(request_id=req.request_id, reasoning_text=" asks.", num_output_tokens=4),
        RequestDelta(request_id=req.request_id, text='{"a": 1}', num_output_tokens=9, finish_reason="stop"),
    ]
    for d in deltas:
        worker.send(d)
        await asyncio.sleep(0.005)


async def test_reasoning_content_in_openai_shapes(gateway: Gateway) -> None:
    gateway.set_script(think_then_answer)
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    resp = await client.chat.completions.create(model=MODEL, messages=CHAT["messages"])
    msg = resp.choices[0].message
    assert (msg.reasoning_content, msg.content) == ("The user asks.", '{"a": 1}')  # type: ignore[attr-defined]
    stream = await client.chat.completions.create(model=MODEL, messages=CHAT["messages"], stream=True)
    reasoning = content = ""
    async for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
    assert (reasoning, content) == ("The user asks.", '{"a": 1}')
    gateway.set_script(two_calls)  # no reasoning: no reasoning_content key at all
    status, body, _ = await gateway.post("/v1/chat/completions", CHAT)
    assert status == 200 and "reasoning_content" not in body["choices"][0]["message"]
