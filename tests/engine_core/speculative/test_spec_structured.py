"""Speculative decoding for structured-output requests: drafts are cut at the first token the
grammar rejects, every verified position is masked by the grammar's state after the drafts
before it, and the matcher ends each step holding exactly the tokens kept.

So the output never changes: greedy and seeded outputs with speculation on equal those with
it off, token for token, for JSON-schema, regex, EBNF, choice and tool-call grammars, with
the n-gram and suffix proposers and test doubles that are always right, always wrong but
grammar-valid (so the rows after them are masked by a state the target never reaches), or
always wrong and grammar-invalid (cut before verification), for k = 1, 3, 8, in batches
mixed with plain requests, across preemption, and for a reasoning model whose `</think>`
falls inside a draft.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
import pytest
import torch

from services.engine_core.batch import ScheduledBatch
from services.engine_core.engine import LLMEngine
from services.engine_core.request import Request
from services.engine_core.structured_output import RequestGrammar, StructuredOutputManager
from services.tokenizer_pool.tokenizer import Tokenizer, load_tokenizer
from shared.config import EngineConfig
from shared.protocol import GrammarSpec, ReasoningTokens, SamplingParams
from tests.engine_core import thinking_model
from tests.engine_core.speculative.test_spec_engine import OracleProposer, prompts_for
from tests.engine_core.thinking_model import END_THINK, THINK

TOKENIZER = load_tokenizer(EngineConfig())  # the tiny models borrow the bundled tokenizer

TOOLS_SCHEMA = {
    "type": "array",
    "minItems": 1,
    "items": {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": "get_weather"},
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
                        "required": ["city", "unit"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"name": {"const": "noop"}, "parameters": {"type": "object", "maxProperties": 0}},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            },
        ]
    },
}
"""What `tool_choice: required` compiles to (services/gateway/tools.py)."""
RECORD_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 6},
        "size": {"type": "integer", "minimum": 0, "maximum": 999},
    },
    "required": ["name", "tags", "size"],
    "additionalProperties": False,
}
GRAMMARS = {
    "json_schema": GrammarSpec(kind="json_schema", spec=json.dumps(RECORD_SCHEMA)),
    "regex": GrammarSpec(kind="regex", spec=r"[a-z]{2,6}( [0-9]{1,3}){2,9}"),
    "grammar": GrammarSpec(kind="grammar", spec='root ::= ("cat" | "dog") (" " [0-9] [0-9]?)* "."'),
    "choice": GrammarSpec(kind="choice", spec=json.dumps(["yes", "no", "maybe so", "no way"])),
    "tools": GrammarSpec(kind="json_schema", spec=json.dumps(TOOLS_SCHEMA)),
}


def greedy(spec: GrammarSpec | None, max_tokens: int = 32, **kw: object) -> SamplingParams:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, structured_output=spec)
    return msgspec.structs.replace(params, **kw)


def new_engine(model: str = "tiny-llama", k: int = 0, method: str = "ngram", **kw: object) -> LLMEngine:
    # Exact: speculation's guarantee (output unchanged) is checked token for token.
    config = EngineConfig(model=model, kv_cache_bytes=16 << 20, block_size=4, max_num_batched_tokens=256, exact=True)
    if k:
        kw.update(speculative_method=method, num_speculative_tokens=k, ngram_prompt_lookup_min=1)
    engine = LLMEngine(msgspec.structs.replace(config, **kw))
    engine.set_tokenizer_vocab(TOKENIZER.backend.to_str(), TOKENIZER.eos_token_ids)
    return engine


_COMPILED: dict[tuple[StructuredOutputManager, GrammarSpec], object] = {}


def compiled_for(manager: StructuredOutputManager, spec: GrammarSpec) -> object:
    key = (manager, spec)
    if key not in _COMPILED:
        job = manager.submit(spec)
        deadline = time.monotonic() + 60
        while (compiled := manager.poll(job)) is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        _COMPILED[key] = compiled
    return _COMPILED[key]


def replayed(engine: LLMEngine, req: Request) -> RequestGrammar:
    """A fresh grammar for req fed its output tokens: what its own must equal after a step."""
    spec = req.sampling_params.structured_output
    assert spec is not None
    g = engine.structured_output.matcher(compiled_for(engine.structured_output, spec), req.eos_token_ids, req.reasoning)
    for t in req.output_token_ids:
        assert g.accept(t)
    return g


def next_mask(g: RequestGrammar, vocab: int) -> torch.Tensor:
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(1, vocab)
    if not g.is_terminated():
        g.fill(bitmask, 0)
    return bitmask[0]


def assert_holds_outputs(engine: LLMEngine, req: Request) -> None:
    """req's grammar is in the state of its output tokens: nothing of a lookahead is left."""
    want = replayed(engine, req)
    g: RequestGrammar = req.grammar
    assert (g.phase, g.is_terminated()) == (want.phase, want.is_terminated())
    vocab = engine.model_config.vocab_size
    assert torch.equal(next_mask(g, vocab), next_mask(want, vocab)), req.request_id


def allowed(mask: torch.Tensor, vocab: int) -> list[int]:
    bits = (mask[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab].nonzero()[:, 0].tolist()


class ValidWrongProposer:
    """Always wrong, always grammar-valid: at each draft position the lowest-id token the
    grammar allows there that is not the reference's (plain requests: the reference's + 1).
    Every draft survives validation and is rejected in verification, and the rows after the
    first are masked by grammar states the output never reaches."""

    def __init__(self, engine: LLMEngine, reference: dict[str, list[int]]) -> None:
        self.engine = engine
        self.reference = reference

    def propose(self, request_id: str, token_ids: Sequence[int], num_prompt_tokens: int, k: int) -> list[int]:
        req = self.engine.scheduler.get_request(request_id)
        assert req is not None
        vocab = self.engine.model_config.vocab_size
        ref = self.reference[request_id][len(token_ids) - num_prompt_tokens :]
        if req.grammar is None:
            return [(t + 1) % vocab for t in ref[:k]] or [0] * k
        g = replayed(self.engine, req)
        drafts: list[int] = []
        for j in range(k):
            if g.is_terminated():
                break
            options = [t for t in allowed(next_mask(g, vocab), vocab) if j >= len(ref) or t != ref[j]]
            if not options:
                break
            drafts.append(options[0])
            assert g.accept(options[0])
        return drafts

    def finish(self, request_id: str, token_ids: Sequence[int], num_prompt_tokens: int) -> None:
        pass


def run(
    engine: LLMEngine,
    prompts: list[list[int]],
    params: list[SamplingParams],
    reasoning: list[ReasoningTokens | None] | None = None,
    check_grammar: bool = True,
) -> dict[str, list[int]]:
    """Every request's tokens; after each step, every running grammar is checked against a replay."""
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"r{i}", p, sp, reasoning=reasoning[i] if reasoning else None)
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    deadline = time.monotonic() + 300
    while engine.has_unfinished():
        assert time.monotonic() < deadline
        if engine.only_compiling:
            time.sleep(0.01)  # the grammars compile beside the step loop
        for o in engine.step():
            assert o.error is None, (o.request_id, o.error)
            out[o.request_id].extend(o.new_token_ids)
        if check_grammar:
            for req in engine.scheduler.running:
                if req.grammar is not None:
                    assert_holds_outputs(engine, req)
    assert engine.block_manager.usage == 0
    return out


def batch_for(vocab: int, seed: int, **kw: object) -> tuple[list[list[int]], list[SamplingParams]]:
    """Every grammar kind, and two plain requests that speculate beside them."""
    prompts = prompts_for(vocab, seed) + prompts_for(vocab, seed + 100)[:2]
    params = [greedy(spec, **kw) for spec in GRAMMARS.values()]
    params += [greedy(None, ignore_eos=True, **kw), greedy(None, ignore_eos=True, **kw)]
    return prompts, params


def check_unchanged(
    prompts: list[list[int]],
    params: list[SamplingParams],
    k: int,
    model: str = "tiny-llama",
    reasoning: list[ReasoningTokens | None] | None = None,
    **kw: object,
) -> dict[str, list[int]]:
    """Equal outputs with speculation off, on with both proposers and with the three test doubles."""
    reference = run(new_engine(model, **kw), prompts, params, reasoning)
    for method in ("ngram", "suffix"):
        assert run(new_engine(model, k, method, **kw), prompts, params, reasoning) == reference, method
    structured = [f"r{i}" for i, p in enumerate(params) if p.structured_output is not None]

    right = new_engine(model, k, **kw)
    right.proposer = OracleProposer(reference, right.model_config.vocab_size)  # type: ignore[assignment]
    assert run(right, prompts, params, reasoning) == reference
    stats = right.stats()
    assert stats.spec_num_draft_tokens > 0 and stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens

    wrong = new_engine(model, k, **kw)
    wrong.proposer = ValidWrongProposer(wrong, reference)  # type: ignore[assignment]
    drafted: set[str] = set()
    original = wrong.runner.execute

    def execute(batch):  # type: ignore[no-untyped-def]
        drafted.update(r.request_id for i, r in enumerate(batch.requests) if batch.drafts(i))
        return original(batch)

    wrong.runner.execute = execute  # type: ignore[method-assign]
    assert run(wrong, prompts, params, reasoning) == reference
    assert wrong.stats().spec_num_draft_tokens > 0 and wrong.stats().spec_num_accepted_tokens == 0
    assert drafted & set(structured), "no grammar request verified a (wrong) draft"

    # Wrong and outside the grammar: cut before verification, so grammar rows never carry them.
    invalid = new_engine(model, k, **kw)
    invalid.proposer = OracleProposer(reference, invalid.model_config.vocab_size, wrong=True)  # type: ignore[assignment]
    assert run(invalid, prompts, params, reasoning) == reference
    return reference


@pytest.mark.parametrize("k", [1, 3, 8])
def test_greedy_unchanged_for_every_grammar_kind_in_a_mixed_batch(k: int) -> None:
    prompts, params = batch_for(512, seed=k)
    out = check_unchanged(prompts, params, k)
    text = {rid: TOKENIZER.decode(t) for rid, t in out.items()}
    assert re.fullmatch(r"(yes|no|maybe so|no way)", text["r3"]), text["r3"]


def test_seeded_sampling_unchanged() -> None:
    prompts, _ = batch_for(512, seed=21)
    seeded = [
        SamplingParams(max_tokens=32, temperature=1.0, seed=1),
        SamplingParams(max_tokens=32, temperature=0.8, top_k=40, top_p=0.9, seed=2),
        SamplingParams(max_tokens=32, temperature=1.2, min_p=0.05, seed=3),
        SamplingParams(max_tokens=32, temperature=1.0, repetition_penalty=1.2, frequency_penalty=0.4, seed=4),
        SamplingParams(max_tokens=32, temperature=1.0, logit_bias={7: 3.0}, seed=5),
        SamplingParams(max_tokens=32, temperature=1.0, seed=6, ignore_eos=True),
        SamplingParams(max_tokens=32, temperature=0.7, seed=7, ignore_eos=True),
    ]
    specs = [*GRAMMARS.values(), None, None]
    params = [msgspec.structs.replace(p, structured_output=s) for p, s in zip(seeded, specs, strict=True)]
    check_unchanged(prompts, params, k=4)


def test_ends_inside_an_accepted_run() -> None:
    """max_tokens, a stop token id and the grammar's own end inside what one step accepts:
    the request ends there, and its grammar holds the tokens up to that point only."""
    prompts, params = batch_for(512, seed=31)
    reference = run(new_engine(), prompts, params)
    cut = [
        greedy(GRAMMARS["json_schema"], max_tokens=7),
        greedy(GRAMMARS["regex"], stop_token_ids=[reference["r1"][4]]),
        greedy(GRAMMARS["grammar"], max_tokens=5),
        greedy(GRAMMARS["choice"]),  # ends with the grammar (its EOS is the last draft)
        greedy(GRAMMARS["tools"], stop_token_ids=[reference["r4"][6]], max_tokens=20),
        greedy(None, max_tokens=9, ignore_eos=True),
        greedy(None, stop_token_ids=[reference["r6"][3]]),
    ]
    want = run(new_engine(), prompts, cut)
    for k in (3, 8):
        engine = new_engine(k=k)
        engine.proposer = OracleProposer(reference, 512)  # type: ignore[assignment]
        finished = record_finished(engine)
        assert run(engine, prompts, cut) == want
        for req in finished:
            if req.grammar is not None:  # a finished request's grammar: its outputs, no more
                assert_holds_outputs(engine, req)
        assert engine.stats().spec_num_accepted_tokens > 0


def record_finished(engine: LLMEngine) -> list[Request]:
    """The requests that finish from now on (the scheduler drops them)."""
    finished: list[Request] = []
    update = engine.scheduler.update

    def recording(batch: ScheduledBatch, sampled: Sequence[Sequence[int]]) -> list[Request]:
        done = update(batch, sampled)
        finished.extend(done)
        return done

    engine.scheduler.update = recording  # type: ignore[method-assign]
    return finished


def _block_bytes(model: str = "tiny-llama") -> int:
    from shared.model_files import resolve_model

    cfg = resolve_model(model).hf_config()
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * 4 * cfg["num_key_value_heads"] * head_dim * 4


def test_greedy_unchanged_across_preemption() -> None:
    prompts, params = batch_for(512, seed=41, max_tokens=40)
    kw: dict[str, object] = {"kv_cache_bytes": 40 * _block_bytes()}
    check_unchanged(prompts, params, k=4, **kw)
    engine = new_engine(k=4, **kw)
    run(engine, prompts, params)
    assert engine.scheduler.preemptions_total > 0


def test_grammar_holds_its_outputs_after_an_abort_mid_verification() -> None:
    prompts, params = batch_for(512, seed=51)
    reference = run(new_engine(), prompts, params)
    engine = new_engine(k=8)
    engine.proposer = OracleProposer(reference, 512)  # type: ignore[assignment]
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        if sp.structured_output is not None:
            engine.add_request(f"r{i}", p, sp)
    deadline = time.monotonic() + 60
    while engine._compiling:  # admitted together once all compiled, so all are mid-output below
        assert time.monotonic() < deadline
        time.sleep(0.01)
        engine._admit_compiled()
    out: dict[str, list[int]] = {rid: [] for rid in reference}

    def step() -> None:
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)

    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        if sp.structured_output is None:
            engine.add_request(f"r{i}", p, sp)
    step()
    step()
    engine._propose()
    batch = engine.scheduler.schedule()
    verifying = [r for i, r in enumerate(batch.requests) if r.grammar is not None and batch.drafts(i)]
    assert len(verifying) >= 2, "the grammar requests should be verifying drafts"
    sampled, _ = engine.runner.execute(batch)  # masks filled through the drafts, then rolled back
    for req in verifying:
        assert_holds_outputs(engine, req)
    aborted = {r.request_id for r in batch.requests[::2]}
    engine.abort(sorted(aborted))
    num_before = [r.num_output_tokens for r in batch.requests]
    engine.scheduler.update(batch, sampled)  # the survivors keep their accepted tokens
    for req, n in zip(batch.requests, num_before, strict=True):
        out[req.request_id].extend(req.output_token_ids[n:])
    for req in verifying:
        assert_holds_outputs(engine, req)
    # The survivors carry on to the reference output.
    while engine.has_unfinished():
        step()
    for rid, tokens in out.items():
        if rid not in aborted:
            assert tokens == reference[rid], rid
    assert engine.block_manager.usage == 0


def test_validate_cuts_drafts_at_the_first_rejected_token() -> None:
    vocab = TOKENIZER.backend.get_vocab_size()
    manager = StructuredOutputManager(EngineConfig(), vocab)
    manager.set_vocab(TOKENIZER.backend.to_str(), TOKENIZER.eos_token_ids)
    g = manager.matcher(compiled_for(manager, GRAMMARS["json_schema"]), TOKENIZER.eos_token_ids)
    text = TOKENIZER.encode('{"name": "ab", "tags": ["red"], "size": 7}', add_special_tokens=False)
    eos = TOKENIZER.eos_token_ids[0]
    before = next_mask(g, vocab)
    assert g.validate([*text, eos, *text]) == len(text) + 1  # nothing after the end
    bad = TOKENIZER.encode("x", add_special_tokens=False)[0]
    assert g.validate([*text[:3], bad, *text[3:]]) == 3  # after `{"name":`
    assert g.validate([bad]) == 0
    assert torch.equal(next_mask(g, vocab), before) and g.phase == "answer"
    manager.shutdown()


def thinking(tmp: Path) -> tuple[str, Tokenizer]:
    model, tokenizer = thinking_model.build(tmp, thinking_model.R1_TEMPLATE)
    return model, load_tokenizer(EngineConfig(model=model, tokenizer=tokenizer, cache_dir=str(tmp / "cache")))


THINKING = ReasoningTokens(end=[END_THINK], inside=True)
"""DeepSeek-R1 style: the output starts inside the thinking."""
OPENS = ReasoningTokens(end=[END_THINK], inside=False, start=THINK)
"""Qwen3 style: the first token may open the thinking."""


def test_reasoning_boundary_inside_a_draft(tmp_path: Path) -> None:
    """Positions before `</think>` are unconstrained (all but EOS), after it constrained, and a
    draft may cross it: the rows on each side get their own masks."""
    model, tok = thinking(tmp_path)
    engine = LLMEngine(
        EngineConfig(model=model, kv_cache_bytes=32 << 20, block_size=4, max_num_batched_tokens=256, max_model_len=512)
    )
    engine.set_tokenizer_vocab(tok.backend.to_str(), tok.eos_token_ids)
    vocab = engine.model_config.vocab_size
    spec = GRAMMARS["json_schema"]
    g = engine.structured_output.matcher(compiled_for(engine.structured_output, spec), tok.eos_token_ids, THINKING)
    hmm = tok.encode("Hmm", add_special_tokens=False)
    answer = tok.encode('{"name": "a"', add_special_tokens=False)
    eos = tok.eos_token_ids[0]
    drafts = [*hmm, END_THINK, *answer]
    assert g.validate(drafts) == len(drafts)
    assert g.validate([*hmm, eos]) == len(hmm)  # a thinking request may not end
    assert g.validate([*hmm, END_THINK, *hmm]) == len(hmm) + 1  # the answer is JSON
    import xgrammar as xgr

    rows = xgr.allocate_token_bitmask(len(drafts) + 1, vocab)
    g.fill(rows, 0, drafts)
    for j in range(len(drafts) + 1):
        want = engine.structured_output.matcher(
            compiled_for(engine.structured_output, spec), tok.eos_token_ids, THINKING
        )
        for t in drafts[:j]:
            assert want.accept(t)
        assert torch.equal(rows[j], next_mask(want, vocab)), j
        if j <= len(hmm):
            assert set(allowed(rows[j], vocab)) == set(range(vocab)) - set(tok.eos_token_ids)
    assert g.phase == "reasoning"  # rolled back

    opens = engine.structured_output.matcher(compiled_for(engine.structured_output, spec), tok.eos_token_ids, OPENS)
    assert opens.validate([THINK, *hmm, END_THINK, *answer]) == len(answer) + len(hmm) + 2
    assert opens.validate([*answer, THINK]) == len(answer)
    assert opens.phase == "maybe"


def test_reasoning_model_unchanged(tmp_path: Path) -> None:
    """Seeded requests of a thinking model (the filler token is likelier than `</think>`, so the
    thinking lasts a few tokens) under grammars: the same with speculation on or off, with
    always-right drafts crossing `</think>`."""
    model, tok = thinking(tmp_path)
    filler = tok.encode("Hmm", add_special_tokens=False)[0]
    bias = {filler: 100.0, END_THINK: 98.0}
    prompts = [tok.encode("Yes or no?"), tok.encode("Tell me a number."), tok.encode("Name a colour.")]
    params = [
        SamplingParams(max_tokens=48, temperature=1.0, seed=s, logit_bias=bias, structured_output=spec)
        for s, spec in ((1, GRAMMARS["choice"]), (2, GRAMMARS["regex"]), (3, GRAMMARS["json_schema"]))
    ]
    reasoning: list[ReasoningTokens | None] = [THINKING, THINKING, OPENS]

    def engine(k: int = 0) -> LLMEngine:
        kw: dict[str, object] = {"speculative_method": "suffix", "num_speculative_tokens": k} if k else {}
        e = LLMEngine(
            EngineConfig(
                model=model,
                kv_cache_bytes=32 << 20,
                block_size=4,
                max_num_batched_tokens=256,
                max_model_len=512,
                exact=True,  # compared token for token with speculation on and off
                **kw,
            )
        )
        e.set_tokenizer_vocab(tok.backend.to_str(), tok.eos_token_ids)
        return e

    reference = run(engine(), prompts, params, reasoning)
    crossing = [rid for rid, t in reference.items() if END_THINK in t[1:]]
    assert crossing, reference
    assert run(engine(4), prompts, params, reasoning) == reference
    right = engine(8)
    right.proposer = OracleProposer(reference, right.model_config.vocab_size)  # type: ignore[assignment]
    assert run(right, prompts, params, reasoning) == reference
    stats = right.stats()
    assert stats.spec_num_draft_tokens > 0 and stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens
    wrong = engine(3)
    wrong.proposer = ValidWrongProposer(wrong, reference)  # type: ignore[assignment]
    assert run(wrong, prompts, params, reasoning) == reference
