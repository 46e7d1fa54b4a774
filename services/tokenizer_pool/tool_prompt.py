"""Tools in the prompt: through the model's own chat template when it renders tools, else
through a documented default (for templates without a tool section, e.g. SmolLM2's).

The default is Hermes' / Qwen2.5's own tool prompt: the tools' JSON signatures in a
system message, calls asked for as `<tool_call>{"name", "arguments"}</tool_call>`, tool
results given back as `<tool_response>` user turns; the `hermes` parser reads the calls.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from typing import Any

DEFAULT_TOOL_PROMPT = (
    "You are a function calling AI model. You may call one or more of these functions to help "
    "with the user query. Their signatures, as JSON Schema, are within <tools></tools>:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a JSON object with the function name and arguments within "
    "<tool_call></tool_call> tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def template_renders_tools(chat_template: str | None) -> bool:
    return chat_template is not None and "tools" in chat_template and "tool_calls" in chat_template


def _arguments_as_object(call: dict[str, Any]) -> dict[str, Any]:
    """Templates (Qwen's, Llama 3's) serialize arguments with tojson: give them the object."""
    fn = dict(call.get("function") or {})
    args = fn.get("arguments")
    if isinstance(args, str):
        with contextlib.suppress(ValueError):  # not JSON: the template gets it as it came
            fn["arguments"] = json.loads(args)
    return {**call, "function": fn}


def messages_for_template(
    messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None, renders_tools: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and tools to hand the chat template."""
    if renders_tools:
        out = []
        for m in messages:
            if m.get("tool_calls"):
                m = {**m, "tool_calls": [_arguments_as_object(c) for c in m["tool_calls"]]}
            out.append(m)
        return out, list(tools) if tools else None
    out = []
    for m in messages:
        if m.get("role") == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        elif m.get("tool_calls"):
            calls = "\n".join(
                "<tool_call>\n"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": _arguments_as_object(c)["function"]["arguments"]}
                )
                + "\n</tool_call>"
                for c in m["tool_calls"]
            )
            out.append({"role": m["role"], "content": (m.get("content") or "") + calls})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        prompt = DEFAULT_TOOL_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None
