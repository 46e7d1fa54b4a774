"""The Response object and its output items (message, reasoning, function_call) in the shapes
the `openai` SDK parses, for whole responses and the stream's events alike."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from services.gateway.responses import ChoiceState

if TYPE_CHECKING:
    from services.gateway.responses_api import ResponseRequest


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def response_object(
    req: ResponseRequest,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": req.job.request_id,
        "object": "response",
        "created_at": req.job.created,
        "status": status,
        "background": False,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "output": output,
        "usage": usage,
        **req.echo,
    }


def status_of(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [output_text_part(text)],
    }


def output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """A reasoning model's thinking, in full (the model's own text, not a summary)."""
    return {"id": item_id, "type": "reasoning", "summary": [], "content": [reasoning_text_part(text)], "status": status}


def reasoning_text_part(text: str) -> dict[str, Any]:
    return {"type": "reasoning_text", "text": text}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def output_items(c: ChoiceState) -> list[dict[str, Any]]:
    """A finished choice as output items: its thinking (under a reasoning parser) as a reasoning
    item, its text as one message (also when empty and there is no call, so a response always
    has output), then one function_call item per tool call."""
    text = "".join(c.texts)
    items = []
    if c.reasoning:
        items.append(reasoning_item(new_id("rs_"), "".join(c.reasoning), status_of(c.finish_reason)))
    if text or not c.tool_calls:
        items.append(message_item(new_id("msg_"), text, status_of(c.finish_reason)))
    for call in c.tool_calls:
        fn = call["function"]
        items.append(function_call_item(new_id("fc_"), call["id"], fn["name"], fn["arguments"], "completed"))
    return items


def responses_usage(chat_usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"]},
        "output_tokens": chat_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": chat_usage["completion_tokens_details"]["reasoning_tokens"]},
        "total_tokens": chat_usage["total_tokens"],
    }
