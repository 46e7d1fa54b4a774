"""Turning RequestDeltas into OpenAI responses: whole bodies and SSE chunks.

Both paths share one accumulator that keeps, per choice, what usage and the final
body need. The streaming encoder builds each chunk as a small dict and encodes it with
msgspec: nothing per token is larger than the chunk itself.
"""

from __future__ import annotations

from typing import Any

import msgspec

from services.gateway.openai_api import ApiError, Job
from shared.protocol import RequestDelta, TextLogprob, ToolCallDelta

DONE = b"data: [DONE]\n\n"
_encode = msgspec.json.encode


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


class ChoiceState:
    __slots__ = (
        "index",
        "texts",
        "finish_reason",
        "stop_reason",
        "prompt_tokens",
        "output_tokens",
        "reasoning_tokens",
        "cached_tokens",
        "prompt_text",
        "text_offset",
        "logprobs",
        "tool_calls",
        "reasoning",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.texts: list[str] = []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.reasoning_tokens = 0
        """Chat under a reasoning parser: how many of output_tokens are the thinking."""
        self.cached_tokens = 0
        self.prompt_text = ""
        self.text_offset = 0
        """Completions logprobs: where the next token starts in the choice's text."""
        self.logprobs: list[TextLogprob] = []
        self.tool_calls: list[dict[str, Any]] = []
        """Chat: the calls parsed out of the output, OpenAI-shaped."""
        self.reasoning: list[str] = []
        """Chat under a reasoning parser: the thinking (reasoning_content)."""


class DeltaAccumulator:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.choices = [ChoiceState(i) for i in range(len(job.children))]
        self._index = {child.request_id: i for i, child in enumerate(job.children)}
        self._unfinished = len(self.choices)

    @property
    def done(self) -> bool:
        return self._unfinished == 0

    def _apply(self, d: RequestDelta) -> ChoiceState:
        c = self.choices[self._index[d.request_id]]
        if d.num_prompt_tokens:
            c.prompt_tokens = d.num_prompt_tokens
            c.cached_tokens = d.num_cached_tokens
        c.output_tokens = d.num_output_tokens or c.output_tokens + len(d.token_ids)
        c.reasoning_tokens = max(c.reasoning_tokens, d.num_reasoning_tokens)
        if d.prompt_text is not None:
            c.prompt_text = d.prompt_text
            c.text_offset = len(d.prompt_text)
        if (d.finish_reason is not None or d.error is not None) and c.finish_reason is None:
            c.finish_reason = d.finish_reason or "abort"
            c.stop_reason = d.stop_reason
            self._unfinished -= 1
        return c

    def usage(self) -> dict[str, Any]:
        # n choices share one prompt: OpenAI counts it once. Its cached count is the one
        # the first child to be scheduled saw (later siblings hit that child's blocks).
        prompt = cached = 0
        n = self.job.n
        for p in range(self.job.num_prompts):
            reported = [c for c in self.choices[p * n : (p + 1) * n] if c.prompt_tokens]
            if reported:
                prompt += reported[0].prompt_tokens
                cached += reported[0].cached_tokens
        completion = sum(c.output_tokens for c in self.choices)
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        if self.job.chat:  # as OpenAI's: the thinking's share of completion_tokens
            usage["completion_tokens_details"] = {"reasoning_tokens": sum(c.reasoning_tokens for c in self.choices)}
        return usage

    def _completion_logprobs(self, c: ChoiceState, lps: list[TextLogprob]) -> dict[str, Any]:
        offsets = []
        for lp in lps:
            offsets.append(c.text_offset)
            c.text_offset += len(lp.token)
        return {
            "tokens": [lp.token for lp in lps],
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{t: v for t, v, _ in lp.top} for lp in lps],
            "text_offset": offsets,
        }


def _chat_logprobs(lps: list[TextLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": lp.bytes,
                "top_logprobs": [{"token": t, "logprob": v, "bytes": b} for t, v, b in lp.top],
            }
            for lp in lps
        ],
        "refusal": None,
    }


class ResponseCollector(DeltaAccumulator):
    """Non-streaming: gathers every delta, then builds the whole body."""

    def add(self, deltas: list[RequestDelta]) -> None:
        for d in deltas:
            if d.error is not None:
                raise ApiError.from_info(d.error)
            c = self._apply(d)
            if d.text:
                c.texts.append(d.text)
            if d.reasoning_text:
                c.reasoning.append(d.reasoning_text)
            if d.logprobs:
                c.logprobs.extend(d.logprobs)
            for call in d.tool_calls or ():
                if call.id is not None:
                    c.tool_calls.append(
                        {
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": call.arguments},
                        }
                    )
                else:
                    c.tool_calls[call.index]["function"]["arguments"] += call.arguments

    def body(self) -> dict[str, Any]:
        job = self.job
        choices = []
        for c in self.choices:
            text = "".join(c.texts)
            if job.chat:
                message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
                if c.reasoning:
                    message["reasoning_content"] = "".join(c.reasoning)
                if c.tool_calls:
                    message["tool_calls"] = c.tool_calls
                    message["content"] = text or None
                choice: dict[str, Any] = {
                    "index": c.index,
                    "message": message,
                    "logprobs": _chat_logprobs(c.logprobs) if job.logprobs is not None else None,
                }
            else:
                choice = {
                    "index": c.index,
                    "text": c.prompt_text + text,
                    "logprobs": self._completion_logprobs(c, c.logprobs) if job.logprobs is not None else None,
                }
            choice["finish_reason"] = c.finish_reason
            choice["stop_reason"] = c.stop_reason
            choices.append(choice)
        return {
            "id": job.request_id,
            "object": "chat.completion" if job.chat else "text_completion",
            "created": job.created,
            "model": job.model,
            "choices": choices,
            "usage": self.usage(),
            "system_fingerprint": None,
        }


class StreamEncoder(DeltaAccumulator):
    """Streaming: each delta becomes an SSE chunk as soon as it arrives."""

    def __init__(self, job: Job) -> None:
        super().__init__(job)
        self.started = False
        self._base: dict[str, Any] = {
            "id": job.request_id,
            "object": "chat.completion.chunk" if job.chat else "text_completion",
            "created": job.created,
            "model": job.model,
        }
        if job.chat:
            self._base["system_fingerprint"] = None
        if job.include_usage:
            self._base["usage"] = None  # OpenAI marks every chunk but the last this way

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        return sse({**self._base, "choices": [choice]})

    def feed(self, deltas: list[RequestDelta]) -> bytes:
        """The SSE bytes for these deltas. An error before the stream started raises ApiError,
        so that the client gets an HTTP error instead of a 200 stream."""
        out = []
        if not self.started:
            for d in deltas:
                if d.error is not None:
                    raise ApiError.from_info(d.error)
            self.started = True
            if self.job.chat:
                out += [
                    self._chunk(
                        {
                            "index": c.index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    )
                    for c in self.choices
                ]
        for d in deltas:
            if d.error is not None:
                # The stream already started: the error travels in-band and ends the stream.
                out.append(sse(ApiError.from_info(d.error).body()))
                self._unfinished = 0
                break
            c = self._apply(d)
            text = d.prompt_text + d.text if d.prompt_text else d.text  # echo: only the first delta has it
            if d.reasoning_text:
                out.append(self._reasoning_chunk(c, d.reasoning_text))
            if text or d.logprobs:
                out.append(self._content_chunk(c, text, d.logprobs))
            if d.tool_calls:
                out += self._tool_call_chunks(c, d.tool_calls)
            if d.finish_reason is not None:
                final: dict[str, Any] = (
                    {"index": c.index, "delta": {}} if self.job.chat else {"index": c.index, "text": ""}
                )
                final.update(logprobs=None, finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                out.append(self._chunk(final))
        return b"".join(out)

    def _tool_call_chunks(self, c: ChoiceState, calls: list[ToolCallDelta]) -> list[bytes]:
        """As OpenAI streams calls, one per chunk: id, type and name first, then argument fragments."""
        chunks = []
        for call in calls:
            if call.id is not None:
                fn = {"name": call.name, "arguments": call.arguments}
                item = {"index": call.index, "id": call.id, "type": "function", "function": fn}
            else:
                item = {"index": call.index, "function": {"arguments": call.arguments}}
            delta = {"index": c.index, "delta": {"tool_calls": [item]}, "logprobs": None, "finish_reason": None}
            chunks.append(self._chunk(delta))
        return chunks

    def _reasoning_chunk(self, c: ChoiceState, text: str) -> bytes:
        return self._chunk(
            {"index": c.index, "delta": {"reasoning_content": text}, "logprobs": None, "finish_reason": None}
        )

    def _content_chunk(self, c: ChoiceState, text: str, lps: list[TextLogprob] | None) -> bytes:
        if self.job.chat:
            return self._chunk(
                {
                    "index": c.index,
                    "delta": {"content": text},
                    "logprobs": _chat_logprobs(lps) if lps else None,
                    "finish_reason": None,
                }
            )
        return self._chunk(
            {
                "index": c.index,
                "text": text,
                "logprobs": self._completion_logprobs(c, lps) if lps else None,
                "finish_reason": None,
            }
        )

    def end(self) -> bytes:
        """The usage chunk when asked for, then [DONE]."""
        if not self.job.include_usage:
            return DONE
        return sse({**self._base, "choices": [], "usage": self.usage()}) + DONE
