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
    _check(schema, "#", 0, schema)


def _resolve(schema: Any, root: Any) -> Any:
    """A local $ref followed (a few hops); anything else as it is."""
    for _ in range(8):
        ref = schema.get("$ref") if isinstance(schema, dict) else None
        if not isinstance(ref, str) or not ref.startswith("#"):
            return schema
        target = root
        for part in ref[2:].split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                return schema
            target = target[part]
        schema = target
    return schema


def _types(schema: dict[str, Any]) -> set[str] | None:
    """The JSON types an instance may have, or None when unknown; integer counts as number."""
    declared = schema.get("type")
    values = [schema["const"]] if "const" in schema else schema.get("enum")
    if isinstance(declared, str):
        declared = [declared]
    if isinstance(declared, list):
        out = {"number" if t == "integer" else t for t in declared if isinstance(t, str)}
    elif isinstance(values, list):
        names = {bool: "boolean", int: "number", float: "number", str: "string", type(None): "null"}
        out = {names.get(type(v), "object" if isinstance(v, dict) else "array") for v in values}
    else:
        return None
    return out


def _disjoint(a: Any, b: Any, root: Any, depth: int = 0) -> bool:
    """True only when no instance can match both schemas (a sufficient check, not a complete one)."""
    a, b = _resolve(a, root), _resolve(b, root)
    if not isinstance(a, dict) or not isinstance(b, dict) or depth > 8:
        return a is False or b is False
    ta, tb = _types(a), _types(b)
    if ta is not None and tb is not None and not ta & tb:
        return True
    va = [a["const"]] if "const" in a else a.get("enum")
    vb = [b["const"]] if "const" in b else b.get("enum")
    if isinstance(va, list) and isinstance(vb, list) and not any(x == y and type(x) is type(y) for x in va for y in vb):
        return True
    pa, pb = a.get("properties") or {}, b.get("properties") or {}
    ra, rb = set(a.get("required") or []), set(b.get("required") or [])
    if any(k in pa and k in pb and _disjoint(pa[k], pb[k], root, depth + 1) for k in ra & rb):
        return True  # a discriminator: a required property whose values cannot agree
    for x, px, y_required in ((a, pa, rb), (b, pb, ra)):
        if x.get("additionalProperties") is False and not x.get("patternProperties") and y_required - set(px):
            return True  # one requires a property the other forbids
    return False


def _check_one_of(branches: list[Any], where: str, root: Any) -> None:
    """The grammar engine enforces oneOf as anyOf: an output may match two branches and so
    fail oneOf. Only branches that no instance can match together are accepted."""
    for i in range(len(branches)):
        for j in range(i + 1, len(branches)):
            if not _disjoint(branches[i], branches[j], root):
                raise ValueError(
                    f"unsupported JSON schema keyword at {where}/oneOf: branches {i} and {j} may both match, and "
                    "constrained decoding enforces 'oneOf' as 'anyOf'; use 'anyOf', or make the branches exclusive "
                    "(different types, a required property with different const/enum values, or "
                    "additionalProperties: false with distinct required properties)"
                )


def _check(schema: Any, where: str, depth: int, root: Any) -> None:
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
            _check(schema[key], f"{where}/{key}", depth + 1, root)
    for key in _SUBSCHEMA_LISTS:
        value = schema.get(key)
        if value is not None:
            if not isinstance(value, list):
                raise ValueError(f"the JSON schema's {key} at {where} must be a list")
            for i, sub in enumerate(value):
                _check(sub, f"{where}/{key}/{i}", depth + 1, root)
            if key == "oneOf":
                _check_one_of(value, where, root)
    for key in _SUBSCHEMA_MAPS:
        value = schema.get(key)
        if value is not None:
            if not isinstance(value, dict):
                raise ValueError(f"the JSON schema's {key} at {where} must be an object")
            for name, sub in value.items():
                _check(sub, f"{where}/{key}/{name}", depth + 1, root)
