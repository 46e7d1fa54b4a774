"""50+ JSON schemas for constrained decoding tests: nested objects, arrays with item bounds,
enums, patterns, anyOf, $ref, bounded numbers. Every string and array is bounded so a
small model's output ends within a test's max_tokens (unbounded ones are tested on
their own)."""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "minLength": 1, "maxLength": 12}
SHORT = {"type": "string", "maxLength": 16}
AGE = {"type": "integer", "minimum": 0, "maximum": 120}
SMALL_INT = {"type": "integer", "minimum": -50, "maximum": 50}


def obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
        **extra,
    }


SCHEMAS: list[dict[str, Any]] = [
    # scalars and enums
    obj({"name": NAME}),
    obj({"age": AGE}),
    obj({"ok": {"type": "boolean"}}),
    obj({"nothing": {"type": "null"}}),
    obj({"color": {"enum": ["red", "green", "blue"]}}),
    obj({"size": {"enum": [1, 2, 3, "large"]}}),
    obj({"answer": {"const": "yes"}}),
    obj({"level": {"type": "integer", "enum": [10, 20, 30]}}),
    obj({"name": NAME, "age": AGE, "member": {"type": "boolean"}}),
    obj({"temperature": {"type": "integer", "exclusiveMinimum": -10, "exclusiveMaximum": 40}}),
    # patterns and formats
    obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}),
    obj({"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}),
    obj({"phone": {"type": "string", "pattern": "^\\+?[0-9]{7,10}$"}}),
    obj({"day": {"type": "string", "format": "date"}}),
    obj({"id": {"type": "string", "format": "uuid"}}),
    obj({"ip": {"type": "string", "format": "ipv4"}}),
    obj({"word": {"type": "string", "minLength": 3, "maxLength": 5}}),
    obj({"initials": {"type": "string", "pattern": "^[A-Z]\\.[A-Z]\\.$"}}),
    obj({"version": {"type": "string", "pattern": "^[0-9]\\.[0-9]{1,2}\\.[0-9]$"}}),
    # arrays
    obj({"tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}}),
    obj({"scores": {"type": "array", "items": SMALL_INT, "minItems": 2, "maxItems": 4}}),
    obj({"flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}),
    obj({"pair": {"type": "array", "prefixItems": [NAME, AGE], "items": False}}),
    obj({"matrix": {"type": "array", "items": {"type": "array", "items": SMALL_INT, "maxItems": 2}, "maxItems": 2}}),
    obj({"colors": {"type": "array", "items": {"enum": ["red", "green"]}, "minItems": 1, "maxItems": 2}}),
    obj({"people": {"type": "array", "items": obj({"name": NAME, "age": AGE}), "minItems": 1, "maxItems": 2}}),
    obj({"empty": {"type": "array", "maxItems": 0}}),
    {"type": "array", "items": AGE, "minItems": 1, "maxItems": 3},
    {"type": "array", "items": obj({"k": NAME}), "minItems": 2, "maxItems": 2},
    # nested objects
    obj({"person": obj({"name": NAME, "age": AGE})}),
    obj({"address": obj({"street": SHORT, "city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})}),
    obj({"a": obj({"b": obj({"c": obj({"d": {"type": "integer", "minimum": 0, "maximum": 9}})})})}),
    obj({"book": obj({"title": SHORT, "year": {"type": "integer", "minimum": 1500, "maximum": 2030}}), "stock": AGE}),
    obj({"user": obj({"id": AGE, "roles": {"type": "array", "items": {"enum": ["admin", "dev"]}, "maxItems": 2}})}),
    obj({"name": NAME, "nick": NAME}, required=["name"]),
    obj({"x": SMALL_INT, "y": SMALL_INT, "z": SMALL_INT}, required=["x", "y"]),
    obj({"meta": obj({}, required=[])}),
    # anyOf, oneOf, nullable, type lists
    obj({"value": {"anyOf": [SMALL_INT, {"type": "boolean"}]}}),
    obj({"value": {"anyOf": [NAME, {"type": "null"}]}}),
    obj({"id": {"type": ["integer", "null"], "minimum": 0, "maximum": 999}}),
    obj({"shape": {"oneOf": [obj({"radius": AGE}), obj({"side": SMALL_INT, "kind": {"const": "square"}})]}}),
    {"anyOf": [obj({"cat": NAME}), obj({"dog": NAME})]},
    obj({"result": {"anyOf": [obj({"ok": {"const": True}}), obj({"error": SHORT})]}}),
    # $ref and $defs
    {"$defs": {"person": obj({"name": NAME, "age": AGE})}, **obj({"who": {"$ref": "#/$defs/person"}})},
    {
        "$defs": {"point": obj({"x": SMALL_INT, "y": SMALL_INT})},
        **obj({"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}}),
    },
    {
        "definitions": {"tag": NAME},
        **obj({"tags": {"type": "array", "items": {"$ref": "#/definitions/tag"}, "maxItems": 2}}),
    },
    {
        "$defs": {
            "node": obj({"v": SMALL_INT, "kids": {"type": "array", "items": {"$ref": "#/$defs/leaf"}, "maxItems": 2}}),
            "leaf": obj({"v": SMALL_INT}),
        },
        "$ref": "#/$defs/node",
    },
    # bounded numbers
    obj({"ratio": {"type": "number", "minimum": 0, "maximum": 1}}),
    obj({"even": {"type": "integer", "multipleOf": 2, "minimum": 0, "maximum": 20}}),
    obj({"count": {"type": "integer", "minimum": 5, "maximum": 5}}),
    obj({"price": {"type": "number", "minimum": 1, "maximum": 100}, "currency": {"enum": ["EUR", "USD"]}}),
    # mixed, realistic
    obj(
        {
            "name": NAME,
            "age": AGE,
            "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"},
            "tags": {"type": "array", "items": NAME, "maxItems": 2},
        }
    ),
    obj(
        {
            "city": NAME,
            "forecast": {
                "type": "array",
                "items": obj({"day": {"enum": ["mon", "tue", "wed"]}, "high": SMALL_INT}),
                "minItems": 1,
                "maxItems": 2,
            },
        }
    ),
    obj({"title": SHORT, "done": {"type": "boolean"}, "priority": {"enum": ["low", "high"]}}),
    obj({"sql": {"type": "string", "pattern": "^SELECT [a-z]{1,8} FROM [a-z]{1,8};$"}}),
]
