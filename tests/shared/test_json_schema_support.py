"""The fail-closed schema check: what it refuses, and the oneOf branches it accepts."""

from __future__ import annotations

from typing import Any

import pytest

from shared.json_schema_support import check_json_schema
from tests.engine_core.schema_corpus import SCHEMAS


def obj(props: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props), **extra}


EXCLUSIVE = [
    [{"type": "string"}, {"type": "integer"}, {"type": "null"}],
    [{"const": "a"}, {"const": "b"}],
    [{"enum": [1, 2]}, {"enum": [3]}],
    # a discriminator, through $refs, as pydantic writes a discriminated union
    {
        "branches": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}],
        "$defs": {
            "Cat": obj({"kind": {"const": "cat"}, "meows": {"type": "boolean"}}),
            "Dog": obj({"kind": {"const": "dog"}, "barks": {"type": "boolean"}}),
        },
    },
    # one forbids what the other requires
    [obj({"radius": {"type": "number"}}, additionalProperties=False), obj({"side": {"type": "number"}})],
]
OVERLAPPING = [
    [{"type": "integer"}, {"type": "number"}],
    [{"type": "string", "maxLength": 3}, {"type": "string", "pattern": "^a"}],
    [obj({"a": {"type": "string"}}), obj({"b": {"type": "string"}})],  # {"a": "", "b": ""} matches both
    [{"enum": [1, "x"]}, {"type": "string"}],
    [{"$ref": "#/$defs/missing"}, {"type": "string"}],
]


def _schema(case: Any) -> dict[str, Any]:
    if isinstance(case, dict):
        return {"oneOf": case["branches"], "$defs": case["$defs"]}
    return {"type": "object", "properties": {"x": {"oneOf": case}}}


@pytest.mark.parametrize("case", EXCLUSIVE)
def test_exclusive_one_of_is_accepted(case: Any) -> None:
    check_json_schema(_schema(case))


@pytest.mark.parametrize("case", OVERLAPPING)
def test_one_of_whose_branches_may_overlap_is_refused(case: Any) -> None:
    # The grammar engine enforces oneOf as anyOf, so an output could match two branches.
    with pytest.raises(ValueError, match="oneOf: branches 0 and 1 may both match"):
        check_json_schema(_schema(case))


def test_the_same_branches_under_any_of_are_accepted() -> None:
    for case in OVERLAPPING[:4]:
        check_json_schema({"anyOf": case})


@pytest.mark.parametrize("keyword", ["not", "dependentRequired", "$dynamicRef"])
def test_ignored_keywords_are_refused(keyword: str) -> None:
    with pytest.raises(ValueError, match="unsupported JSON schema keyword at #/properties/x"):
        check_json_schema({"type": "object", "properties": {"x": {keyword: {}}}})


def test_the_corpus_passes() -> None:
    for schema in SCHEMAS:
        check_json_schema(schema)
