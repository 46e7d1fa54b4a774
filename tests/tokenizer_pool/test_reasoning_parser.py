"""The reasoning parser on recorded-style outputs: whole, split across stream chunks at every
point, without <think>, unterminated; family detection from chat templates."""

from __future__ import annotations

import pytest

from services.tokenizer_pool.detokenizer import RequestStream
from services.tokenizer_pool.reasoning_parser import (
    PromptState,
    ReasoningParser,
    ReasoningParserFamily,
    detect_family,
    prompt_state,
    reasoning_for_prompt,
)
from services.tokenizer_pool.tokenizer import Tokenizer
from shared.protocol import EngineOutput, ReasoningTokens, RequestDelta, SamplingParams

QWEN3_OUT = "<think>\nThe user greets me. I greet back.\n</think>\n\nHello! How can I help?"
R1_OUT = "The user greets me. I greet back.\n</think>\n\nHello! How can I help?"
REASONING = "\nThe user greets me. I greet back.\n"
ANSWER = "Hello! How can I help?"


def run(parser: ReasoningParser, chunks: list[str]) -> tuple[str, str, list[tuple[str, str]]]:
    """Feed the chunks as a stream; the whole reasoning, content, and each step's pieces."""
    steps = [parser.feed(c) for c in chunks]
    steps.append(parser.finish())
    return "".join(r for r, _ in steps), "".join(c for _, c in steps), steps


def splits(text: str) -> list[list[str]]:
    """The text whole, token by token (one char each), and cut in two at every point."""
    return [[text], list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]


@pytest.mark.parametrize(
    ("family", "state", "output", "reasoning", "content"),
    [
        ("qwen3", "free", QWEN3_OUT, REASONING, ANSWER),
        ("deepseek_r1", "free", R1_OUT, REASONING.lstrip("\n"), ANSWER),
        ("deepseek_r1", "free", QWEN3_OUT, REASONING, ANSWER),  # an older R1 template: the model opens it
        ("qwen3", "inside", R1_OUT, REASONING.lstrip("\n"), ANSWER),  # a template that pre-fills <think>
        ("qwen3", "free", ANSWER, "", ANSWER),  # no <think> at all: all content
        ("qwen3", "closed", ANSWER, "", ANSWER),  # enable_thinking false: the template closed it
        ("deepseek_r1", "closed", "\n" + ANSWER, "", ANSWER),
        ("qwen3", "free", "<think>\nstill thinking", "\nstill thinking", ""),  # unterminated: reasoning
        ("deepseek_r1", "free", "still thinking", "still thinking", ""),
        ("qwen3", "free", "<think></think>" + ANSWER, "", ANSWER),
        ("qwen3", "free", "<thin", "", "<thin"),  # cut inside a tag that never completed
        ("qwen3", "free", "<b>bold</b>", "", "<b>bold</b>"),
        ("qwen3", "free", QWEN3_OUT + " 1 < 2 </think>", REASONING, ANSWER + " 1 < 2 </think>"),
        ("deepseek_r1", "free", "a </thin b</think>c", "a </thin b", "c"),
    ],
)
def test_split_whatever_the_chunking(
    family: ReasoningParserFamily, state: PromptState, output: str, reasoning: str, content: str
) -> None:
    for chunks in splits(output):
        got_reasoning, got_content, _ = run(ReasoningParser(family, state), chunks)
        assert (got_reasoning, got_content) == (reasoning, content), chunks


def test_tags_are_never_shown_while_streaming() -> None:
    """A tag split across chunks is held back, not shown and then taken back."""
    _, _, steps = run(ReasoningParser("qwen3"), ["<th", "ink>Hmm", " ok</th", "ink>\n", "\nHi"])
    assert steps == [("", ""), ("Hmm", ""), (" ok", ""), ("", ""), ("", "Hi"), ("", "")]


def test_split_moves_the_thinking_out_of_a_delta(smol_tokenizer: Tokenizer) -> None:
    # The deltas' text comes from the test, not from a stream's tokens (counted below).
    no_tokens = RequestStream("r", smol_tokenizer, SamplingParams(), num_prompt_tokens=1, engine=0)
    parser = ReasoningParser("deepseek_r1")
    first = RequestDelta(request_id="r", text="Let me think</th")
    parser.split(first, no_tokens)
    assert (first.reasoning_text, first.text) == ("Let me think", "")
    last = RequestDelta(request_id="r", text="ink>42", finish_reason="stop")
    parser.split(last, no_tokens)
    assert (last.reasoning_text, last.text) == ("", "42")
    cut = RequestDelta(request_id="r", text="", finish_reason="length")
    parser = ReasoningParser("qwen3")
    parser.feed("<think>abc</thi")
    parser.split(cut, no_tokens)  # the held partial tag is thinking, flushed at the end
    assert (cut.reasoning_text, cut.text) == ("</thi", "")


@pytest.mark.parametrize(
    ("family", "thinking", "answer"),
    [
        ("qwen3", "<think>\nThe user greets me. I greet back.\n</think>", "\n\nHello! How can I help?"),
        ("deepseek_r1", "The user greets me.\n</think>", "\n\nHello!"),
        ("qwen3", "", "Hello! How can I help?"),  # no thinking: none counted
        ("qwen3", "<think>\nStill thinking when max_tokens", ""),  # cut inside: all of it
    ],
)
@pytest.mark.parametrize("per_step", [1, 3, 100])
def test_reasoning_tokens_counted(
    smol_tokenizer: Tokenizer, family: ReasoningParserFamily, thinking: str, answer: str, per_step: int
) -> None:
    """The tokens of the thinking (SmolLM2 spells the tags in several tokens), its tags included
    and the EOS that ends the output not, whatever the engine's steps hold."""
    thinking_ids = smol_tokenizer.encode(thinking, add_special_tokens=False) if thinking else []
    answer_ids = smol_tokenizer.encode(answer, add_special_tokens=False) if answer else []
    eos = smol_tokenizer.eos_token_ids[0]
    ids = thinking_ids + answer_ids + ([eos] if answer else [])
    stream = RequestStream("r", smol_tokenizer, SamplingParams(), num_prompt_tokens=1, engine=0)
    parser = ReasoningParser(family)
    counts, reasoning, content = [], "", ""
    for i in range(0, len(ids), per_step):
        step = ids[i : i + per_step]
        last = i + per_step >= len(ids)
        finish = ("stop" if answer else "length") if last else None
        stop = eos if last and answer else None
        delta = stream.process(
            EngineOutput(request_id="r", new_token_ids=step, finish_reason=finish, stop_token_id=stop)
        )
        parser.split(delta, stream)
        counts.append(delta.num_reasoning_tokens)
        reasoning, content = reasoning + delta.reasoning_text, content + delta.text
    assert counts == sorted(counts) and counts[-1] == len(thinking_ids), counts
    assert content == answer.lstrip("\n")
    # As the text arrives (once `<think>` is known to open it): each token of the thinking counts.
    if per_step == 1 and thinking:
        inside = range(3, len(thinking_ids) - 3)  # past `<think>`, before a possible `</`
        assert [counts[k] for k in inside] == [k + 1 for k in inside], counts


@pytest.mark.parametrize(
    ("prompt", "state"),
    [
        ("<|im_start|>assistant\n", "free"),
        ("<|im_start|>assistant\n<think>\n", "inside"),
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", "closed"),
        ("<think>old</think>answer<|im_start|>assistant\n", "free"),
        ("<think>old</think>answer<|im_start|>assistant\n<think>", "inside"),
    ],
)
def test_prompt_state(prompt: str, state: str) -> None:
    assert prompt_state(prompt) == state


QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
R1_TEMPLATE = (
    "{% for m in messages %}{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<\uff5cAssistant\uff5c><think>\n{% endif %}"
)


def with_template(tokenizer: Tokenizer, template: str | None) -> Tokenizer:
    return Tokenizer(
        tokenizer.backend,
        eos_token_ids=tokenizer.eos_token_ids,
        max_model_len=tokenizer.max_model_len,
        chat_template=template,
        special_tokens=tokenizer.special_tokens,
    )


def test_family_from_the_chat_template(smol_tokenizer: Tokenizer) -> None:
    assert detect_family(smol_tokenizer) is None  # SmolLM2: no thinking
    assert detect_family(with_template(smol_tokenizer, QWEN3_TEMPLATE)) == "qwen3"
    assert detect_family(with_template(smol_tokenizer, R1_TEMPLATE)) == "deepseek_r1"
    assert detect_family(with_template(smol_tokenizer, None)) is None


def test_what_the_engine_is_told(smol_tokenizer: Tokenizer) -> None:
    """The `</think>` tokens always; inside for a pre-filled <think> or R1; nothing once the
    template closed the thinking (enable_thinking false): the grammar applies from the start."""
    tok = with_template(smol_tokenizer, QWEN3_TEMPLATE)
    end = tok.encode("</think>", add_special_tokens=False)
    ask = [{"role": "user", "content": "Hi"}]
    prompt = tok.render_chat(ask)
    parser, engine = reasoning_for_prompt(tok, "qwen3", prompt)
    # SmolLM2 spells <think> in several tokens: the model cannot open it under a grammar
    assert parser is not None and engine == ReasoningTokens(end=end, inside=False, start=None)
    closed = tok.render_chat(ask, template_kwargs={"enable_thinking": False})
    assert closed.endswith("<think>\n\n</think>\n\n")
    parser, engine = reasoning_for_prompt(tok, "qwen3", closed)
    assert parser is not None and engine is None
    assert run(parser, ["<think>x"])[:2] == ("", "<think>x")  # the answer, whatever it says
    _, engine = reasoning_for_prompt(tok, "deepseek_r1", prompt)
    assert engine == ReasoningTokens(end=end)
    assert reasoning_for_prompt(tok, None, prompt) == (None, None)
