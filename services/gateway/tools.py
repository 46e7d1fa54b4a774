"""Chat `tools`, `tool_choice` and `parallel_tool_calls`: validated here, rendered by the
tokenizer worker's chat template, parsed out of the output there.

`required` and a named function are enforced by constrained decoding, as vLLM does: the
output must be a JSON array of `{"name", "parameters"}` calls (one at most without
parallel_tool_calls) / the named function's arguments, so even a small model returns a
call whose arguments validate against the function's schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import msgspec

from shared.json_schema_support import check_json_schema
from shared.protocol import GrammarSpec


class FunctionDef(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(msgspec.Struct, kw_only=True):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ToolFields(Protocol):
    """The chat body's tool fields (declared on ChatBody: msgspec Structs have one base)."""

    tools: list[Tool] | None
    tool_choice: ToolChoice | None
    parallel_tool_calls: bool | None
    functions: Any
    function_call: Any


class ToolError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ToolPlan:
    tools: list[dict[str, Any]] | None
    """As the chat template gets them."""
    choice: Literal["none", "auto", "required", "named"]
    name: str | None
    grammar: GrammarSpec | None


_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def plan_tools(body: ToolFields) -> ToolPlan:
    if body.functions is not None or body.function_call is not None:
        raise ToolError("functions and function_call are deprecated: use tools and tool_choice", "functions")
    tools = body.tools or []
    names: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.function
        if not fn.name or not all(c.isalnum() or c in "_-" for c in fn.name) or len(fn.name) > 64:
            raise ToolError(
                "function names must be 1-64 letters, digits, underscores or dashes", f"tools[{i}].function.name"
            )
        if fn.name in names:
            raise ToolError(f"two tools are named {fn.name!r}", f"tools[{i}].function.name")
        params = fn.parameters if fn.parameters is not None else _EMPTY_PARAMETERS
        try:
            check_json_schema(params)
        except ValueError as e:
            raise ToolError(f"tool {fn.name!r}: {e}", f"tools[{i}].function.parameters") from None
        names[fn.name] = params
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if not tools:
        if choice != "none":
            raise ToolError("tool_choice needs tools", "tool_choice")
        return ToolPlan(None, "none", None, None)
    as_dicts = [msgspec.to_builtins(t) for t in tools]
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in names:
            raise ToolError(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
        spec = GrammarSpec(kind="json_schema", spec=json.dumps(names[name]))
        return ToolPlan(as_dicts, "named", name, spec)
    if choice == "required":
        return ToolPlan(as_dicts, "required", None, _required_grammar(names, body.parallel_tool_calls is not False))
    return ToolPlan(as_dicts, choice, None, None)


def _required_grammar(tools: dict[str, dict[str, Any]], parallel: bool) -> GrammarSpec:
    """A JSON array of calls to the given tools; their $defs are hoisted to the root, where
    their `#/$defs/...` references then resolve."""
    defs: dict[str, dict[str, Any]] = {"$defs": {}, "definitions": {}}
    variants = []
    for name, params in tools.items():
        params = dict(params)
        for key, hoisted in defs.items():
            if key in params:
                hoisted.update(params.pop(key))
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "parameters": params},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": variants}}
    if not parallel:
        schema["maxItems"] = 1
    schema.update({key: d for key, d in defs.items() if d})
    return GrammarSpec(kind="json_schema", spec=json.dumps(schema))
