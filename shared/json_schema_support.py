"""Which JSON Schema keywords constrained decoding enforces: a fail-closed check.

The grammar engine (xgrammar) compiles most of JSON Schema, but silently ignores a few
keywords: output would then look constrained and not be. Those are refused here with a
400 that names the keyword and where it is, before anything compiles. The list was
found by compiling one violating instance per keyword (tests/engine_core/
test_structured_output.py keeps it honest).
"""

from __future__ import annotations

from typing import Any

# keyword -> why it is refused
_IGNORED = {
    "not": "'not' is not supported",
    "dependentRequired": "'dependentRequired' is not supported",
    "dependencies": "'dependencies' is not supported",
    "$dynamicRef": "'$dynamicRef' is not supported",
    "$recursiveRef": "'$recursiveRef' is not supported",
}
# keywords whose value is a schema, a list of schemas, or a map of name -> schema
_SUBSCHEMA = ("items", "additionalProperties", "contains", "if", "then", "else", "propertyNames")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
MAX_DEPTH = 64


def check_json_schema(schema: Any) -> None:
    """Raise ValueError if schema is not a JSON schema the grammar engine fully enforces."""
    if not isinstance(schema, (dict, bool)):
        raise ValueError("the JSON schema must be an object")
    _check(schema, "#", 0)


def _check(schema: Any, where: str, depth: int) -> None:
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"the JSON schema at {where} must be an object or a boolean")
    if depth > MAX_DEPTH:
        raise ValueError(f"the JSON schema is nested deeper than {MAX_DEPTH} levels")
    for key, why in _IGNORED.items():
        if key in schema:
            raise ValueError(f"unsupported JSON schema keyword at {where}: {why}")
    if schema.get("uniqueItems") is True:
        raise ValueError(f"unsupported JSON schema keyword at {where}: 'uniqueItems' is not supported")
    if "multipleOf" in schema and not (schema.get("type") == "integer" and isinstance(schema["multipleOf"], int)):
        raise ValueError(f"unsupported JSON schema keyword at {where}: 'multipleOf' is supported on integers only")
    ref = schema.get("$ref")
    if ref is not None and (not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/"))):
        raise ValueError(f"unsupported JSON schema $ref at {where}: only local references ('#/...') are supported")
    for key in _SUBSCHEMA:
        if key in schema:
            _check(schema[key], f"{where}/{key}", depth + 1)
    for key in _SUBSCHEMA_LISTS:
        value = schema.get(key)
        if value is not None:
            if not isinstance(value, list):
                raise ValueError(f"the JSON schema's {key} at {where} must be a list")
            for i, sub in enumerate(value):
                _check(sub, f"{where}/{key}/{i}", depth + 1)
    for key in _SUBSCHEMA_MAPS:
        value = schema.get(key)
        if value is not None:
            if not isinstance(value, dict):
                raise ValueError(f"the JSON schema's {key} at {where} must be an object")
            for name, sub in value.items():
                _check(sub, f"{where}/{key}/{name}", depth + 1)
