"""The Responses API at the gateway, against fake workers: what reaches the workers, the
Response objects and stream events through the official client, the store, and the 400s/404s."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import openai
import pydantic
import pytest

from shared.protocol import GenerateRequest, RequestDelta
from tests.gateway.fakes import (
    MODEL,
    FakeWorker,
    Gateway,
    GatewayFactory,
    endless,
    fail_after_one,
    prompt_too_long,
    say_hello,
)
from tests.gateway.test_gateway_errors import assert_openai_error
from tests.gateway.test_tools import two_calls

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather", "parameters": PARAMS, "strict": True}]


def client(gw: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)


def last_request(gw: Gateway) -> GenerateRequest:
    return max((g for w in gw.workers for g in w.generates), key=lambda g: g.arrival_time or 0)


async def sent(gw: Gateway, body: dict[str, Any]) -> GenerateRequest:
    """POST /v1/responses; the request the worker got for it."""
    before = {g.request_id for g in gw.generates}
    status, resp, _ = await gw.post("/v1/responses", {"model": MODEL, **body})
    assert status == 200, resp
    (req,) = [g for g in gw.generates if g.request_id not in before]
    return req


async def test_plain_response_shape(gateway: Gateway) -> None:
    resp = await client(gateway).responses.create(
        model=MODEL, input="Hi", instructions="Be brief.", metadata={"k": "v"}
    )
    assert resp.id.startswith("resp_") and resp.object == "response" and resp.status == "completed"
    assert resp.output_text == "Hello, world" and resp.model == MODEL
    (item,) = resp.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.total_tokens) == (5, 3, 8)
    assert resp.usage.input_tokens_details.cached_tokens == 2
    assert resp.instructions == "Be brief." and resp.metadata == {"k": "v"} and resp.incomplete_details is None
    req = last_request(gateway)
    assert [(m.role, m.content) for m in req.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert req.request_id.startswith(resp.id)


async def test_max_output_tokens_incomplete(gateway: Gateway) -> None:
    resp = await client(gateway).responses.create(model=MODEL, input="Hi", max_output_tokens=2, temperature=0)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output_text == "Hello," and resp.max_output_tokens == 2 and resp.temperature == 0
    assert last_request(gateway).sampling_params.max_tokens == 2


async def test_input_items_become_chat_turns(gateway: Gateway) -> None:
    items = [
        {"role": "developer", "content": "dev"},
        {"role": "user", "content": [{"type": "input_text", "text": "weather "}, {"type": "input_text", "text": "?"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me see."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]},
    ]
    req = await sent(gateway, {"input": items, "tools": TOOLS})
    turns = [(m.role, m.content, m.tool_call_id) for m in req.messages]
    assert turns == [
        ("system", "dev", None),
        ("user", "weather ?", None),
        ("assistant", "Let me see.", None),
        ("tool", "sunny", "c1"),
        ("tool", "rain", "c2"),
    ]
    assert [c["id"] for c in req.messages[2].tool_calls] == ["c1", "c2"]
    chat_tool = {"name": "get_weather", "description": "Weather", "parameters": PARAMS, "strict": True}
    assert req.tools == [{"type": "function", "function": chat_tool}] and req.tool_choice == "auto"


async def test_text_format_and_tool_choice_reach_the_engine(gateway: Gateway) -> None:
    fmt = {"type": "json_schema", "name": "city", "schema": PARAMS, "strict": True}
    req = await sent(gateway, {"input": "x", "text": {"format": fmt}})
    spec = req.sampling_params.structured_output
    assert spec.kind == "json_schema" and json.loads(spec.spec) == PARAMS
    req = await sent(gateway, {"input": "x", "text": {"format": {"type": "json_object"}}})
    assert req.sampling_params.structured_output.kind == "json_object"
    req = await sent(
        gateway, {"input": "x", "tools": TOOLS, "tool_choice": {"type": "function", "name": "get_weather"}}
    )
    assert (req.tool_choice, req.tool_name) == ("named", "get_weather")
    req = await sent(gateway, {"input": "x", "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False})
    assert json.loads(req.sampling_params.structured_output.spec)["maxItems"] == 1


async def test_stream_events_match_the_whole_response(gateway: Gateway) -> None:
    c = client(gateway)
    whole = await c.responses.create(model=MODEL, input="Hi")
    events = [e async for e in await c.responses.create(model=MODEL, input="Hi", stream=True)]
    types = [e.type for e in events]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    final = events[-1].response
    assert final.output_text == whole.output_text and final.status == "completed"
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert events[7].text == whole.output_text and events[9].item.status == "completed"
    # A streamed response is stored like a whole one.
    assert (await c.responses.retrieve(final.id)).output_text == whole.output_text


async def test_stream_incomplete(gateway: Gateway) -> None:
    stream = await client(gateway).responses.create(model=MODEL, input="Hi", stream=True, max_output_tokens=1)
    events = [e async for e in stream]
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-2].item.status == "incomplete"


async def test_function_calls_whole_and_streamed(gateway: Gateway) -> None:
    gateway.set_script(two_calls)
    c = client(gateway)
    resp = await c.responses.create(model=MODEL, input="weather?", tools=TOOLS)
    assert [i.type for i in resp.output] == ["message", "function_call", "function_call"]
    calls = resp.output[1:]
    assert [(i.call_id, i.name, json.loads(i.arguments)) for i in calls] == [
        ("call_a", "get_weather", {"city": "Paris"}),
        ("call_b", "get_weather", {"city": "Rome"}),
    ]
    assert resp.output_text == "Sure." and all(i.id.startswith("fc_") for i in calls)
    events = [e async for e in await c.responses.create(model=MODEL, input="weather?", tools=TOOLS, stream=True)]
    args: dict[int, str] = {}
    for e in events:
        if e.type == "response.function_call_arguments.delta":
            args[e.output_index] = args.get(e.output_index, "") + e.delta
    assert [json.loads(a) for a in args.values()] == [{"city": "Paris"}, {"city": "Rome"}]
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [e.arguments for e in done] == list(args.values())
    final = events[-1].response
    assert [(i.type, getattr(i, "call_id", None)) for i in final.output] == [
        ("message", None),
        ("function_call", "call_a"),
        ("function_call", "call_b"),
    ]
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["message", "function_call", "function_call"]


async def test_previous_response_id_store_get_delete(gateway: Gateway) -> None:
    c = client(gateway)
    first = await c.responses.create(model=MODEL, input="Hi", instructions="first only")
    second = await c.responses.create(model=MODEL, input="More", previous_response_id=first.id)
    turns = [(m.role, m.content) for m in last_request(gateway).messages]
    assert turns == [("user", "Hi"), ("assistant", "Hello, world"), ("user", "More")]
    assert second.previous_response_id == first.id
    await c.responses.create(model=MODEL, input="Again", previous_response_id=second.id)
    assert [m.content for m in last_request(gateway).messages] == [
        "Hi",
        "Hello, world",
        "More",
        "Hello, world",
        "Again",
    ]
    got = await c.responses.retrieve(first.id)
    assert got.model_dump() == first.model_dump()
    assert await c.responses.delete(first.id) is None
    with pytest.raises(openai.NotFoundError):
        await c.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        await c.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as e:
        await c.responses.create(model=MODEL, input="x", previous_response_id=first.id)
    assert e.value.body["param"] == "previous_response_id"
    unstored = await c.responses.create(model=MODEL, input="Hi", store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        await c.responses.retrieve(unstored.id)


async def test_store_is_bounded(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(responses_store_size=2)
    c = client(gw)
    ids = [(await c.responses.create(model=MODEL, input="Hi")).id for _ in range(3)]
    await c.responses.retrieve(ids[1])  # now the most recently used: ids[2] goes next
    await c.responses.create(model=MODEL, input="Hi")
    for response_id, kept in zip(ids, [False, True, False], strict=True):
        status, body = await gw.get(f"/v1/responses/{response_id}")
        assert status == (200 if kept else 404), body


async def test_delete_body(gateway: Gateway) -> None:
    first = await client(gateway).responses.create(model=MODEL, input="Hi")
    async with aiohttp.ClientSession() as s, s.delete(f"{gateway.url}/v1/responses/{first.id}") as r:
        assert r.status == 200 and await r.json() == {"id": first.id, "object": "response", "deleted": True}
    status, body = await gateway.get(f"/v1/responses/{first.id}")
    assert status == 404 and json.loads(body)["error"]["code"] == "response_not_found"


async def test_disconnect_aborts_the_engine_request(gateway: Gateway) -> None:
    gateway.set_script(endless)
    async with aiohttp.ClientSession() as s:
        body = {"model": MODEL, "input": "Hi", "stream": True}
        async with s.post(gateway.url + "/v1/responses", json=body) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            await r.content.readuntil(b"response.output_text.delta")
    await gateway.wait_for(lambda: bool(gateway.aborted()))
    (req,) = gateway.generates
    assert req.request_id in gateway.aborted()


BAD = [
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"not": {}}}]}, "tools[0].parameters"),
    ({"input": "x", "tools": [{"type": "function", "name": "a b"}]}, "tools[0].name"),
    ({"input": "x", "tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"input": "x", "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": "x", "include": ["reasoning.encrypted_content"]}, "include"),
    ({"input": "x", "truncation": "auto"}, "truncation"),
    ({"input": "x", "frequency_penalty": 1}, "frequency_penalty"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "temperature": -1}, "temperature"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "schema": PARAMS}}}, "text.format.name"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n", "schema": {"not": {}}}}}, "text.format"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"input": []}, "input"),
    ({}, "input"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}, "input[0].content"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": "x", "stream_options": {"include_obfuscation": False}}, "stream_options"),
    ({"input": "x", "metadata": {"k": "v" * 600}}, "metadata"),
]


@pytest.mark.parametrize("body,param", BAD)
async def test_bad_requests_400(gateway: Gateway, body: dict[str, Any], param: str | None) -> None:
    status, resp, _ = await gateway.post("/v1/responses", {"model": MODEL, **body})
    assert_openai_error(status, resp, 400, param)
    assert gateway.generates == []


async def test_errors_through_the_client_and_still_serving(gateway: Gateway) -> None:
    c = client(gateway)
    with pytest.raises(openai.BadRequestError) as e:
        await c.responses.create(model=MODEL, input="x", tools=[{"type": "web_search"}])
    assert e.value.body["param"] == "tools[0].type"
    with pytest.raises(openai.NotFoundError):
        await c.responses.create(model="other", input="x")
    with pytest.raises(openai.NotFoundError):
        await c.responses.retrieve("resp_missing")
    results = await asyncio.gather(*(c.responses.create(model=MODEL, input="Hi") for _ in range(4)))
    assert {r.output_text for r in results} == {"Hello, world"}


async def test_engine_errors_before_and_during_the_stream(gateway: Gateway) -> None:
    c = client(gateway)
    gateway.set_script(prompt_too_long)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            await c.responses.create(model=MODEL, input="long", stream=stream)
        assert e.value.body["param"] == "input" and e.value.body["code"] == "context_length_exceeded"
    gateway.set_script(fail_after_one)
    events = [e async for e in await c.responses.create(model=MODEL, input="Hi", stream=True)]
    assert [e.type for e in events][-2:] == ["response.output_text.delta", "response.failed"]
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error" and failed.error.message
    assert failed.output[0].type == "message"
    with pytest.raises(openai.NotFoundError):
        await c.responses.retrieve(failed.id)  # a failed response is not stored
    with pytest.raises(openai.InternalServerError):
        await c.responses.create(model=MODEL, input="Hi")


async def test_input_items_listed(gateway: Gateway) -> None:
    c = client(gateway)
    items = [
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}", "id": "fc_mine"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
    ]
    first = await c.responses.create(model=MODEL, input=items, tools=TOOLS)
    page = await c.responses.input_items.list(first.id, order="asc")
    assert [i.type for i in page.data] == ["message", "function_call", "function_call_output"]
    assert page.data[0].content[0].text == "weather?" and page.data[0].role == "user"
    assert page.data[1].id == "fc_mine" and page.data[2].output == "sunny" and not page.has_more
    newest = await c.responses.input_items.list(first.id, limit=2)
    assert [i.type for i in newest.data] == ["function_call_output", "function_call"] and newest.has_more
    rest = await c.responses.input_items.list(first.id, limit=2, after=newest.last_id)
    assert [i.type for i in rest.data] == ["message"] and not rest.has_more
    # Only the response's own input, not the conversation before it.
    second = await c.responses.create(model=MODEL, input="thanks", previous_response_id=first.id)
    (only,) = (await c.responses.input_items.list(second.id)).data
    assert only.content[0].text == "thanks"
    with pytest.raises(openai.NotFoundError):
        await c.responses.input_items.list("resp_missing")
    with pytest.raises(openai.BadRequestError):
        await c.responses.input_items.list(first.id, limit=0)


async def think_then_answer(worker: FakeWorker, req: GenerateRequest) -> None:
    """As a tokenizer worker under a reasoning parser splits the output."""
    rid = req.request_id
    deltas = [
        RequestDelta(
            request_id=rid, reasoning_text="Hmm, ", num_prompt_tokens=5, num_output_tokens=2, num_reasoning_tokens=2
        ),
        RequestDelta(request_id=rid, reasoning_text="easy.", num_output_tokens=4, num_reasoning_tokens=4),
        RequestDelta(request_id=rid, text="Four.", num_output_tokens=6, num_reasoning_tokens=4, finish_reason="stop"),
    ]
    for d in deltas:
        worker.send(d)
        await asyncio.sleep(0.005)


async def test_reasoning_items(gateway: Gateway) -> None:
    gateway.set_script(think_then_answer)
    c = client(gateway)
    resp = await c.responses.create(model=MODEL, input="2+2?")
    assert [i.type for i in resp.output] == ["reasoning", "message"]
    assert resp.output[0].content[0].text == "Hmm, easy." and resp.output_text == "Four."
    assert resp.usage is not None
    assert (resp.usage.output_tokens, resp.usage.output_tokens_details.reasoning_tokens) == (6, 4)
    events = [e async for e in await c.responses.create(model=MODEL, input="2+2?", stream=True)]
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[6].text == "Hmm, easy." and events[2].item.type == "reasoning"
    final = events[-1].response
    assert [i.model_dump(exclude={"id"}) for i in final.output] == [i.model_dump(exclude={"id"}) for i in resp.output]
    assert final.usage is not None and final.usage.output_tokens_details.reasoning_tokens == 4
    # Sent back as input, the reasoning item is accepted and left out of the prompt.
    history = [{"role": "user", "content": "2+2?"}, *(i.model_dump(exclude_none=True) for i in resp.output)]
    await c.responses.create(model=MODEL, input=[*history, {"role": "user", "content": "and 3+3?"}])
    assert [(m.role, m.content) for m in last_request(gateway).messages] == [
        ("user", "2+2?"),
        ("assistant", "Four."),
        ("user", "and 3+3?"),
    ]


async def test_reasoning_tokens_in_chat_usage(gateway: Gateway) -> None:
    """completion_tokens_details.reasoning_tokens, whole and in the streamed usage chunk, summed over n."""
    gateway.set_script(think_then_answer)
    c = client(gateway)
    ask = [{"role": "user", "content": "2+2?"}]
    resp = await c.chat.completions.create(model=MODEL, messages=ask, n=2)
    assert resp.usage is not None and resp.usage.completion_tokens_details is not None
    assert (resp.usage.completion_tokens, resp.usage.completion_tokens_details.reasoning_tokens) == (12, 8)
    chunks = [
        chunk
        async for chunk in await c.chat.completions.create(
            model=MODEL,
            messages=ask,
            stream=True,
            stream_options={"include_usage": True},
        )
    ]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens_details is not None
    assert (usage.completion_tokens, usage.completion_tokens_details.reasoning_tokens) == (6, 4)
    assert all(chunk.usage is None for chunk in chunks[:-1])
    # Without thinking, the count is there and 0, as OpenAI's is.
    gateway.set_script(say_hello)
    plain = await c.chat.completions.create(model=MODEL, messages=ask)
    assert plain.usage is not None and plain.usage.completion_tokens_details is not None
    assert plain.usage.completion_tokens_details.reasoning_tokens == 0


async def json_answer(worker: FakeWorker, req: GenerateRequest) -> None:
    for i, piece in enumerate(['{"city": ', '"Paris"}']):
        last = i == 1
        worker.send(
            RequestDelta(
                request_id=req.request_id,
                text=piece,
                num_prompt_tokens=5,
                num_output_tokens=i + 1,
                finish_reason="stop" if last else None,
            )
        )
        await asyncio.sleep(0.005)


class City(pydantic.BaseModel):
    city: str


async def test_sdk_parse_and_stream_helpers(gateway: Gateway) -> None:
    """The SDK's helpers rebuild responses from the events and parse text.format outputs."""
    gateway.set_script(json_answer)
    c = client(gateway)
    parsed = await c.responses.parse(model=MODEL, input="a city", text_format=City)
    assert parsed.output_parsed == City(city="Paris")
    spec = last_request(gateway).sampling_params.structured_output
    assert spec.kind == "json_schema" and json.loads(spec.spec)["required"] == ["city"]
    async with c.responses.stream(model=MODEL, input="a city", text_format=City) as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text == '{"city": "Paris"}'
    assert final.output_parsed == City(city="Paris")
    gateway.set_script(two_calls)
    async with c.responses.stream(model=MODEL, input="weather?", tools=TOOLS) as stream:
        final = await stream.get_final_response()
    assert [i.type for i in final.output] == ["message", "function_call", "function_call"]
