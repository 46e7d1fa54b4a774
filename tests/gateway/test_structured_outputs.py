"""response_format, structured_outputs, guided_* and logit_bias: what reaches the workers,
and the 400s for what cannot be served."""

from __future__ import annotations

import json

import pytest

from shared.protocol import GrammarSpec
from tests.gateway.fakes import MODEL, Gateway
from tests.gateway.test_gateway_errors import assert_openai_error

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}

ACCEPTED = [
    ({"response_format": {"type": "json_object"}}, GrammarSpec(kind="json_object")),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
        GrammarSpec(kind="json_schema", spec=json.dumps(SCHEMA, separators=(",", ":"))),
    ),
    ({"response_format": {"type": "text"}}, None),
    ({"structured_outputs": {"regex": "[0-9]+"}}, GrammarSpec(kind="regex", spec="[0-9]+")),
    ({"structured_outputs": {"choice": ["a", "b"]}}, GrammarSpec(kind="choice", spec='["a", "b"]')),
    ({"structured_outputs": {"grammar": 'root ::= "x"'}}, GrammarSpec(kind="grammar", spec='root ::= "x"')),
    (
        {"structured_outputs": {"json": json.dumps(SCHEMA)}},
        GrammarSpec(kind="json_schema", spec=json.dumps(SCHEMA, separators=(",", ":"))),
    ),
    ({"guided_json": SCHEMA}, GrammarSpec(kind="json_schema", spec=json.dumps(SCHEMA, separators=(",", ":")))),
    ({"guided_regex": "a+"}, GrammarSpec(kind="regex", spec="a+")),
    ({"guided_choice": ["x"]}, GrammarSpec(kind="choice", spec='["x"]')),
    ({"guided_grammar": 'root ::= "y"'}, GrammarSpec(kind="grammar", spec='root ::= "y"')),
]


@pytest.mark.parametrize("fields,spec", ACCEPTED)
async def test_constraints_reach_the_workers(gateway: Gateway, fields: dict, spec: GrammarSpec | None) -> None:
    status, body, _ = await gateway.post("/v1/chat/completions", {**CHAT, **fields})
    assert status == 200, body
    assert gateway.generates[-1].sampling_params.structured_output == spec
    status, body, _ = await gateway.post("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 2, **fields})
    assert status == 200, body
    assert all(g.sampling_params.structured_output == spec for g in gateway.generates[-2:])


async def test_logit_bias_reaches_the_workers(gateway: Gateway) -> None:
    status, body, _ = await gateway.post("/v1/chat/completions", {**CHAT, "logit_bias": {"42": 5, "7": -100}})
    assert status == 200, body
    assert gateway.generates[-1].sampling_params.logit_bias == {42: 5.0, 7: -100.0}


REFUSED = [
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "array", "uniqueItems": True}}}},
        "response_format",
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"not": {"type": "string"}}}}},
        "response_format",
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "https://x.org/s.json"}}}},
        "response_format",
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
        "response_format.json_schema.schema",
    ),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": {"type": "object", "properties": {"x": {"type": "number", "multipleOf": 0.5}}}}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": ""}, "guided_regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"response_format": {"type": "json_object"}, "min_tokens": 3}, "min_tokens"),
    (
        {"guided_json": {"type": "string", "maxLength": 1}, "guided_grammar": "x" * 70000},
        "guided_grammar",
    ),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
]


@pytest.mark.parametrize("fields,param", REFUSED)
async def test_refused_with_400(gateway: Gateway, fields: dict, param: str) -> None:
    status, body, _ = await gateway.post("/v1/chat/completions", {**CHAT, **fields})
    assert_openai_error(status, body, 400, param)
    assert gateway.generates == []
