"""The Responses API (`POST /v1/responses`): its request body, translated into the chat request
/v1/chat/completions serves (one path to the engine: chat_job). The Response object built from
what came back is responses_output.py; the stream's events, responses_stream.py.

The body is decoded strictly: a field this module does not know is a 400, and so is a known
one this server cannot honour (built-in tools, background mode, reasoning effort, ...), so a
client never gets a response that silently ignored part of its request. `input` items,
`previous_response_id` history and the response's own output all become chat messages: a
follow-up turn is the same chat request a client of /v1/chat/completions would send.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from services.gateway.openai_api import (
    ApiError,
    ChatBody,
    Int,
    Job,
    Message,
    MessageFunctionCall,
    MessageToolCall,
    chat_job,
    decode_body,
)
from services.gateway.responses_output import new_id
from services.gateway.responses_store import ResponseStore
from services.gateway.structured_outputs import JsonSchemaFormat, ResponseFormat
from services.gateway.tools import FunctionDef, NamedFunction, NamedToolChoice, Tool, ToolChoice
from shared.errors import InvalidRequest

ID_PREFIX = "resp_"
INPUT_ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text")
"""Text content parts: a client's input, or an earlier response's output sent back as input."""
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's limits


class TextFormat(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema: Any = None
    strict: bool | None = None
    description: str | None = None


class TextConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    format: TextFormat | None = None
    verbosity: str | None = None


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_obfuscation: bool | None = None
    """Accepted and not acted on: it pads deltas against length side channels, content is unchanged."""


class ResponsesBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`responses.create` parameters. The ones this server does not implement are declared so
    that sending them (with a value other than null or the default) is a 400 naming them."""

    model: str | None = None
    input: Any = None
    """A string, or a list of input items (checked in input_messages)."""
    instructions: str | None = None
    max_output_tokens: Int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: TextConfig | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    """A routing hint at OpenAI; prefix caching here is automatic, so there is nothing to do."""
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    service_tier: str | None = None
    truncation: str | None = None
    # Not implemented: a value other than null (or the default) is a 400.
    background: bool | None = None
    include: list[str] | None = None
    reasoning: Any = None
    top_logprobs: Int | None = None
    max_tool_calls: Int | None = None
    prompt: Any = None
    conversation: Any = None
    context_management: Any = None


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class MessageItem(msgspec.Struct, kw_only=True):
    """An input message, or an earlier output message sent back (its id and status are ignored)."""

    role: str
    content: str | list[ContentPart]


class FunctionCallItem(msgspec.Struct, kw_only=True):
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(msgspec.Struct, kw_only=True):
    call_id: str
    output: str | list[ContentPart]


@dataclass
class ResponseRequest:
    """A validated responses.create: its engine job and what the Response object repeats."""

    job: Job
    conversation: list[Message]
    """The turns so far without the instructions (they do not carry over to a follow-up)."""
    input_items: list[dict[str, Any]]
    """This request's input, as GET /v1/responses/{id}/input_items lists it."""
    echo: dict[str, Any]
    """The request fields a Response object repeats (instructions, tools, text, ...)."""
    store: bool


def _unsupported(param: str, why: str = "is not supported by this server") -> InvalidRequest:
    return InvalidRequest(f"{param} {why}", param=param, code="unsupported_parameter")


def _check_unsupported(body: ResponsesBody) -> None:
    if body.background:
        raise _unsupported("background", "is not supported: responses run in the foreground (stream them instead)")
    if body.include:
        raise _unsupported("include", f"values {body.include} are not supported")
    if body.reasoning is not None and (not isinstance(body.reasoning, dict) or any(body.reasoning.values())):
        raise _unsupported("reasoning", "options (effort, summary) are not supported")
    if body.top_logprobs:
        raise _unsupported("top_logprobs")
    if body.truncation not in (None, "disabled"):
        raise _unsupported("truncation", "must be 'disabled': input is never truncated (too long a prompt is a 400)")
    if body.service_tier not in (None, "auto", "default"):
        raise _unsupported("service_tier", "must be 'auto' or 'default'")
    if body.text is not None and body.text.verbosity is not None:
        raise _unsupported("text.verbosity")
    for name in ("max_tool_calls", "prompt", "conversation", "context_management"):
        if getattr(body, name) is not None:
            raise _unsupported(name)
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")
    if body.metadata is not None:
        if len(body.metadata) > MAX_METADATA_PAIRS:
            raise InvalidRequest(f"metadata holds at most {MAX_METADATA_PAIRS} pairs", param="metadata")
        for key, value in body.metadata.items():
            if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
                raise InvalidRequest(
                    f"metadata keys are at most {MAX_METADATA_KEY} characters, values {MAX_METADATA_VALUE}",
                    param="metadata",
                )


def _convert(item: dict[str, Any], cls: type[msgspec.Struct], param: str) -> Any:
    try:
        return msgspec.convert(item, cls)
    except msgspec.ValidationError as e:
        where = re.search(r"at `\$\.?([^`]*)`", str(e))
        missing = re.search(r"missing required field `([^`]*)`", str(e))
        sub = (where and where.group(1)) or (missing and missing.group(1))
        raise InvalidRequest(f"invalid {param}: {e}", param=f"{param}.{sub}" if sub else param) from None


def _text(content: str | list[ContentPart], param: str) -> str:
    if isinstance(content, str):
        return content
    for part in content:
        if part.type not in TEXT_PARTS or part.text is None:
            raise InvalidRequest(
                f"content part type {part.type!r} is not supported; only text parts (input_text) are",
                param=param,
            )
    return "".join(part.text or "" for part in content)


def input_messages(raw: Any, param: str = "input") -> list[Message]:
    """Input items as chat messages. A function_call joins the assistant turn before it (an
    output message and the calls after it are one turn); its output becomes a tool message."""
    if isinstance(raw, str):
        return [Message(role="user", content=raw)]
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("input must be a string or a non-empty list of input items", param=param)
    out: list[Message] = []
    for i, item in enumerate(raw):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an input item object", param=where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            msg: MessageItem = _convert(item, MessageItem, where)
            if msg.role not in INPUT_ROLES:
                raise InvalidRequest(
                    f"unsupported role {msg.role!r}; use {', '.join(INPUT_ROLES)}", param=f"{where}.role"
                )
            out.append(Message(role=msg.role, content=_text(msg.content, f"{where}.content")))
        elif kind == "function_call":
            fc: FunctionCallItem = _convert(item, FunctionCallItem, where)
            call = MessageToolCall(id=fc.call_id, function=MessageFunctionCall(name=fc.name, arguments=fc.arguments))
            if out and out[-1].role == "assistant":
                out[-1].tool_calls = [*(out[-1].tool_calls or []), call]
            else:
                out.append(Message(role="assistant", content=None, tool_calls=[call]))
        elif kind == "reasoning":
            pass  # earlier thinking is not sent back to the model (as reasoning chat templates drop it)
        elif kind == "function_call_output":
            fo: FunctionCallOutputItem = _convert(item, FunctionCallOutputItem, where)
            out.append(Message(role="tool", content=_text(fo.output, f"{where}.output"), tool_call_id=fo.call_id))
        else:
            raise InvalidRequest(
                f"input item type {kind!r} is not supported; use message, function_call, function_call_output"
                " or reasoning",
                param=f"{where}.type",
            )
    return out


def input_items(raw: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validated input (input_messages passed) as the items GET .../input_items lists: OpenAI's
    item shapes, each with an id (the client's, or a new one)."""
    if isinstance(raw, str):
        raw = [{"role": "user", "content": raw}]
    items = []
    for item in raw:
        kind = item.get("type", "message")
        if kind == "message":
            text_type = "output_text" if item["role"] == "assistant" else "input_text"
            content = item["content"]
            if isinstance(content, str):
                content = [{"type": text_type, "text": content}]
            parts = [{"type": p["type"], "text": p["text"]} for p in content]
            for part in parts:
                if part["type"] == "output_text":
                    part["annotations"] = []
            fields = {"role": item["role"], "content": parts}
            items.append({"id": item.get("id") or new_id("msg_"), "type": "message", "status": "completed", **fields})
        elif kind == "function_call":
            fields = {k: item[k] for k in ("call_id", "name", "arguments")}
            items.append({"id": item.get("id") or new_id("fc_"), "type": kind, "status": "completed", **fields})
        elif kind == "reasoning":
            items.append({**item, "id": item.get("id") or new_id("rs_")})
        else:
            fields = {"call_id": item["call_id"], "output": item["output"]}
            items.append({"id": item.get("id") or new_id("fco_"), "type": kind, "status": "completed", **fields})
    return items


def _chat_tools(tools: list[dict[str, Any]] | None) -> list[Tool] | None:
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise InvalidRequest(
                f"tool type {kind!r} is not supported; only function tools are (no built-in tools)",
                param=f"tools[{i}].type",
                code="unsupported_parameter",
            )
        fields = {k: v for k, v in tool.items() if k != "type"}
        try:
            fn = msgspec.convert(fields, FunctionDef, strict=True)
        except msgspec.ValidationError as e:
            raise InvalidRequest(f"invalid tools[{i}]: {e}", param=f"tools[{i}]") from None
        out.append(Tool(type="function", function=fn))
    return out


def _chat_tool_choice(choice: Any) -> ToolChoice | None:
    if choice is None or choice in ("none", "auto", "required"):
        return choice  # type: ignore[no-any-return]
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return NamedToolChoice(type="function", function=NamedFunction(name=choice["name"]))
    raise InvalidRequest(
        "tool_choice must be none, auto, required or {'type': 'function', 'name': ...}", param="tool_choice"
    )


def _response_format(text: TextConfig | None) -> ResponseFormat | None:
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    if not fmt.name:
        raise InvalidRequest("text.format.name is required for type json_schema", param="text.format.name")
    schema = JsonSchemaFormat(name=fmt.name, schema=fmt.schema, strict=fmt.strict, description=fmt.description)
    return ResponseFormat(type="json_schema", json_schema=schema)


def responses_param(param: str | None) -> str | None:
    """A chat request's parameter name (from chat_job or an engine error) as this API spells it."""
    if param is None:
        return None
    if param.startswith("response_format"):
        return "text.format"
    if param in ("max_tokens", "max_completion_tokens"):
        return "max_output_tokens"
    if param.startswith("messages"):
        return "input"
    tool = re.fullmatch(r"tools\[(\d+)\]\.function\.(.*)", param)
    return f"tools[{tool[1]}].{tool[2]}" if tool else param


def parse_responses(body: bytes, served_model: str, client_id: str | None, store: ResponseStore) -> ResponseRequest:
    req: ResponsesBody = decode_body(body, ResponsesBody)
    _check_unsupported(req)
    history: list[Message] = []
    if req.previous_response_id is not None:
        previous = store.get(req.previous_response_id)
        if previous is None:
            raise ApiError(
                404,
                f"Previous response with id '{req.previous_response_id}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        history = previous.conversation
    conversation = history + input_messages(req.input)
    system = [Message(role="system", content=req.instructions)] if req.instructions else []
    chat = ChatBody(
        model=req.model,
        messages=system + conversation,
        max_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stream=req.stream,
        response_format=_response_format(req.text),
        tools=_chat_tools(req.tools),
        tool_choice=_chat_tool_choice(req.tool_choice),
        parallel_tool_calls=req.parallel_tool_calls,
        user=req.user,
    )
    try:
        job = chat_job(chat, served_model, client_id, ID_PREFIX)
    except InvalidRequest as e:
        param = responses_param(e.param)
        message = e.message.replace(e.param, param, 1) if e.param and param else e.message
        raise InvalidRequest(message, param=param, code=e.code) from None
    text_format = msgspec.to_builtins(req.text.format) if req.text and req.text.format else {"type": "text"}
    echo = {
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {},
        "model": served_model,
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": req.store is not False,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": {"format": {k: v for k, v in text_format.items() if v is not None}},
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
        "tools": req.tools or [],
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "truncation": "disabled",
        "user": req.user,
        "safety_identifier": req.safety_identifier,
        "prompt_cache_key": req.prompt_cache_key,
    }
    return ResponseRequest(
        job=job,
        conversation=conversation,
        input_items=input_items(req.input),
        echo=echo,
        store=req.store is not False,
    )
