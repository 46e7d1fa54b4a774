"""Structured-output request fields: OpenAI's response_format and vLLM's structured_outputs
(and its older guided_* fields), turned into the one GrammarSpec the engine compiles.

Checks here are the cheap ones (shape, one constraint at most, the fail-closed JSON
Schema keyword check) so most mistakes get a 400 before anything is queued; the engine
compiles and answers a 400 for whatever the grammar engine itself refuses.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import msgspec

from shared.errors import InvalidRequest
from shared.protocol import GrammarSpec


class JsonSchemaFormat(msgspec.Struct, kw_only=True):
    name: str | None = None
    schema: Any = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's `structured_outputs` extra body field (the options it supports here)."""

    json: Any = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class StructuredOutputFields(msgspec.Struct, kw_only=True):
    """Mixed into the completions and chat bodies."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    logit_bias: dict[str, float] | None = None


class StructuredOutputError(InvalidRequest):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message, param=param)


def _schema_text(schema: Any, param: str) -> str:
    if isinstance(schema, str):  # vLLM accepts the schema as a JSON string too
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise StructuredOutputError(f"{param} is not valid JSON: {e}", param) from None
    if not isinstance(schema, (dict, bool)):
        raise StructuredOutputError(f"{param} must be a JSON schema object", param)
    return json.dumps(schema, separators=(",", ":"))


def grammar_spec(body: StructuredOutputFields) -> GrammarSpec | None:
    """The request's output constraint, validated; raise StructuredOutputError naming the field."""
    found: list[tuple[str, GrammarSpec]] = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", GrammarSpec(kind="json_object")))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema is None:
            raise StructuredOutputError(
                "response_format.json_schema.schema is required for type json_schema", "response_format"
            )
        text = _schema_text(rf.json_schema.schema, "response_format.json_schema.schema")
        found.append(("response_format", GrammarSpec(kind="json_schema", spec=text)))
    so = body.structured_outputs
    if so is not None:
        if so.json is not None:
            text = _schema_text(so.json, "structured_outputs.json")
            found.append(("structured_outputs.json", GrammarSpec(kind="json_schema", spec=text)))
        if so.regex is not None:
            found.append(("structured_outputs.regex", GrammarSpec(kind="regex", spec=so.regex)))
        if so.choice is not None:
            found.append(("structured_outputs.choice", GrammarSpec(kind="choice", spec=json.dumps(so.choice))))
        if so.grammar is not None:
            found.append(("structured_outputs.grammar", GrammarSpec(kind="grammar", spec=so.grammar)))
        if so.json_object:
            found.append(("structured_outputs.json_object", GrammarSpec(kind="json_object")))
    if body.guided_json is not None:
        found.append(
            ("guided_json", GrammarSpec(kind="json_schema", spec=_schema_text(body.guided_json, "guided_json")))
        )
    if body.guided_regex is not None:
        found.append(("guided_regex", GrammarSpec(kind="regex", spec=body.guided_regex)))
    if body.guided_choice is not None:
        found.append(("guided_choice", GrammarSpec(kind="choice", spec=json.dumps(body.guided_choice))))
    if body.guided_grammar is not None:
        found.append(("guided_grammar", GrammarSpec(kind="grammar", spec=body.guided_grammar)))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise StructuredOutputError(f"give at most one output constraint; got {names}", found[1][0])
    param, spec = found[0]
    try:
        spec.validate()
    except ValueError as e:
        raise StructuredOutputError(str(e), param) from None
    return spec


def logit_bias(body: StructuredOutputFields) -> dict[int, float] | None:
    """OpenAI sends token ids as JSON object keys (strings)."""
    if not body.logit_bias:
        return None
    out: dict[int, float] = {}
    for key, value in body.logit_bias.items():
        try:
            out[int(key)] = value
        except ValueError:
            raise StructuredOutputError(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
    return out
