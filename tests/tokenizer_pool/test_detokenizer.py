from __future__ import annotations

import random

import pytest
import tokenizers
from tokenizers import decoders, models

from services.tokenizer_pool.detokenizer import IncrementalDetokenizer, RequestStream
from services.tokenizer_pool.tokenizer import Tokenizer
from shared.protocol import EngineOutput, ErrorInfo, RequestDelta, SamplingParams, TokenLogprob

SAMPLES = [
    "Hello world",
    "naïve café 😀 déjà vu 🇫🇷🎉",
    "日本語のテキストと中文",
    "a  b\n\n\tc",
    "emoji 👨‍👩‍👧‍👦 family",
    "x = {'k': [1, 2]}",
    "Ω≈ç√∫˜µ≤≥÷",  # noqa: RUF001 - look-alike characters are the point of this case
]


@pytest.fixture(scope="module")
def spiece_tokenizer() -> Tokenizer:
    """A SentencePiece-style tokenizer: byte-fallback tokens and a leading-space strip."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in [
        "\u2581",
        "\u2581hello",
        "\u2581world",
        "h",
        "e",
        "l",
        "o",
        "é",
        "\u2581é",
        "ll",
        "!",
        "\u2581a",
        "b",
        "\u2581\u2581",
    ]:
        vocab[piece] = len(vocab)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(backend, eos_token_ids=[2], max_model_len=4096)


def random_sequence(tok: Tokenizer, rng: random.Random) -> list[int]:
    """Encoded text with multi-byte characters, spliced with random ids, specials and unknown ids."""
    ids: list[int] = []
    while len(ids) < rng.randint(1, 40):
        kind = rng.random()
        if kind < 0.5 and tok.encode("a"):
            ids += tok.encode(rng.choice(SAMPLES))[: rng.randint(1, 12)]
        elif kind < 0.8:
            ids.append(rng.randrange(tok.vocab_size))
        elif kind < 0.9:
            ids.append(rng.choice(sorted(tok.special_ids) or [0]))
        else:
            ids.append(tok.vocab_size + rng.randrange(100))  # random-weight models sample these
    return ids


def run_stream(
    tok: Tokenizer, ids: list[int], params: SamplingParams, rng: random.Random, stop_token: int | None = None
) -> tuple[list[RequestDelta], RequestStream]:
    """Feed ids to a stream in random-sized steps, the last one finishing the request."""
    stream = RequestStream("r", tok, params, num_prompt_tokens=3, engine=0)
    deltas = []
    pos = 0
    while pos < len(ids) and not stream.finished:
        step = ids[pos : pos + rng.randint(1, 3)]
        pos += len(step)
        last = pos >= len(ids)
        out = EngineOutput(
            request_id="r",
            new_token_ids=step,
            finish_reason=("stop" if stop_token is not None else "length") if last else None,
            stop_token_id=stop_token if last else None,
        )
        deltas.append(stream.process(out))
    return deltas, stream


@pytest.mark.parametrize("which", ["smol", "spiece"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_equals_full_decode(
    which: str, skip_special_tokens: bool, smol_tokenizer: Tokenizer, spiece_tokenizer: Tokenizer
) -> None:
    tok = smol_tokenizer if which == "smol" else spiece_tokenizer
    rng = random.Random(1234)
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    for _ in range(300):
        ids = random_sequence(tok, rng)
        expected = tok.decode(ids, skip_special_tokens)
        deltas, stream = run_stream(tok, ids, params, rng)
        text = ""
        for delta in deltas:
            text += delta.text
            # UTF-8 safety: what was shown is never revised later.
            assert expected.startswith(text), (ids, text, expected)
        assert text == expected, ids
        assert stream.finished and deltas[-1].finish_reason == "length"
        assert deltas[-1].num_output_tokens == len(ids)


def test_detokenizer_holds_partial_utf8(smol_tokenizer: Tokenizer, spiece_tokenizer: Tokenizer) -> None:
    emoji = smol_tokenizer.encode("😀")
    assert len(emoji) > 1
    detok = IncrementalDetokenizer(smol_tokenizer)
    assert [detok.add(t) for t in emoji] == [""] * (len(emoji) - 1) + ["😀"]
    # Byte-fallback tokens <0xF0><0x9F><0x98><0x80>, then a piece with a leading space.
    byte_ids = [spiece_tokenizer.backend.token_to_id(f"<0x{b:02X}>") for b in "😀".encode()]
    detok = IncrementalDetokenizer(spiece_tokenizer)
    out = [detok.add(t) for t in [*byte_ids, spiece_tokenizer.backend.token_to_id("▁hello")]]
    # The run of byte tokens is final only once a token with its own text follows.
    assert out == ["", "", "", "", "😀 hello"]
    # A sequence cut short shows its replacement characters only at the end.
    detok = IncrementalDetokenizer(spiece_tokenizer)
    assert [detok.add(t) for t in byte_ids[:2]] == ["", ""]
    assert detok.flush() == spiece_tokenizer.decode(byte_ids[:2]) == "\ufffd\ufffd"


def test_stop_string_across_token_boundaries(smol_tokenizer: Tokenizer) -> None:
    ids = smol_tokenizer.encode("The answer is 42. STOP here please")
    rng = random.Random(0)
    for include in (False, True):
        params = SamplingParams(stop=["42. ST"], include_stop_str_in_output=include)
        deltas, stream = run_stream(smol_tokenizer, ids, params, rng)
        text = "".join(d.text for d in deltas)
        assert text == ("The answer is 42. ST" if include else "The answer is ")
        assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == "42. ST"
        assert stream.finished and stream.abort_in_engine
        # Nothing that might start the stop string was shown before it was decided.
        assert all("4" not in d.text for d in deltas[:-1])


def test_stop_string_property(smol_tokenizer: Tokenizer) -> None:
    rng = random.Random(99)
    for _ in range(200):
        text = "".join(rng.choice(SAMPLES) for _ in range(3))
        ids = smol_tokenizer.encode(text)
        full = smol_tokenizer.decode(ids)
        start = rng.randrange(len(full) - 1)
        stop = full[start : start + rng.randint(1, 6)]
        include = rng.random() < 0.5
        deltas, _ = run_stream(
            smol_tokenizer, ids, SamplingParams(stop=[stop], include_stop_str_in_output=include), rng
        )
        index = full.find(stop)
        assert "".join(d.text for d in deltas) == full[: index + (len(stop) if include else 0)]
        assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == stop


def test_held_back_text_released_when_finished(smol_tokenizer: Tokenizer) -> None:
    ids = smol_tokenizer.encode("count to three: one two thr")
    deltas, _ = run_stream(smol_tokenizer, ids, SamplingParams(stop=["three!"]), random.Random(5))
    assert "".join(d.text for d in deltas) == "count to three: one two thr"
    assert deltas[-1].finish_reason == "length" and deltas[-1].stop_reason is None


def test_multi_token_step_truncated_at_stop_string(smol_tokenizer: Tokenizer) -> None:
    ids = smol_tokenizer.encode("alpha beta gamma delta")
    stream = RequestStream("r", smol_tokenizer, SamplingParams(stop=[" beta"]), num_prompt_tokens=1, engine=0)
    delta = stream.process(
        EngineOutput(request_id="r", new_token_ids=ids, logprobs=[TokenLogprob(t, -1.0, []) for t in ids])
    )
    assert delta.text == "alpha" and delta.finish_reason == "stop"
    # Tokens after the one completing the stop string are not part of the output.
    assert delta.token_ids == ids[:2] and delta.num_output_tokens == 2 and len(delta.logprobs or []) == 2


def test_stop_token_text_is_dropped(smol_tokenizer: Tokenizer) -> None:
    ids = [*smol_tokenizer.encode("Paris."), 2]
    for skip in (True, False):
        deltas, _ = run_stream(
            smol_tokenizer, ids, SamplingParams(skip_special_tokens=skip), random.Random(1), stop_token=2
        )
        assert "".join(d.text for d in deltas) == "Paris."
        assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason is None  # EOS: no stop_reason
        assert deltas[-1].num_output_tokens == len(ids)
        assert [t for d in deltas for t in d.token_ids] == ids
    params = SamplingParams(stop_token_ids=[13])
    deltas, _ = run_stream(smol_tokenizer, [*smol_tokenizer.encode("Hi"), 13], params, random.Random(1), stop_token=13)
    assert "".join(d.text for d in deltas) == "Hi" and deltas[-1].stop_reason == 13


def test_min_tokens_defers_stop_strings(smol_tokenizer: Tokenizer) -> None:
    ids = smol_tokenizer.encode("a b a b a b")
    stream = RequestStream(
        "r", smol_tokenizer, SamplingParams(stop=[" b"], min_tokens=4), num_prompt_tokens=1, engine=0
    )
    # The " b" completed by the 2nd token is ignored; the one completed by the 4th stops.
    text = "".join(stream.process(EngineOutput(request_id="r", new_token_ids=[t])).text for t in ids[:3])
    assert text == "a b a" and not stream.finished
    delta = stream.process(EngineOutput(request_id="r", new_token_ids=[ids[3]]))
    assert delta.finish_reason == "stop" and delta.text == ""


def test_logprobs_and_metadata(smol_tokenizer: Tokenizer) -> None:
    hello, world = smol_tokenizer.encode("Hello world")
    stream = RequestStream(
        "r", smol_tokenizer, SamplingParams(logprobs=1), num_prompt_tokens=7, engine=0, prompt_text="prompt"
    )
    first = stream.process(
        EngineOutput(
            request_id="r",
            new_token_ids=[hello],
            num_cached_tokens=4,
            first_scheduled_time=12.5,
            logprobs=[TokenLogprob(hello, -0.5, [(hello, -0.5), (world, -1.5)])],
        )
    )
    assert first.prompt_text == "prompt" and first.num_prompt_tokens == 7 and first.num_cached_tokens == 4
    assert first.logprobs is not None
    lp = first.logprobs[0]
    assert (lp.token, lp.logprob, bytes(lp.bytes)) == ("Hello", -0.5, b"Hello")
    assert lp.top[1] == (" world", -1.5, list(b" world"))
    second = stream.process(EngineOutput(request_id="r", new_token_ids=[world], finish_reason="length"))
    assert second.prompt_text is None and second.first_scheduled_time == 12.5 and second.num_cached_tokens == 4
    assert second.text == " world" and second.num_output_tokens == 2


def test_engine_error_passes_through(smol_tokenizer: Tokenizer) -> None:
    stream = RequestStream("r", smol_tokenizer, SamplingParams(), num_prompt_tokens=1, engine=0)
    error = ErrorInfo(message="too big", param="prompt", code="context_length_exceeded")
    delta = stream.process(EngineOutput(request_id="r", finish_reason="abort", error=error))
    assert (delta.error, delta.finish_reason) == (error, "abort")
    assert stream.finished and not stream.abort_in_engine


def test_no_logprob_for_a_hidden_stop_token(smol_tokenizer: Tokenizer) -> None:
    # OpenAI's logprobs list the tokens of the text; EOS (whose text is dropped) is not among them.
    ids = smol_tokenizer.encode("Paris.")
    stream = RequestStream("r", smol_tokenizer, SamplingParams(logprobs=0), num_prompt_tokens=1, engine=0)
    delta = stream.process(
        EngineOutput(
            request_id="r",
            new_token_ids=[*ids, 2],
            finish_reason="stop",
            stop_token_id=2,
            logprobs=[TokenLogprob(t, -1.0, []) for t in [*ids, 2]],
        )
    )
    assert delta.text == "Paris." and delta.num_output_tokens == len(ids) + 1
    assert [lp.token for lp in delta.logprobs or []] == [smol_tokenizer.token_text(t) for t in ids]
