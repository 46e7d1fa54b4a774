"""Tool calls out of a chat completion's text, incrementally, as the text streams in.

Per request, one ToolCallParser turns each text delta into (content, tool-call deltas):
- auto, `hermes` family (Hermes, Qwen2.5/Qwen3, and our default tool prompt):
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` regions become calls, the
  text around them stays content; text that may be the start of a tag is held back.
- auto, `llama3` family: an output that is a JSON object `{"name", "parameters"}` (after an
  optional `<|python_tag|>`, several joined by `;`) is a call; anything else is content.
- required: the grammar forced a JSON array of `{"name", "parameters"}`: parsed at the end.
- named: the grammar forced the arguments of the named function: the call's id and name
  go first, then every text delta is an argument fragment (as OpenAI streams them).
With `parallel_tool_calls: false` (max_calls=1) calls after the first are dropped (required
is held to one call by its grammar already).
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from shared.protocol import ToolCallDelta

ToolParserFamily = Literal["hermes", "llama3"]
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"


def detect_family(chat_template: str | None) -> ToolParserFamily:
    """The parser a chat template's tool format needs (hermes also for templates without tools:
    our default tool prompt asks for Hermes-style calls)."""
    if chat_template and _PYTHON_TAG in chat_template and _OPEN not in chat_template:
        return "llama3"
    return "hermes"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _call_of(obj: Any, args_key: str) -> tuple[str, str] | None:
    """(name, arguments JSON) from a parsed call object, or None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models send the arguments already encoded
        return obj["name"], args
    return obj["name"], json.dumps(args, ensure_ascii=False)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


class ToolCallParser:
    def __init__(
        self,
        mode: Literal["auto", "required", "named"],
        family: ToolParserFamily = "hermes",
        tool_name: str | None = None,
        max_calls: int | None = None,
    ) -> None:
        self.mode = mode
        self.family = family
        self.tool_name = tool_name
        self.max_calls = max_calls
        """None: any number of calls; else later calls are dropped."""
        self.num_calls = 0
        self._buf = ""
        self._in_call = False

    def _call(self, name: str, arguments: str) -> ToolCallDelta:
        delta = ToolCallDelta(index=self.num_calls, id=new_call_id(), name=name, arguments=arguments)
        self.num_calls += 1
        return delta

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        text, calls = self._feed(text)
        return text, self._limit(calls)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """What is left once the output ended."""
        text, calls = self._finish()
        return text, self._limit(calls)

    def _limit(self, calls: list[ToolCallDelta]) -> list[ToolCallDelta]:
        if self.max_calls is None:
            return calls
        return [c for c in calls if c.index < self.max_calls]

    def _feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        if self.mode == "named":
            calls = []
            if self.num_calls == 0:
                calls.append(self._call(self.tool_name or "", ""))
            if text:
                calls.append(ToolCallDelta(index=0, arguments=text))
            return "", calls
        self._buf += text
        if self.mode == "required" or self.family == "llama3":
            return self._feed_whole()
        return self._feed_hermes()

    def _finish(self) -> tuple[str, list[ToolCallDelta]]:
        buf, self._buf = self._buf, ""
        if self.mode == "named":
            return "", []
        if self.mode == "required":
            try:
                items = json.loads(buf)
            except ValueError:
                return buf, []  # cut by max_tokens: the finish reason says so
            calls = [c for item in items if (c := _call_of(item, "parameters")) is not None]
            return "", [self._call(n, a) for n, a in calls]
        if self.family == "llama3":
            return self._finish_llama3(buf)
        if self._in_call:  # EOS before </tool_call>: a complete JSON object is still a call
            call = self._parse_json_call(buf.strip())
            if call is not None:
                return "", [call]
            return _OPEN + buf, []
        return buf, []

    # --- hermes ----------------------------------------------------------------------------

    def _parse_json_call(self, body: str) -> ToolCallDelta | None:
        try:
            call = _call_of(json.loads(body), "arguments")
        except ValueError:
            return None
        return self._call(*call) if call is not None else None

    def _feed_hermes(self) -> tuple[str, list[ToolCallDelta]]:
        content: list[str] = []
        calls: list[ToolCallDelta] = []
        while True:
            if not self._in_call:
                start = self._buf.find(_OPEN)
                if start < 0:
                    keep = _partial_tag_suffix(self._buf, _OPEN)
                    content.append(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    break
                content.append(self._buf[:start])
                self._buf = self._buf[start + len(_OPEN) :]
                self._in_call = True
            end = self._buf.find(_CLOSE)
            if end < 0:
                break
            body, self._buf = self._buf[:end], self._buf[end + len(_CLOSE) :]
            self._in_call = False
            call = self._parse_json_call(body.strip())
            if call is not None:
                calls.append(call)
            else:  # not a call after all: the client sees the text as the model wrote it
                content.append(_OPEN + body + _CLOSE)
        text = "".join(content)
        if calls and not text.strip():
            text = ""
        return text, calls

    # --- llama3 / required -----------------------------------------------------------------

    def _feed_whole(self) -> tuple[str, list[ToolCallDelta]]:
        if self.mode == "required":
            return "", []
        head = self._buf.lstrip()
        maybe_call = not head or head.startswith(("{", _PYTHON_TAG)) or _PYTHON_TAG.startswith(head)
        if maybe_call:
            return "", []  # held until the end decides
        text, self._buf = self._buf, ""
        self.family = "hermes"  # plain content from here on; hermes streams it (and finds no tags)
        return text, []

    def _finish_llama3(self, buf: str) -> tuple[str, list[ToolCallDelta]]:
        body = buf.strip().removeprefix(_PYTHON_TAG).strip()
        calls = []
        parts = [body] if body.startswith("{") and _is_json(body) else body.split(";")
        for part in parts if body else []:
            try:
                call = _call_of(json.loads(part), "parameters")
            except ValueError:
                return buf, []
            if call is None:
                return buf, []
            calls.append(call)
        if not calls:
            return buf, []
        return "", [self._call(n, a) for n, a in calls]
