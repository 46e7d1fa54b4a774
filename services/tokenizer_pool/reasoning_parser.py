"""Reasoning content: a reasoning model's `<think>...</think>` split off its answer.

Per chat request under a reasoning parser, one ReasoningParser turns each text delta into
(reasoning, content), as vLLM's `deepseek_r1` and `qwen3` parsers do:
- `qwen3`: the model opens its thinking itself: an output that starts with `<think>` is
  reasoning up to `</think>`; one that does not is all content.
- `deepseek_r1`: the output starts inside the thinking (its template pre-fills `<think>`; a
  leading `<think>` the model writes anyway is dropped): reasoning up to `</think>`.
Either way a prompt that already ends inside `<think>` starts the output in reasoning, and
one that ends with a closed `<think>...</think>` (Qwen3's `enable_thinking: false`) starts
it in the answer. An output cut before `</think>` is all reasoning (its finish_reason says
why), streamed or not. Text that may be the start of a tag is held back until it is not, so
a tag split across stream chunks is never shown; whitespace between `</think>` and the
answer is dropped.

The parser also knows how much of the output text is thinking (`reasoning_chars`, its tags
included), which the request's stream turns into a count of tokens: the usage's
`reasoning_tokens`.

The same decision, in token ids, goes to the engine (`ReasoningTokens`): it applies the
request's grammar to the answer only.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

from services.tokenizer_pool.tokenizer import Tokenizer
from shared.errors import InvalidRequest
from shared.protocol import ReasoningTokens, RequestDelta

if TYPE_CHECKING:
    from services.tokenizer_pool.detokenizer import RequestStream

log = logging.getLogger(__name__)

ReasoningParserFamily = Literal["deepseek_r1", "qwen3"]
THINK_START, THINK_END = "<think>", "</think>"
PromptState = Literal["inside", "closed", "free"]
_PROBE = [{"role": "user", "content": "Hi"}]


def prompt_state(prompt: str) -> PromptState:
    """Where the rendered prompt leaves the output: inside an opened `<think>`, after a closed
    thinking block, or free (the model decides)."""
    start, end = prompt.rfind(THINK_START), prompt.rfind(THINK_END)
    if start > end and not prompt[start + len(THINK_START) :].strip():
        return "inside"
    if end > start and not prompt[end + len(THINK_END) :].strip():
        return "closed"
    return "free"


def detect_family(tokenizer: Tokenizer) -> ReasoningParserFamily | None:
    """The parser a chat template needs: none without think tags; deepseek_r1 when its
    generation prompt opens `<think>` (DeepSeek-R1 distills, Qwen3 thinking-2507); else qwen3."""
    template = tokenizer.chat_template
    if not template or (THINK_START not in template and THINK_END not in template):
        return None
    try:
        probe = tokenizer.render_chat(_PROBE, add_generation_prompt=True)
    except InvalidRequest:
        return "qwen3"
    return "deepseek_r1" if prompt_state(probe) == "inside" else "qwen3"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningParser:
    """One request's output split into reasoning and content, incrementally."""

    def __init__(self, family: ReasoningParserFamily, state: PromptState = "free") -> None:
        self.family = family
        self._phase: Literal["start", "reasoning", "answer_start", "content"]
        if state == "closed":
            self._phase = "answer_start"
        elif state == "inside" or family == "deepseek_r1":
            self._phase = "reasoning"
        else:
            self._phase = "start"
        self._at_reasoning_start = True
        """No reasoning text yet: a `<think>` here is the model opening it (dropped)."""
        self._buf = ""
        self._fed = 0
        """Characters of output text fed so far."""
        self.reasoning_chars = 0
        """How many leading characters of the output text are thinking (its tags included):
        all fed so far while it thinks, fixed once `</think>` is seen."""

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that may be shown now."""
        self._buf += text
        self._fed += len(text)
        reasoning: list[str] = []
        content: list[str] = []
        while self._buf:
            buf = self._buf
            if self._phase == "start":  # qwen3: thinking only if the output opens with <think>
                head = buf.lstrip()
                if head.startswith(THINK_START):
                    self._buf = head[len(THINK_START) :]
                    self._phase = "reasoning"
                    continue
                if not head or THINK_START.startswith(head):
                    break  # may still become <think>
                self._phase = "content"
                continue
            if self._phase == "reasoning":
                if self._at_reasoning_start:
                    head = buf.lstrip()
                    if not head or (THINK_START.startswith(head) and head != THINK_START):
                        break
                    if head.startswith(THINK_START):
                        buf = self._buf = head[len(THINK_START) :]
                    self._at_reasoning_start = False
                end = buf.find(THINK_END)
                if end < 0:
                    keep = _partial_suffix(buf, THINK_END)
                    reasoning.append(buf[: len(buf) - keep])
                    self._buf = buf[len(buf) - keep :]
                    break
                reasoning.append(buf[:end])
                self._buf = buf[end + len(THINK_END) :]
                self._phase = "answer_start"
                self.reasoning_chars = self._fed - len(self._buf)
                continue
            if self._phase == "answer_start":  # the whitespace between </think> and the answer
                head = buf.lstrip()
                self._buf = head
                if not head:
                    break
                self._phase = "content"
                continue
            content.append(buf)
            self._buf = ""
        if self._phase == "reasoning":
            self.reasoning_chars = self._fed
        return "".join(reasoning), "".join(content)

    def split(self, delta: RequestDelta, stream: RequestStream) -> None:
        """Move the thinking in delta's text into delta.reasoning_text (so that tool calls are
        parsed out of the answer only); a finished delta takes what was held back. Sets
        delta.num_reasoning_tokens from the stream the delta came from."""
        reasoning, content = self.feed(delta.text)
        if delta.finish_reason is not None:
            more_reasoning, more_content = self.finish()
            reasoning, content = reasoning + more_reasoning, content + more_content
        delta.text, delta.reasoning_text = content, reasoning
        delta.num_reasoning_tokens = stream.num_tokens_for(self.reasoning_chars)

    def finish(self) -> tuple[str, str]:
        """What is held back, once the output ended."""
        buf, self._buf = self._buf, ""
        if self._phase == "reasoning":
            if self._at_reasoning_start and buf.strip() == THINK_START:
                return "", ""
            return buf, ""
        if self._phase == "answer_start":
            return "", ""
        return "", buf


def reasoning_for_prompt(
    tokenizer: Tokenizer, family: ReasoningParserFamily | None, prompt: str
) -> tuple[ReasoningParser | None, ReasoningTokens | None]:
    """A chat request's parser and what the engine must know of its thinking (None when its
    grammar applies from the first token)."""
    if family is None:
        return None, None
    state = prompt_state(prompt)
    parser = ReasoningParser(family, state)
    if state == "closed":
        return parser, None
    end = tokenizer.encode(THINK_END, add_special_tokens=False)
    if not end:
        return parser, None
    if state == "inside" or family == "deepseek_r1":
        return parser, ReasoningTokens(end=end)
    start = tokenizer.encode(THINK_START, add_special_tokens=False)
    # Only a single <think> token can be offered beside the grammar's first tokens.
    return parser, ReasoningTokens(end=end, inside=False, start=start[0] if len(start) == 1 else None)
