"""Structured outputs through the official client against the launched service."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_json_schema_chat_n_logprobs(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format=FORMAT, n=3, temperature=0.9, seed=7, logprobs=True, max_tokens=120
    )
    for choice in resp.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        assert choice.logprobs is not None and choice.logprobs.content


def test_json_schema_streaming_and_stop_string(client: openai.OpenAI) -> None:
    text = ""
    finish = None
    for chunk in client.chat.completions.create(
        model=MODEL, messages=ASK, response_format=FORMAT, stream=True, temperature=0, max_tokens=120
    ):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)
    # a stop string still cuts the constrained output where the client asked
    cut = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format=FORMAT, stop=['"age"'], temperature=0, max_tokens=120
    )
    assert cut.choices[0].finish_reason == "stop" and text.startswith(cut.choices[0].message.content)


def test_completions_extra_body_constraints(client: openai.OpenAI) -> None:
    resp = client.completions.create(
        model=MODEL,
        prompt="My phone number is",
        max_tokens=20,
        temperature=0,
        extra_body={"structured_outputs": {"regex": r" [0-9]{3}-[0-9]{4}"}},
    )
    assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", resp.choices[0].text)
    resp = client.completions.create(
        model=MODEL, prompt="Is the sky blue?", max_tokens=5, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert resp.choices[0].text in ("yes", "no")
    resp = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=100, temperature=0, response_format={"type": "json_object"}
    )
    if resp.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(resp.choices[0].message.content), dict)


def test_bad_schemas_are_400_and_the_service_stays_up(client: openai.OpenAI) -> None:
    bad = [
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}},  # the engine refuses
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}},
    ]
    for fmt in bad:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as exc:
                client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, stream=stream)
            assert exc.value.body["type"] == "invalid_request_error" and exc.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="regex"):
        client.completions.create(model=MODEL, prompt="x", extra_body={"guided_regex": "a(b"})
    ok = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format=FORMAT, max_tokens=120, temperature=0
    )
    jsonschema.validate(json.loads(ok.choices[0].message.content), PERSON)
