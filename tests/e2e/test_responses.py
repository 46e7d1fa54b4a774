"""The Responses API through the official client against the launched service (SmolLM2)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
ASK = "What is the capital of France?"
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_plain_and_instructions(client: openai.OpenAI) -> None:
    resp = client.responses.create(model=MODEL, input=ASK, max_output_tokens=24, temperature=0)
    assert resp.id.startswith("resp_") and resp.status in ("completed", "incomplete") and resp.output_text
    assert resp.usage is not None and resp.usage.input_tokens > 5 and resp.usage.output_tokens > 0
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    instructed = client.responses.create(
        model=MODEL, input=ASK, instructions="Answer in French.", max_output_tokens=12, temperature=0
    )
    assert instructed.instructions == "Answer in French." and instructed.output_text
    # The instructions replace the template's default system prompt: a different prompt.
    assert instructed.usage is not None and instructed.usage.input_tokens != resp.usage.input_tokens


def test_stream_equals_non_stream_greedy(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "input": ASK, "max_output_tokens": 32, "temperature": 0}
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(**kwargs, stream=True))
    types = [e.type for e in events]
    terminal = "response.completed" if whole.status == "completed" else "response.incomplete"
    n_deltas = types.count("response.output_text.delta")
    assert n_deltas > 0
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * n_deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        terminal,
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_json_schema_text_format(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    resp = client.responses.create(
        model=MODEL, input="Describe a person as JSON.", text={"format": fmt}, max_output_tokens=80, temperature=0
    )
    assert resp.status == "completed", resp.output_text
    jsonschema.validate(json.loads(resp.output_text), PERSON)
    assert resp.text.format.type == "json_schema"


def test_function_tool_round_trip(client: openai.OpenAI) -> None:
    ask = "What is the weather in Paris?"
    first = client.responses.create(
        model=MODEL, input=ask, tools=TOOLS, tool_choice="required", max_output_tokens=80, temperature=0
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and first.status == "completed"
    for call in calls:
        assert call.name == "get_weather" and call.call_id
        jsonschema.validate(json.loads(call.arguments), WEATHER)
    outputs = [{"type": "function_call_output", "call_id": c.call_id, "output": "sunny, 21 C"} for c in calls]
    # The result, continuing from the stored response...
    second = client.responses.create(
        model=MODEL, input=outputs, previous_response_id=first.id, tools=TOOLS, max_output_tokens=12, temperature=0
    )
    assert second.status in ("completed", "incomplete") and second.output
    # ... or with the whole history sent back as items: the same prompt, so the same answer.
    history = [{"role": "user", "content": ask}, *(i.model_dump(exclude_none=True) for i in first.output), *outputs]
    again = client.responses.create(
        model=MODEL, input=history, tools=TOOLS, max_output_tokens=12, temperature=0, store=False
    )
    assert again.usage.input_tokens == second.usage.input_tokens
    assert [i.model_dump(exclude={"id"}) for i in again.output] == [i.model_dump(exclude={"id"}) for i in second.output]


def test_previous_response_get_delete(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=8, temperature=0)
    follow = client.responses.create(
        model=MODEL, input="What is my name?", previous_response_id=first.id, max_output_tokens=8, temperature=0
    )
    assert follow.previous_response_id == first.id
    assert follow.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert client.responses.retrieve(follow.id).output_text == follow.output_text
    client.responses.delete(follow.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(follow.id)


def test_bad_inputs_and_the_server_keeps_serving(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input=ASK, tools=[{"type": "web_search"}])
    assert e.value.body["param"] == "tools[0].type"
    with pytest.raises(openai.BadRequestError) as e:
        bad = {"type": "json_schema", "name": "x", "schema": {"type": "object", "not": {}}}
        client.responses.create(model=MODEL, input=ASK, text={"format": bad})
    assert e.value.body["param"] == "text.format"
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, input=ASK, previous_response_id="resp_unknown")
    assert e.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input=ASK, background=True)
    resp = client.responses.create(model=MODEL, input=ASK, max_output_tokens=4)
    assert resp.output_text


def test_streamed_named_call_equals_the_whole_one(client: openai.OpenAI) -> None:
    kwargs: dict = {
        "model": MODEL,
        "input": "Weather in Rome, in celsius?",
        "tools": TOOLS,
        "tool_choice": {"type": "function", "name": "get_weather"},
        "max_output_tokens": 60,
        "temperature": 0,
    }
    whole = client.responses.create(**kwargs)
    (call,) = [item for item in whole.output if item.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    events = list(client.responses.create(**kwargs, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert deltas == done.arguments == call.arguments
    (streamed,) = [item for item in events[-1].response.output if item.type == "function_call"]
    assert (streamed.name, streamed.arguments) == ("get_weather", call.arguments)
