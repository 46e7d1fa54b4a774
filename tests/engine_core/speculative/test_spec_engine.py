"""Speculative decoding through the whole engine: it may change speed, never the output.

Greedy output with speculation equals output without it, token for token, whatever the
proposer proposes (the n-gram proposer, and test doubles that are always right or always
wrong), the model, k, the batch mix, chunked prefill, preemption and prefix-cache hits.
Seeded sampling gives the same tokens with speculation on or off; unseeded sampling keeps
the target distribution; blocks go back to baseline after aborts in mid-verification.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import msgspec
import pytest

from services.engine_core.engine import LLMEngine
from services.tokenizer_pool.tokenizer import load_tokenizer
from shared.config import EngineConfig
from shared.model_files import resolve_model
from shared.protocol import GrammarSpec, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


class OracleProposer:
    """Proposes the reference output's next tokens: always right (or, with wrong=True, always
    wrong: each proposed token is the reference's plus one)."""

    def __init__(self, reference: dict[str, list[int]], vocab: int, wrong: bool = False) -> None:
        self.reference = reference
        self.vocab = vocab
        self.wrong = wrong
        self.finished: list[str] = []

    def propose(self, request_id: str, token_ids: Sequence[int], num_prompt_tokens: int, k: int) -> list[int]:
        done = len(token_ids) - num_prompt_tokens
        future = self.reference[request_id][done : done + k]
        if self.wrong:
            return [(t + 1) % self.vocab for t in future] or [0] * k
        return future

    def finish(self, request_id: str, token_ids: Sequence[int], num_prompt_tokens: int) -> None:
        self.finished.append(request_id)


def make_engine(model: str = "tiny-llama", **kw: object) -> LLMEngine:
    # Exact: speculation's guarantee (greedy output unchanged) is checked token for token.
    base = EngineConfig(model=model, kv_cache_bytes=16 << 20, block_size=4, max_num_batched_tokens=256, exact=True)
    return LLMEngine(msgspec.structs.replace(base, **kw))


def spec_engine(
    model: str = "tiny-llama", proposer: object = None, k: int = 3, method: str = "ngram", **kw: object
) -> LLMEngine:
    # A fixed draft length by default: these tests verify rows of exactly k drafts.
    kw.setdefault("speculative_adaptive_draft_length", False)
    engine = make_engine(model, speculative_method=method, num_speculative_tokens=k, ngram_prompt_lookup_min=1, **kw)
    if proposer is not None:
        engine.proposer = proposer  # type: ignore[assignment]
    return engine


def run(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
) -> dict[str, list[int]]:
    plist = params if isinstance(params, list) else [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, plist, strict=True)):
        engine.add_request(f"r{i}", p, sp)
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for _ in range(10_000):
        if not engine.has_unfinished():
            break
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    assert not engine.has_unfinished()
    assert engine.block_manager.usage == 0
    return out


def prompts_for(vocab: int, seed: int = 0) -> list[list[int]]:
    """A mixed batch: prompts that repeat themselves (n-gram lookups hit) and random ones."""
    rng = random.Random(seed)
    base = [rng.randrange(3, vocab) for _ in range(12)]
    return [
        base * 3,
        [rng.randrange(3, vocab) for _ in range(29)],
        base[:5] * 4 + [rng.randrange(3, vocab)],
        [rng.randrange(3, vocab) for _ in range(7)],
        base + [rng.randrange(3, vocab) for _ in range(40)] + base[:6],
    ]


def check_all_proposers(model: str, prompts: list[list[int]], params: SamplingParams, k: int = 3, **kw: object) -> None:
    engine = make_engine(model, **kw)
    vocab = engine.model_config.vocab_size
    reference = run(engine, prompts, params)
    for method in ("ngram", "suffix"):
        assert run(spec_engine(model, k=k, method=method, **kw), prompts, params) == reference, method
    right = spec_engine(model, OracleProposer(reference, vocab), k=k, **kw)
    assert run(right, prompts, params) == reference
    stats = right.stats()
    assert stats.spec_num_draft_tokens > 0 and stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens
    wrong = spec_engine(model, OracleProposer(reference, vocab, wrong=True), k=k, **kw)
    assert run(wrong, prompts, params) == reference
    assert wrong.stats().spec_num_draft_tokens > 0 and wrong.stats().spec_num_accepted_tokens == 0


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_greedy_unchanged_random_weight_models(model: str) -> None:
    vocab = resolve_model(model).hf_config()["vocab_size"]
    check_all_proposers(model, prompts_for(vocab), GREEDY)


def test_greedy_unchanged_bundled_model() -> None:
    tok = load_tokenizer(EngineConfig())
    text = "def add(a, b):\n    return a + b\n\n"
    prompts = [tok.encode(text * 3), tok.encode("The capital of France is"), tok.encode("1, 2, 3, 4, 5, 6,")]
    check_all_proposers("smollm2", prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_greedy_unchanged_for_k(k: int) -> None:
    check_all_proposers("tiny-llama", prompts_for(512, seed=k), GREEDY, k=k)


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_greedy_unchanged_with_adaptive_draft_lengths(method: str) -> None:
    """Draft lengths chosen per request and step (rows of 0 to 8 drafts side by side)."""
    prompts = prompts_for(512, seed=5)
    # The CPU default (bf16 + int4, fused steps), not the exact mode: the exact mode's
    # batch-invariant attention costs a model this small more per verification row than its
    # matmuls, which keeps the draft length short. The default's fused steps are row-invariant
    # for a few requests (tests/engine_core/fused_cpu/test_verify.py), so its output is
    # unchanged whatever lengths the timing-driven choice picks (a plain fp32 engine is not:
    # MKL's kernel depends on the row count, and this test flaked on it).
    # (int4 asked for: "auto" quantizes 4-bit GGUFs only.)
    fast: dict[str, object] = dict(exact=False, quantization="int4")
    reference_engine = make_engine(**fast)
    if reference_engine.runner.fused is None:
        pytest.skip("no fused CPU kernels here (no C++ compiler): the eager default is not row-invariant")
    reference = run(reference_engine, prompts, GREEDY)
    engine = spec_engine(k=8, method=method, speculative_adaptive_draft_length=True, **fast)
    assert run(engine, prompts, GREEDY) == reference
    right = spec_engine(proposer=OracleProposer(reference, 512), k=8, speculative_adaptive_draft_length=True, **fast)
    assert run(right, prompts, GREEDY) == reference
    stats = right.stats()
    assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens > 0
    # Always right: the draft length grows to the most allowed.
    assert stats.spec_num_accepted_tokens_per_pos[7] > 0


def test_adaptive_draft_length_stops_wrong_drafts() -> None:
    """Always wrong: drafting stops after a few probes, and the output is unchanged."""
    prompts = prompts_for(512, seed=6)
    reference = run(make_engine(), prompts, GREEDY)
    wrong = spec_engine(
        proposer=OracleProposer(reference, 512, wrong=True), k=8, speculative_adaptive_draft_length=True
    )
    assert run(wrong, prompts, GREEDY) == reference
    stats = wrong.stats()
    num_decodes = sum(len(v) for v in reference.values())
    assert stats.spec_num_accepted_tokens == 0 and stats.spec_num_draft_tokens < num_decodes / 2


def test_greedy_unchanged_with_chunked_prefill_and_a_tight_budget() -> None:
    # 7 tokens a step: drafts compete with prefill chunks and are trimmed to what is left.
    check_all_proposers("tiny-llama", prompts_for(512, seed=3), GREEDY, max_num_batched_tokens=7)


def _block_bytes(model: str, block_size: int = 4) -> int:
    cfg = resolve_model(model).hf_config()
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * block_size * cfg["num_key_value_heads"] * head_dim * 4


def test_greedy_unchanged_across_preemption() -> None:
    prompts = prompts_for(512, seed=4)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    kw = {"kv_cache_bytes": 40 * _block_bytes("tiny-llama")}
    check_all_proposers("tiny-llama", prompts, params, **kw)
    engine = spec_engine(k=4, **kw)
    run(engine, prompts, params)
    assert engine.scheduler.preemptions_total > 0


def test_greedy_unchanged_with_prefix_cache_hits() -> None:
    engine = spec_engine(k=4)
    prompts = prompts_for(512, seed=5)
    first = run(engine, prompts, GREEDY)
    hits = engine.block_manager.prefix_hits_total
    # The second round hits blocks registered by the first, speculation included: a block
    # holding a rejected draft would give a different output here.
    follow = [p + first[f"r{i}"] for i, p in enumerate(prompts)]
    again = run(engine, follow, GREEDY)
    assert engine.block_manager.prefix_hits_total > hits
    assert again == run(make_engine(enable_prefix_caching=False), follow, GREEDY)
    assert first == run(make_engine(), prompts, GREEDY)


def test_stops_inside_an_accepted_run() -> None:
    prompts = prompts_for(512, seed=6)
    reference = run(make_engine(), prompts, GREEDY)
    # Stop on a token the reference produces mid-way: speculation must end there too.
    stop = reference["r0"][9]
    cases = [
        SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[stop]),
        SamplingParams(max_tokens=11, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[stop], min_tokens=12),
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2),
    ]
    for params in cases:
        want = run(make_engine(), prompts, params)
        assert run(spec_engine(k=8), prompts, params) == want
        assert run(spec_engine(proposer=OracleProposer(reference, 512), k=8), prompts, params) == want


def collect(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
) -> dict[str, list]:
    """Every EngineOutput field a client sees, per request: tokens, (token, logprob, top ids)
    per token, finish reason, stop token."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, plist, strict=True)):
        engine.add_request(f"r{i}", p, sp)
    out: dict[str, list] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for o in engine.step():
            lps = [(lp.token_id, lp.logprob, [t for t, _ in lp.top]) for lp in o.logprobs or []]
            out[o.request_id].append((o.new_token_ids, lps, o.finish_reason, o.stop_token_id))
    # Flatten the per-step grouping, which speculation changes.
    flat: dict[str, list] = {}
    for rid, steps in out.items():
        flat[rid] = [
            [t for s in steps for t in s[0]],
            [lp for s in steps for lp in s[1]],
            steps[-1][2],
            steps[-1][3],
        ]
    return flat


def test_outputs_logprobs_and_finish_reasons_unchanged() -> None:
    prompts = prompts_for(512, seed=7)
    reference = run(make_engine(), prompts, GREEDY)
    stop = reference["r2"][5]
    params = SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[stop], logprobs=3)
    want = collect(make_engine(), prompts, params)
    for engine in (spec_engine(proposer=OracleProposer(reference, 512), k=8), spec_engine(k=4)):
        # The exact mode is batch-invariant: logprob values too are equal to the bit.
        assert collect(engine, prompts, params) == want


SAMPLED = [
    SamplingParams(max_tokens=24, temperature=1.0, seed=11, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=0.8, top_k=20, top_p=0.9, seed=12, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=1.2, min_p=0.05, seed=13, ignore_eos=True),
    SamplingParams(
        max_tokens=24,
        temperature=0.9,
        repetition_penalty=1.3,
        frequency_penalty=0.5,
        presence_penalty=0.3,
        seed=14,
        ignore_eos=True,
    ),
    SamplingParams(max_tokens=24, temperature=1.0, logit_bias={7: 5.0, 8: 3.0}, seed=15, ignore_eos=True),
]


def test_seeded_sampling_same_with_and_without_speculation() -> None:
    """Each position draws with the uniform of its output index, and sees the penalties of
    the drafts before it: a seeded request gets the same tokens with speculation on or off."""
    prompts = prompts_for(512, seed=8)
    batch = prompts[: len(SAMPLED)]
    want = run(make_engine(), batch, SAMPLED)
    assert run(spec_engine(k=4), batch, SAMPLED) == want
    assert run(spec_engine(proposer=OracleProposer(want, 512), k=4), batch, SAMPLED) == want
    assert run(spec_engine(proposer=OracleProposer(want, 512, wrong=True), k=4), batch, SAMPLED) == want
    assert run(spec_engine(k=4), batch, SAMPLED) == want  # and again: reproducible


def sampled_with_logprobs(max_tokens: int = 24) -> list[SamplingParams]:
    return [msgspec.structs.replace(p, logprobs=2, max_tokens=max_tokens) for p in SAMPLED]


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("proposer", ["right", "wrong", "ngram", "suffix"])
def test_seeded_sampling_bit_identical_with_and_without_speculation(k: int, proposer: str) -> None:
    """The exact mode: a verification row's logits equal the decode rows' to the bit (every
    query attended alone, MKL's row-count-invariant GEMM), so seeded tokens and their logprob
    values are the same with speculation on or off, for any k and proposer, in a batch of
    mixed seeds, penalties, top-k/top-p/min-p and logit_bias."""
    batch = prompts_for(512, seed=20 + k)[: len(SAMPLED)]
    params = sampled_with_logprobs()
    want = collect(make_engine(), batch, params)
    tokens = {rid: v[0] for rid, v in want.items()}
    if proposer in ("right", "wrong"):
        engine = spec_engine(proposer=OracleProposer(tokens, 512, wrong=proposer == "wrong"), k=k)
    else:
        engine = spec_engine(k=k, method=proposer)
    assert collect(engine, batch, params) == want
    if proposer == "right":
        stats = engine.stats()
        assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens > 0


def test_seeded_sampling_independent_of_the_batch_and_of_chunking() -> None:
    """Alone, in a batch, with and without speculation, with prefills cut into chunks of a
    7-token budget that speculation shares: the same seeded tokens and logprobs, to the bit."""
    batch = prompts_for(512, seed=30)[: len(SAMPLED)]
    params = sampled_with_logprobs()
    together = collect(make_engine(), batch, params)
    for i, (prompt, sp) in enumerate(zip(batch, params, strict=True)):
        assert collect(make_engine(), [prompt], sp)["r0"] == together[f"r{i}"]
    assert collect(spec_engine(k=3, max_num_batched_tokens=7), batch, params) == together
    assert collect(spec_engine(k=3, method="suffix", speculative_adaptive_draft_length=True), batch, params) == together


def test_seeded_sampling_bit_identical_bundled_model() -> None:
    """SmolLM2 at temperature 1.0, where last-bit logit differences used to flip a draw now and then."""
    tok = load_tokenizer(EngineConfig())
    text = "def add(a, b):\n    return a + b\n\n"
    prompts = [tok.encode(text * 3), tok.encode("The capital of France is"), tok.encode("Once upon a time")]
    params = [SamplingParams(max_tokens=32, temperature=1.0, seed=s, logprobs=1, ignore_eos=True) for s in (1, 2, 3)]
    want = collect(make_engine("smollm2", kv_cache_bytes=64 << 20), prompts, params)
    for method in ("ngram", "suffix"):
        engine = spec_engine("smollm2", k=4, method=method, kv_cache_bytes=64 << 20)
        assert collect(engine, prompts, params) == want, method


class FixedProposer:
    def __init__(self, drafts: list[int]) -> None:
        self.drafts = drafts

    def propose(self, request_id: str, token_ids: Sequence[int], num_prompt_tokens: int, k: int) -> list[int]:
        done = len(token_ids) - num_prompt_tokens
        return self.drafts[done : done + k]

    def finish(self, request_id: str, token_ids: Sequence[int], num_prompt_tokens: int) -> None:
        pass


def test_unseeded_sampling_keeps_the_target_distribution(tmp_path: Path) -> None:
    """A model with a 4-token vocabulary: the joint distribution of three sampled tokens
    under speculation (the first from the prefill, then a draft for the second that is
    accepted at some steps and rejected at others, and the token after it) against the
    target's, computed from its own logprobs without speculation."""
    vocab = 4
    config = json.loads(Path(resolve_model("tiny-llama").path).read_text())
    config["vocab_size"] = vocab
    path = tmp_path / "tiny-vocab.json"
    path.write_text(json.dumps(config))
    model = str(path)
    prompt = [1, 3, 2, 0]
    temperature = 1.5  # flatten the random model's distributions: every sequence is likely enough
    exact = make_engine(model)

    def dist(p: list[int]) -> list[float]:
        # logprobs are of the raw logits: the target at a temperature is their softmax / T
        exact.add_request("d", p, SamplingParams(max_tokens=1, temperature=0.0, logprobs=vocab))
        (o,) = exact.step()
        assert o.logprobs is not None
        scaled = {t: v / temperature for t, v in o.logprobs[0].top}
        z = math.log(sum(math.exp(v) for v in scaled.values()))
        return [math.exp(scaled[t] - z) for t in range(vocab)]

    joint: dict[tuple[int, ...], float] = {}
    for a, pa in enumerate(dist(prompt)):
        for b, pb in enumerate(dist([*prompt, a])):
            for c, pc in enumerate(dist([*prompt, a, b])):
                joint[(a, b, c)] = pa * pb * pc

    n = 4000
    params = SamplingParams(max_tokens=3, temperature=temperature, ignore_eos=True)
    p2 = [sum(p for (_, b, _), p in joint.items() if b == t) for t in range(vocab)]
    draft = max(range(vocab), key=lambda t: p2[t])  # accepted often, rejected often
    engine = spec_engine(model, FixedProposer([0, draft]), k=2, max_num_seqs=256, max_num_batched_tokens=1024)
    got = run(engine, [prompt] * n, params)
    counts = Counter(tuple(v) for v in got.values())
    stats = engine.stats()
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens == n
    tv = 0.5 * sum(abs(counts.get(key, 0) / n - p) for key, p in joint.items())
    # TV distance of n samples from their own 64-cell distribution is ~0.04 here; a sampler
    # that kept rejected drafts, or skewed the token after a rejection, lands far above.
    assert tv < 0.08, tv
    cells = [key for key, p in joint.items() if n * p >= 5]
    chi2 = sum((counts.get(key, 0) - n * joint[key]) ** 2 / (n * joint[key]) for key in cells)
    assert chi2 < len(cells) + 4 * math.sqrt(2 * len(cells)), (chi2, len(cells))


def test_blocks_back_to_baseline_after_aborts_mid_verification() -> None:
    engine = spec_engine(k=8)
    bm = engine.block_manager
    free = bm.num_free_blocks
    prompts = prompts_for(512, seed=9)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, GREEDY)
    engine.step()  # prefill
    engine.step()
    batch = engine.scheduler.schedule()
    assert any(batch.spec_token_ids), "the repeating prompts should be speculating"
    # Aborted between schedule and update: the verification's slots are held, then released.
    outs = engine.abort([r.request_id for r in batch.requests])
    assert len(outs) == len(prompts)
    assert bm.usage == 0 and bm.num_free_blocks == free
    engine.scheduler.update(batch, [[] for _ in batch.requests])
    assert bm.usage == 0 and bm.num_free_blocks == free and not engine.has_unfinished()


def test_rejected_draft_slots_are_released() -> None:
    reference = run(make_engine(), prompts_for(512), GREEDY)
    engine = spec_engine(proposer=OracleProposer(reference, 512, wrong=True), k=8)
    for i, p in enumerate(prompts_for(512)):
        engine.add_request(f"r{i}", p, GREEDY)
    bm = engine.block_manager
    for _ in range(6):
        engine.step()
        for req in engine.scheduler.running:
            # Only the blocks its own tokens need: none left over from rejected drafts.
            assert len(req.block_table) <= bm.blocks_needed(req.num_tokens)
            assert req.num_computed_tokens == req.num_tokens - 1
    stats = engine.stats()
    assert stats.spec_num_draft_tokens >= 8 * len(engine.scheduler.running) and stats.spec_num_accepted_tokens == 0


def test_poisoned_request_fails_alone_while_others_speculate() -> None:
    """A request that makes the step raise is isolated by re-running the batch by halves;
    the halves keep their rows' drafts, and everyone else's output is unchanged."""
    prompts = prompts_for(512, seed=10)
    clean = run(make_engine(), prompts, GREEDY)
    engine = spec_engine(k=4)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, GREEDY)
    poison = SamplingParams(max_tokens=12, min_tokens=4, temperature=0.0)
    engine.add_request("poison", prompts[0], poison)
    poison.stop_token_ids = [10**9]  # past add_request's check, as a validation bug would let it in
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    errors = []
    while engine.has_unfinished():
        for o in engine.step():
            if o.error is not None:
                errors.append(o.request_id)
            else:
                out[o.request_id].extend(o.new_token_ids)
    assert errors == ["poison"]
    assert out == clean
    assert engine.block_manager.usage == 0 and engine.stats().spec_num_accepted_tokens > 0


def test_structured_output_requests_decode_beside_speculating_ones() -> None:
    """A grammar-constrained request in a batch with requests that speculate: its grammar mask
    lands on its own rows and every output is as without speculation (test_spec_structured.py
    covers grammar requests' own drafts)."""
    tok = load_tokenizer(EngineConfig())  # tiny-llama borrows the bundled tokenizer

    overlap = False

    def outputs(engine: LLMEngine) -> dict[str, list[int]]:
        nonlocal overlap
        engine.set_tokenizer_vocab(tok.backend.to_str(), tok.eos_token_ids)
        prompts = prompts_for(512, seed=11)[:3]
        regex = SamplingParams(
            max_tokens=24, temperature=1.0, seed=3, structured_output=GrammarSpec(kind="regex", spec="[a-z]{10,20}")
        )
        engine.add_request("g", prompts[0], regex)
        deadline = time.monotonic() + 60
        while engine.only_compiling and time.monotonic() < deadline:
            time.sleep(0.01)  # the grammar compiles beside the step loop
            engine.step()
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, GREEDY)
        out: dict[str, list[int]] = {"r0": [], "r1": [], "r2": [], "g": []}
        while engine.has_unfinished() and time.monotonic() < deadline:
            steps = engine.step()
            running = engine.scheduler.running
            overlap |= any(r.grammar for r in running) and any(r.spec_token_ids for r in running)
            for o in steps:
                assert o.error is None, o.error
                out[o.request_id].extend(o.new_token_ids)
        assert not engine.has_unfinished() and engine.block_manager.usage == 0
        return out

    engine = spec_engine(k=4)
    got = outputs(engine)
    assert overlap, "the grammar request never shared a step with drafts"
    assert got == outputs(make_engine())
    assert engine.stats().spec_num_accepted_tokens > 0
    text = tok.decode(got["g"])
    assert re.fullmatch("[a-z]{10,20}", text), text
