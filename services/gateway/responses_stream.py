"""A Responses API stream: RequestDeltas as the typed SSE events the SDK parses.

response.created and response.in_progress open it; each output item is announced
(output_item.added), filled (output_text.delta / function_call_arguments.delta) and closed
(..done events, output_item.done) in turn; response.completed (or response.incomplete when
max_output_tokens cut it, response.failed on an engine error) carries the whole Response.
Every event has a sequence_number, counting from 0.
"""

from __future__ import annotations

from typing import Any

import msgspec

from services.gateway.openai_api import ApiError
from services.gateway.responses import DeltaAccumulator
from services.gateway.responses_api import ResponseRequest
from services.gateway.responses_output import (
    function_call_item,
    message_item,
    new_id,
    output_text_part,
    reasoning_item,
    reasoning_text_part,
    response_object,
    responses_usage,
    status_of,
)
from shared.protocol import RequestDelta, ToolCallDelta

_encode = msgspec.json.encode


class ResponseEventStream(DeltaAccumulator):
    def __init__(self, req: ResponseRequest) -> None:
        super().__init__(req.job)
        self.req = req
        self.started = False
        self.final: dict[str, Any] | None = None
        """The finished Response (completed or incomplete), to store."""
        self._seq = 0
        self._output: list[dict[str, Any]] = []
        self._open: int | None = None
        """output index of the item being streamed."""
        self._text: list[str] = []
        self._calls: dict[int, int] = {}
        """tool-call index -> its output index."""

    def _event(self, type_: str, **fields: Any) -> bytes:
        payload = {"type": type_, "sequence_number": self._seq, **fields}
        self._seq += 1
        return b"event: " + type_.encode() + b"\ndata: " + _encode(payload) + b"\n\n"

    def feed(self, deltas: list[RequestDelta]) -> bytes:
        """The events for these deltas. An error before the stream started raises ApiError, so
        that the client gets an HTTP error instead of a 200 stream."""
        out = []
        if not self.started:
            for d in deltas:
                if d.error is not None:
                    raise ApiError.from_info(d.error)
            self.started = True
            snapshot = response_object(self.req, "in_progress", [])
            out += [self._event("response.created", response=snapshot)]
            out += [self._event("response.in_progress", response=snapshot)]
        for d in deltas:
            if d.error is not None:
                # Already streaming: the failure travels in-band and ends the stream.
                error = {"code": "server_error", "message": d.error.message}
                failed = response_object(self.req, "failed", self._output, error=error)
                out.append(self._event("response.failed", response=failed))
                self._unfinished = 0
                return b"".join(out)
            c = self._apply(d)
            if d.reasoning_text:
                out += self._text_delta(d.reasoning_text, "reasoning")
            if d.text:
                out += self._text_delta(d.text)
            for call in d.tool_calls or ():
                out += self._tool_call(call)
            if self.done:
                out += self._finish(c.finish_reason)
        return b"".join(out)

    def end(self) -> bytes:
        return b""  # the terminal response.* event was the last

    def _text_delta(self, text: str, kind: str = "message") -> list[bytes]:
        """Answer text (a message item) or thinking (a reasoning item), opening the item first."""
        out = []
        if self._open is None or self._output[self._open]["type"] != kind:
            out += self._close("completed")
            out += self._open_text_item(kind)
        assert self._open is not None
        self._text.append(text)
        fields: dict[str, Any] = {"logprobs": []} if kind == "message" else {}
        event = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        item_id = self._output[self._open]["id"]
        out.append(self._event(event, item_id=item_id, output_index=self._open, content_index=0, delta=text, **fields))
        return out

    def _open_text_item(self, kind: str) -> list[bytes]:
        if kind == "message":
            item = {"id": new_id("msg_"), "type": kind, "role": "assistant", "status": "in_progress", "content": []}
        else:
            item = reasoning_item(new_id("rs_"), "", "in_progress") | {"content": []}
        self._open = len(self._output)
        self._output.append(item)
        self._text = []
        part = output_text_part("") if kind == "message" else reasoning_text_part("")
        return [
            self._event("response.output_item.added", output_index=self._open, item=item),
            self._part_event("response.content_part.added", part),
        ]

    def _part_event(self, type_: str, part: dict[str, Any]) -> bytes:
        assert self._open is not None
        item_id = self._output[self._open]["id"]
        return self._event(type_, item_id=item_id, output_index=self._open, content_index=0, part=part)

    def _tool_call(self, call: ToolCallDelta) -> list[bytes]:
        out = []
        if call.id is not None:
            out += self._close("completed")
            item = function_call_item(new_id("fc_"), call.id, call.name or "", "", "in_progress")
            self._open = self._calls[call.index] = len(self._output)
            self._output.append(item)
            out.append(self._event("response.output_item.added", output_index=self._open, item=item))
        index = self._calls[call.index]
        item = self._output[index]
        if call.arguments:
            item["arguments"] += call.arguments
            out.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=index,
                    delta=call.arguments,
                )
            )
        return out

    def _close(self, status: str) -> list[bytes]:
        """The done events of the item being streamed, if any."""
        if self._open is None:
            return []
        index, item = self._open, self._output[self._open]
        if item["type"] in ("message", "reasoning"):
            text = "".join(self._text)
            fields: dict[str, Any]
            if item["type"] == "message":
                item.update(message_item(item["id"], text, status))
                done, part, fields = "response.output_text.done", output_text_part(text), {"logprobs": []}
            else:
                item.update(reasoning_item(item["id"], text, status))
                done, part, fields = "response.reasoning_text.done", reasoning_text_part(text), {}
            out = [
                self._event(done, item_id=item["id"], output_index=index, content_index=0, text=text, **fields),
                self._part_event("response.content_part.done", part),
            ]
        else:
            item["status"] = status
            out = [
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            ]
        out.append(self._event("response.output_item.done", output_index=index, item=item))
        self._open = None
        return out

    def _finish(self, finish_reason: str | None) -> list[bytes]:
        status = status_of(finish_reason)
        out = []
        if not any(item["type"] != "reasoning" for item in self._output):  # as a whole response: a message
            out += self._close(status)
            out += self._open_text_item("message")
        out += self._close(status)
        self.final = response_object(self.req, status, self._output, responses_usage(self.usage()))
        kind = "response.completed" if status == "completed" else "response.incomplete"
        out.append(self._event(kind, response=self.final))
        return out
