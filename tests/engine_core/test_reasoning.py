"""Constraints on the answer only: a random-weight Qwen3 that thinks (forced with logit_bias),
under a JSON schema, through the offline API (same tokenizer-pool parser, same engine); the
engine's end of the thinking whatever tokens spell `</think>`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from novainfer.llm import LLM
from services.engine_core.structured_output import StructuredOutputManager
from services.tokenizer_pool.tokenizer import Tokenizer, load_tokenizer
from shared.config import EngineConfig
from shared.protocol import GrammarSpec, ReasoningTokens, SamplingParams
from tests.engine_core import thinking_model
from tests.engine_core.thinking_model import END_THINK, THINK

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Yes or no?"}]


def llm_for(tmp: Path, template: str, parser: str = "auto") -> LLM:
    model, tokenizer = thinking_model.build(tmp, template)
    config = EngineConfig(kv_cache_bytes=64 << 20, max_num_seqs=8, cache_dir=str(tmp / "cache"))
    return LLM(model, config=config, tokenizer=tokenizer, reasoning_parser=parser)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    return llm_for(tmp_path_factory.mktemp("qwen3"), thinking_model.QWEN3_TEMPLATE)


def params(llm: LLM, seed: int, schema: bool = True, **bias: float) -> SamplingParams:
    """A filler token (+100) always beats </think> (+97), so the thinking lasts a few tokens."""
    filler = llm.tokenizer.encode("Hmm", add_special_tokens=False)[0]
    logit_bias = {filler: 100.0, END_THINK: 97.0, **{int(k): v for k, v in bias.items()}}
    spec = GrammarSpec(kind="json_schema", spec=json.dumps(SCHEMA)) if schema else None
    return SamplingParams(max_tokens=300, temperature=1.0, seed=seed, logit_bias=logit_bias, structured_output=spec)


def test_qwen3_opens_its_thinking_and_the_schema_applies_after_it(qwen3: LLM) -> None:
    """<think> is allowed beside the grammar's first tokens; inside the thinking nothing is
    constrained (the filler, masked by the schema, is written); after </think> the schema holds."""
    assert qwen3.reasoning_family == "qwen3"
    outs = qwen3.chat([ASK] * 4, [params(qwen3, seed, **{str(THINK): 99.0}) for seed in range(4)], use_tqdm=False)
    for out in outs:
        c = out.outputs[0]
        assert c.finish_reason == "stop", c
        assert c.token_ids[0] == THINK and END_THINK in c.token_ids
        assert c.reasoning_content and set(c.reasoning_content.replace("<think>", "")) <= set("Hmm"), c
        assert c.num_reasoning_tokens == c.token_ids.index(END_THINK) + 1  # <think> ... </think>
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_without_a_reasoning_parser_the_schema_applies_from_the_first_token(tmp_path: Path) -> None:
    llm = llm_for(tmp_path, thinking_model.QWEN3_TEMPLATE, parser="none")
    out = llm.chat(ASK, params(llm, 0, **{str(THINK): 100.0}), use_tqdm=False)[0].outputs[0]
    assert out.reasoning_content is None and THINK not in out.token_ids and END_THINK not in out.token_ids
    jsonschema.validate(json.loads(out.text), SCHEMA)


def test_deepseek_r1_starts_inside_the_thinking(tmp_path: Path) -> None:
    """The template opens <think>: the output is thinking up to </think>, which EOS cannot cut
    short under a grammar; unconstrained, the split is the same."""
    llm = llm_for(tmp_path, thinking_model.R1_TEMPLATE)
    assert llm.reasoning_family == "deepseek_r1"
    eos = llm.tokenizer.eos_token_ids[0]
    constrained, free = llm.chat(
        [ASK, ASK], [params(llm, 1, **{str(eos): 98.0}), params(llm, 2, schema=False)], use_tqdm=False
    )
    c = constrained.outputs[0]
    assert c.finish_reason == "stop" and eos not in c.token_ids[: c.token_ids.index(END_THINK)]
    assert c.reasoning_content and set(c.reasoning_content) <= set("Hmm")
    jsonschema.validate(json.loads(c.text), SCHEMA)
    f = free.outputs[0]
    assert f.finish_reason == "length" and f.reasoning_content and set(f.reasoning_content) <= set("Hmm")
    assert f.text and set(f.text.replace("</think>", "")) <= set("Hmm")


@pytest.fixture(scope="module")
def answer_grammar() -> Iterator[tuple[StructuredOutputManager, Any, Tokenizer]]:
    """The schema compiled for the bundled vocabulary, where `</think>` is three tokens."""
    tok = load_tokenizer(EngineConfig())
    manager = StructuredOutputManager(EngineConfig(), tok.backend.get_vocab_size())
    manager.set_vocab(tok.backend.to_str(), tok.eos_token_ids)
    job = manager.submit(GrammarSpec(kind="json_schema", spec=json.dumps(SCHEMA)))
    deadline = time.monotonic() + 60
    while (compiled := manager.poll(job)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield manager, compiled, tok
    manager.shutdown()


def spellings(tok: Tokenizer, *pieces: str) -> list[int]:
    """The pieces' tokens, each encoded alone (so not the standard encoding of their concatenation)."""
    return [t for p in pieces for t in tok.encode(p, add_special_tokens=False)]


@pytest.mark.parametrize(
    ("thinking", "ends"),
    [
        (["Hmm", "</think>"], True),  # the standard encoding: `</` `think` `>`
        (["Hmm", *"</think>"], True),  # one character at a time
        (["Hmm </", "think", ">"], True),  # glued to the text before it
        (["Hmm", "</thin", "k>"], True),
        (["Hmm", "</thin", "ks>"], False),
        (["Hmm", "</", "think"], False),
    ],
)
def test_end_of_thinking_in_any_tokenization(
    answer_grammar: tuple[StructuredOutputManager, Any, Tokenizer], thinking: list[str], ends: bool
) -> None:
    """The engine finds `</think>` in the tokens' bytes: the grammar applies after it however it
    is spelled, and a lookahead across it (speculative drafts) is undone."""
    manager, compiled, tok = answer_grammar
    end = tok.encode("</think>", add_special_tokens=False)
    assert len(end) > 1
    ids = spellings(tok, *thinking)
    answer = tok.encode('{"answer": "yes"}', add_special_tokens=False)
    g = manager.matcher(compiled, tok.eos_token_ids, ReasoningTokens(end=end))
    filler = spellings(tok, "Hmm")[0]
    # The answer is constrained (the filler is no JSON); the thinking is not.
    assert g.validate([*ids, filler]) == len(ids) + (0 if ends else 1)
    assert g.validate([*ids, *answer]) == len(ids) + len(answer)
    assert g.phase == "reasoning"  # the lookaheads were undone
    for t in ids:
        assert g.accept(t)
    assert g.phase == ("answer" if ends else "reasoning")
    if ends:
        assert not g.accept(filler)
        assert all(g.accept(t) for t in answer) and g.accept(tok.eos_token_ids[0]) and g.is_terminated()
