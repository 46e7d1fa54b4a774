"""Per-request output state: incremental detokenization, stop strings, logprobs.

Two guarantees the gateway relies on:
- a delta never ends inside a UTF-8 sequence (text ending in U+FFFD is held until the
  next token resolves it, or the request ends);
- the concatenated deltas equal decoding all output tokens at once (minus a stop token,
  and truncated at a stop string).
"""

from __future__ import annotations

import bisect
import logging
from typing import Any

from services.tokenizer_pool.tokenizer import Tokenizer
from shared.protocol import (
    FINISH_ABORT,
    FINISH_STOP,
    EngineOutput,
    RequestDelta,
    SamplingParams,
    TextLogprob,
    TokenLogprob,
)

log = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing token sequence into stable text, decoding only a short window.

    Decoding [prefix_offset:] and [prefix_offset:read_offset] and taking the difference
    keeps the decoder's context (e.g. SentencePiece's leading-space rule) identical to a
    full decode, at a cost independent of the output length.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._byte_fallback_ids = tokenizer.byte_fallback_ids
        self._in_byte_run = False
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._produced: list[str] = []

    def add(self, token_id: int) -> str:
        """Append one token; return the text that became stable (maybe '')."""
        self.token_ids.append(token_id)
        if self._byte_fallback_ids:
            # A run of byte tokens is decoded as a whole (tokens that decode to nothing do not
            # end it), so its text is only final once a token with text of its own follows.
            if token_id in self._byte_fallback_ids:
                self._in_byte_run = True
                return ""
            if self._in_byte_run and self._tokenizer.is_silent(token_id, self._skip_special):
                return ""
            self._in_byte_run = False
        decode = self._tokenizer.decode
        prefix = decode(self.token_ids[self._prefix_offset : self._read_offset], self._skip_special)
        full = decode(self.token_ids[self._prefix_offset :], self._skip_special)
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        new = full[len(prefix) :]
        self._produced.append(new)
        return new

    def flush(self) -> str:
        """At the end: whatever a full decode has beyond what add() returned (held bytes as U+FFFD)."""
        produced = "".join(self._produced)
        full = self._tokenizer.decode(self.token_ids, self._skip_special)
        if not full.startswith(produced):
            # Would mean the window lost decoder context; the stream can no longer be exact.
            log.error("incremental detokenization diverged from a full decode")
        rest = full[len(produced) :]
        self._produced = [full]
        return rest


class RequestStream:
    """One generation request as the tokenizer worker tracks it."""

    def __init__(
        self,
        request_id: str,
        tokenizer: Tokenizer,
        params: SamplingParams,
        *,
        num_prompt_tokens: int,
        engine: int,
        prompt_text: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.engine = engine
        self.finished = False
        self.abort_in_engine = False
        """Finished here (a stop string) while the engine still runs it: it must be aborted there."""
        self._tokenizer = tokenizer
        self._params = params
        self._detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self._stops = list(params.stop)
        self._num_prompt_tokens = num_prompt_tokens
        self._num_output_tokens = 0
        self._num_cached_tokens = 0
        self._first_scheduled_time: float | None = None
        self._prompt_text = prompt_text
        self._pending = ""
        """Stable text held back because it may be the start of a stop string."""
        self._text_ends: list[int] = []
        """Per output token whose text was decoded: the length of the output text once it was."""

    def process(self, out: EngineOutput) -> RequestDelta:
        """Fold one engine output in; the delta carries the text that may now be shown."""
        self._num_cached_tokens = max(self._num_cached_tokens, out.num_cached_tokens)
        if self._first_scheduled_time is None:
            self._first_scheduled_time = out.first_scheduled_time
        if out.error is not None:
            self.finished = True
            return self._delta(finish_reason=FINISH_ABORT, error=out.error)

        text: list[str] = []
        consumed = 0
        shown = 0  # tokens whose text is part of the output: all consumed ones but a hidden stop token
        stop_string: str | None = None
        last = len(out.new_token_ids) - 1
        for i, token_id in enumerate(out.new_token_ids):
            consumed += 1
            self._num_output_tokens += 1
            if i == last and out.stop_token_id is not None and token_id == out.stop_token_id:
                break  # the stop token counts as output but its text is never shown
            shown += 1
            new = self._detok.add(token_id)
            self._text_ends.append(self._text_len + len(new))
            emitted, stop_string = self._append(new)
            text.append(emitted)
            if stop_string is not None:
                break

        finish_reason: str | None = None
        stop_reason: str | int | None = None
        if stop_string is not None:
            finish_reason, stop_reason = FINISH_STOP, stop_string
            self.abort_in_engine = out.finish_reason is None
        elif out.finish_reason is not None:
            rest = self._detok.flush()
            if self._text_ends:  # held bytes: the last token's text
                self._text_ends[-1] += len(rest)
            emitted, stop_string = self._append(rest, final=True)
            text.append(emitted)
            if stop_string is not None:
                finish_reason, stop_reason = FINISH_STOP, stop_string
            else:
                finish_reason = out.finish_reason
                if out.stop_token_id is not None and out.stop_token_id in self._params.stop_token_ids:
                    stop_reason = out.stop_token_id  # EOS reports no stop_reason, as in vLLM
        self.finished = finish_reason is not None

        token_ids = out.new_token_ids[:consumed]
        logprobs = None
        if out.logprobs is not None:
            # As OpenAI's: no logprob entry for a token (EOS, a stop id) whose text is not in the output.
            logprobs = [self._text_logprob(lp) for lp in out.logprobs[:shown]]
        return self._delta(
            text="".join(text),
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
        )

    @property
    def _text_len(self) -> int:
        return self._text_ends[-1] if self._text_ends else 0

    def num_tokens_for(self, chars: int) -> int:
        """How many output tokens it took to produce the first `chars` characters of the
        output text (a token that completes them and starts what follows counts)."""
        if chars <= 0:
            return 0
        return min(bisect.bisect_left(self._text_ends, chars) + 1, len(self._text_ends))

    def _append(self, new: str, final: bool = False) -> tuple[str, str | None]:
        """Add stable text; return (text to emit now, the stop string hit or None)."""
        if not self._stops:
            return new, None
        combined = self._pending + new
        if new and self._num_output_tokens >= self._params.min_tokens:
            hit = self._find_stop(combined, len(self._pending))
            if hit is not None:
                index, stop = hit
                end = index + len(stop) if self._params.include_stop_str_in_output else index
                self._pending = ""
                return combined[:end], stop
        keep = 0 if final else self._held_back(combined)
        self._pending = combined[len(combined) - keep :]
        return combined[: len(combined) - keep], None

    def _find_stop(self, text: str, old_len: int) -> tuple[int, str] | None:
        # Only occurrences that end in the new text: older ones were seen (or came before min_tokens).
        best: tuple[int, str] | None = None
        for stop in self._stops:
            index = text.find(stop, max(0, old_len - len(stop) + 1))
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of text that begins some stop string."""
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _text_logprob(self, lp: TokenLogprob) -> TextLogprob:
        tok = self._tokenizer
        return TextLogprob(
            token=tok.token_text(lp.token_id),
            logprob=lp.logprob,
            bytes=list(tok.token_bytes(lp.token_id)),
            top=[(tok.token_text(t), p, list(tok.token_bytes(t))) for t, p in lp.top],
        )

    def _delta(self, **fields: Any) -> RequestDelta:
        prompt_text, self._prompt_text = self._prompt_text, None  # only the first delta echoes
        return RequestDelta(
            request_id=self.request_id,
            num_prompt_tokens=self._num_prompt_tokens,
            num_output_tokens=self._num_output_tokens,
            num_cached_tokens=self._num_cached_tokens,
            first_scheduled_time=self._first_scheduled_time,
            prompt_text=prompt_text,
            **fields,
        )
