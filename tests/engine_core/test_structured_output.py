"""Constrained decoding in the engine: the schema corpus with the bundled model, regex and
choice, logit_bias, preemption, compile errors and the compile timeout."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import msgspec
import pytest

from novainfer.llm import LLM
from services.engine_core.engine import LLMEngine
from services.engine_core.structured_output import GrammarError, StructuredOutputManager, choice_grammar
from services.tokenizer_pool.tokenizer import load_tokenizer
from shared.config import EngineConfig
from shared.protocol import GrammarSpec, SamplingParams
from tests.engine_core.schema_corpus import SCHEMAS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(config=EngineConfig(kv_cache_bytes=256 << 20, max_num_seqs=64))


def constrained(kind: str, spec: str = "", **kw: object) -> SamplingParams:
    params = SamplingParams(max_tokens=200, temperature=0.0, structured_output=GrammarSpec(kind=kind, spec=spec))
    return msgspec.structs.replace(params, **kw)


def test_schema_corpus_outputs_validate(llm: LLM) -> None:
    """Every schema of the corpus, batched: each output parses and validates."""
    prompts = [[{"role": "user", "content": f"Reply with JSON matching this schema: {json.dumps(s)}"}] for s in SCHEMAS]
    outs = llm.chat(prompts, [constrained("json_schema", json.dumps(s)) for s in SCHEMAS], use_tqdm=False)
    for schema, out in zip(SCHEMAS, outs, strict=True):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (schema, c.text)
        jsonschema.validate(json.loads(c.text), schema)


def test_json_object_regex_choice_and_sampling(llm: LLM) -> None:
    ask = [{"role": "user", "content": "Tell me about a cat."}]
    params = [
        constrained("json_object", max_tokens=300, temperature=0.8, seed=3, top_p=0.9),
        constrained("regex", r"[A-Z][a-z]{2,8} (is|was) [0-9]{1,3}", temperature=1.0, seed=1),
        constrained("choice", json.dumps(["yes", "no", "maybe so"]), temperature=1.0, seed=2, n=4),
        constrained("grammar", 'root ::= "cat" | "dog" (" " [0-9])?'),
    ]
    json_out, regex_out, choice_out, grammar_out = llm.chat([ask] * 4, params, use_tqdm=False)
    if json_out.outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(json_out.outputs[0].text), dict)
    assert re.fullmatch(r"[A-Z][a-z]{2,8} (is|was) [0-9]{1,3}", regex_out.outputs[0].text)
    assert all(c.text in ("yes", "no", "maybe so") and c.finish_reason == "stop" for c in choice_out.outputs)
    assert re.fullmatch(r"(cat|dog)( [0-9])?", grammar_out.outputs[0].text)


def test_max_tokens_cut_reports_length(llm: LLM) -> None:
    schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    out = llm.chat(
        [{"role": "user", "content": "Tell a long story."}],
        constrained("json_schema", json.dumps(schema), max_tokens=8, logprobs=2),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 8
    assert out.text.startswith('{"story": "')
    assert out.logprobs is not None and len(out.logprobs) == 8


def test_logit_bias_forces_and_bans(llm: LLM) -> None:
    tok = llm.tokenizer
    target = tok.encode(" banana", add_special_tokens=False)[0]
    ask = [{"role": "user", "content": "Say hello."}]
    forced, free = llm.chat(
        [ask] * 2,
        [
            SamplingParams(max_tokens=3, temperature=0.0, logit_bias={target: 100.0}),
            SamplingParams(max_tokens=3, temperature=0.0),
        ],
        use_tqdm=False,
    )
    assert forced.outputs[0].token_ids == [target] * 3
    first = free.outputs[0].token_ids[0]
    again = llm.chat(ask, SamplingParams(max_tokens=3, temperature=0.0, logit_bias={first: -100.0}), use_tqdm=False)
    assert again[0].outputs[0].token_ids[0] != first


def test_bad_grammars_raise(llm: LLM) -> None:
    ask = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="regex"):
        llm.chat(ask, constrained("regex", "a(b"), use_tqdm=False)
    with pytest.raises(ValueError, match="Unsupported type"):
        llm.chat(ask, constrained("json_schema", '{"type": "foo"}'), use_tqdm=False)
    with pytest.raises(ValueError, match="not defined"):
        llm.chat(ask, constrained("grammar", "root ::= foo"), use_tqdm=False)
    # refused before compiling: xgrammar would silently ignore the keyword
    with pytest.raises(ValueError, match="uniqueItems"):
        llm.chat(ask, constrained("json_schema", '{"type": "array", "uniqueItems": true}'), use_tqdm=False)
    # the engine still serves
    assert llm.chat(ask, constrained("choice", '["ok"]'), use_tqdm=False)[0].outputs[0].text == "ok"


def test_choice_grammar_escapes() -> None:
    assert choice_grammar(['say "hi"', "a\\b"]) == 'root ::= "say \\"hi\\"" | "a\\\\b"'


# --- random weights: preemption, timeouts ------------------------------------------


def tiny(**kw: object) -> LLMEngine:
    config = EngineConfig(model="tiny-llama", kv_cache_bytes=8 << 20, block_size=4, max_num_batched_tokens=256)
    engine = LLMEngine(msgspec.structs.replace(config, **kw))
    tok = load_tokenizer(EngineConfig())  # tiny-llama borrows the bundled tokenizer
    engine.set_tokenizer_vocab(tok.backend.to_str(), tok.eos_token_ids)
    return engine


def run(engine: LLMEngine, params: list[SamplingParams]) -> dict[str, tuple[list[int], str | None]]:
    for i, p in enumerate(params):
        engine.add_request(f"r{i}", [5 + i, 6, 7, 8, 9] * (4 + i), p)
    out: dict[str, tuple[list[int], str | None]] = {f"r{i}": ([], None) for i in range(len(params))}
    for _ in range(100_000):
        if not engine.has_unfinished():
            break
        for o in engine.step():
            assert o.error is None, o.error
            out[o.request_id] = (out[o.request_id][0] + o.new_token_ids, o.finish_reason)
    return out


def test_preemption_keeps_the_grammar() -> None:
    """Constrained requests preempted and recomputed produce what they produce with room."""
    pattern = "[a-z]{20,30}"
    params = [
        SamplingParams(
            max_tokens=40, temperature=1.0, seed=i, structured_output=GrammarSpec(kind="regex", spec=pattern)
        )
        for i in range(6)
    ]
    roomy = run(tiny(), params)
    engine = tiny(kv_cache_bytes=24 * tiny().runner._block_bytes())
    tight = run(engine, params)
    assert engine.scheduler.preemptions_total > 0
    assert tight == roomy
    tok = load_tokenizer(EngineConfig())
    for ids, reason in roomy.values():
        assert reason == "stop"
        assert re.fullmatch(pattern, tok.decode(ids))


def test_compile_timeout_fails_only_that_request(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = tiny(grammar_compile_timeout_s=0.05)
    release = threading.Event()
    real = StructuredOutputManager._compile

    def slow(self: StructuredOutputManager, job):  # type: ignore[no-untyped-def]
        if job.spec.spec == "slow":
            job.started = 0.0  # as if it had been compiling forever
            release.wait(10)
            raise RuntimeError("never")
        return real(self, job)

    monkeypatch.setattr(StructuredOutputManager, "_compile", slow)
    engine.add_request("slow", [1, 2, 3], SamplingParams(structured_output=GrammarSpec(kind="regex", spec="slow")))
    engine.add_request("fine", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    release.set()
    errors = {o.request_id: o.error.message for o in outs if o.error}
    assert "took longer than" in errors["slow"] and "fine" not in errors
    # remembered: the same spec fails at once
    with pytest.raises(GrammarError, match="took longer"):
        engine.add_request("again", [1, 2], SamplingParams(structured_output=GrammarSpec(kind="regex", spec="slow")))


@pytest.mark.parametrize("engine_args", [{"dtype": "bfloat16"}, {"quantization": "int4"}], ids=["bfloat16", "int4"])
def test_schemas_under_bf16_and_int4(engine_args: dict[str, str]) -> None:
    """The reduced-precision modes (bf16 logits; int4 layers for steps of <= int4.max_rows rows,
    8 or 16, so a batch of 8 runs through them): the mask still holds and every output validates."""
    llm = LLM(config=EngineConfig(kv_cache_bytes=128 << 20, max_num_seqs=8, **engine_args))
    schemas = SCHEMAS[::7]  # 8 of the corpus, nested objects to anyOf and $ref
    prompts = [[{"role": "user", "content": f"Reply with JSON matching this schema: {json.dumps(s)}"}] for s in schemas]
    outs = llm.chat(prompts, [constrained("json_schema", json.dumps(s)) for s in schemas], use_tqdm=False)
    for schema, out in zip(schemas, outs, strict=True):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (schema, c.text)
        jsonschema.validate(json.loads(c.text), schema)
