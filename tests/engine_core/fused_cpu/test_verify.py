"""Steps that verify speculative drafts in the fused CPU path (fused_cpu/decode.py): which steps
run fused, that a verification step's logits stay close to the eager default's, that every row
of it is bit-identical to a lone decode of the same token (the kernels are row-invariant:
test_row_invariance.py), and so that greedy output with speculation equals output without it in
the default mode, for up to int4_max_rows requests, whatever the proposer and k."""

from __future__ import annotations

import random
from types import ModuleType

import pytest
import torch

from services.engine_core.attention.base import AttentionMetadata
from services.engine_core.fused_cpu.decode import FusedDecode
from services.engine_core.model_runner import ModelRunner
from services.tokenizer_pool.tokenizer import load_tokenizer
from shared.config import EngineConfig
from shared.protocol import SamplingParams
from tests.engine_core.fused_cpu.conftest import decode_metadata
from tests.engine_core.fused_cpu.test_decode import _prefilled, assert_fused_logits_close, token_range
from tests.engine_core.speculative.test_spec_engine import (
    GREEDY,
    OracleProposer,
    check_all_proposers,
    make_engine,
    prompts_for,
    spec_engine,
)
from tests.engine_core.speculative.test_spec_engine import run as run_engine

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the fused path is the CPU default's")

I32 = torch.int32


@pytest.fixture(scope="module")
def runner(ext: ModuleType) -> ModelRunner:
    """The default mode on the bundled model."""
    runner = ModelRunner(EngineConfig(kv_cache_bytes=64 << 20, max_num_seqs=8))
    assert runner.fused is not None
    return runner


def verify_step(
    table: torch.Tensor, contexts: list[int], tokens: list[list[int]], block_size: int
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """The step where request i (its blocks table[i], contexts[i] tokens in the cache) feeds
    tokens[i]: its next token, then the drafts it verifies. (ids, positions, metadata)"""
    ids, positions, slots, query_start, seq_lens = [], [], [], [0], []
    for i, (context, row) in enumerate(zip(contexts, tokens, strict=True)):
        ids += row
        for pos in range(context, context + len(row)):
            positions.append(pos)
            slots.append(int(table[i, pos // block_size]) * block_size + pos % block_size)
        query_start.append(query_start[-1] + len(row))
        seq_lens.append(context + len(row))
    md = AttentionMetadata(
        num_reqs=len(contexts),
        num_tokens=len(ids),
        query_start_loc=torch.tensor(query_start, dtype=I32),
        seq_lens=torch.tensor(seq_lens, dtype=I32),
        block_tables=table,
        slot_mapping=torch.tensor(slots),
        max_query_len=max(len(r) for r in tokens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=[len(r) for r in tokens],
        seq_lens_cpu=seq_lens,
        num_draft_tokens=len(ids) - len(contexts),
    )
    return torch.tensor(ids), torch.tensor(positions), md


def drafted(
    next_ids: torch.Tensor, drafts: list[int], seed: int, tokens: tuple[int, int] = (100, 20000)
) -> list[list[int]]:
    """Each request's next token followed by drafts[i] random drafts (from the range `tokens`)."""
    rng = random.Random(seed)
    return [[int(t)] + [rng.randrange(*tokens) for _ in range(k)] for t, k in zip(next_ids, drafts, strict=True)]


def test_runs_decode_and_verify_steps(runner: ModelRunner) -> None:
    """Steps of decodes with or without drafts: on the int4 copies up to their number of
    requests, however many rows; on the dense weights past it. (Prefill chunks: test_mixed.py.)"""
    fused = runner.fused
    assert isinstance(fused, FusedDecode)
    limit = fused.int4_max_requests
    md = decode_metadata(limit, 10, 16)[2]
    assert fused.can_run(md) and fused.uses_int4(md)
    md = decode_metadata(limit + 1, 10, 16)[2]
    assert fused.can_run(md) and not fused.uses_int4(md)

    def step(requests: int, drafts: int) -> AttentionMetadata:
        blocks = -(-(21 + drafts) // 16)
        table = torch.arange(requests * blocks, dtype=I32).view(requests, blocks)
        return verify_step(table, [20] * requests, [[5] * (1 + drafts)] * requests, 16)[2]

    md = step(limit, 32)
    assert md.num_tokens > limit and fused.can_run(md) and fused.uses_int4(md)  # it counts requests
    md = step(limit + 1, 3)
    assert fused.can_run(md) and not fused.uses_int4(md)
    md = step(limit, 3)
    md.num_draft_tokens -= 1  # a decode request with a row that is neither its token nor a draft
    assert not fused.can_run(md)


@torch.inference_mode()
@pytest.mark.parametrize(
    ("contexts", "drafts"),
    [
        ([40], [8]),
        ([512], [3]),
        ([17, 3, 64], [2, 0, 5]),
        ([5 + 9 * i for i in range(12)], [0] * 12),  # more requests than int4 serves: dense weights
        ([5 + 9 * i for i in range(10)], [i % 4 for i in range(10)]),
    ],
)
def test_logits_close_to_eager(runner: ModelRunner, contexts: list[int], drafts: list[int]) -> None:
    caches, md0, next_ids, _ = _prefilled(runner, contexts, room=1 + max(drafts))
    copies = [(k.clone(), v.clone()) for k, v in caches]
    ids, pos, md = verify_step(md0.block_tables, contexts, drafted(next_ids, drafts, 0), runner.block_size)
    assert_fused_logits_close(runner, ids, pos, caches, copies, md)


@torch.inference_mode()
@pytest.mark.parametrize(
    ("contexts", "drafts"),
    [
        ([40], [8]),
        ([130, 3, 64, 7], [3, 0, 8, 1]),
        # More requests than the int4 copies serve: dense weights, in row-invariant chunks.
        ([5 + 13 * i for i in range(10)], [2 + i % 5 for i in range(10)]),  # 50 rows
    ],
)
def test_rows_equal_lone_decodes(
    runner: ModelRunner, contexts: list[int], drafts: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row of a verification step (hidden states and logits) is bit-identical to decoding
    its token alone, one step per token, after the tokens before it."""
    assert runner.fused is not None
    if len(contexts) > runner.fused.int4_max_requests and not runner.fused.dense_chunk >= len(contexts):
        pytest.skip("oneDNN's dense matmul gives no row-invariant chunk of this many rows here")
    assert_rows_equal_lone_decodes(runner, contexts, drafts, monkeypatch)


def assert_rows_equal_lone_decodes(
    runner: ModelRunner, contexts: list[int], drafts: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row of the step where request i (contexts[i] tokens of a random prompt in) verifies
    drafts[i] random drafts, hidden states and logits, is bit-identical to decoding its token
    alone, one step per token, after the tokens before it."""
    assert runner.fused is not None
    caches, md0, next_ids, _ = _prefilled(runner, contexts, room=1 + max(drafts))
    lone_caches = [(k.clone(), v.clone()) for k, v in caches]
    tokens = drafted(next_ids, drafts, 1, token_range(runner))
    ids, pos, md = verify_step(md0.block_tables, contexts, tokens, runner.block_size)
    hidden = runner.fused.run(ids, pos, caches, md)
    logits = runner.model.compute_logits(hidden, len(contexts))
    if not runner.fused.uses_int4(md):  # the lone decodes on the weights this step's requests use
        monkeypatch.setattr(runner.fused, "int4_max_requests", 0)
    row = 0
    for i, (context, request_tokens) in enumerate(zip(contexts, tokens, strict=True)):
        for j, token in enumerate(request_tokens):
            one = verify_step(md0.block_tables[i : i + 1], [context + j], [[token]], runner.block_size)
            lone = runner.fused.run(*one[:2], lone_caches, one[2])
            assert torch.equal(lone[0], hidden[row]), (i, j)
            assert torch.equal(runner.model.compute_logits(lone)[0], logits[row]), (i, j)
            row += 1


DEFAULT_MODE: dict[str, object] = dict(exact=False)
"""The default mode (the speculative tests' engines are exact); random-weight checkpoints need
int4 asked for (auto quantizes 4-bit GGUFs only)."""


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_greedy_unchanged_random_weight_models(
    ext: ModuleType, counted_verify_steps: list[int], model: str, k: int
) -> None:
    """ngram, suffix, always-right and always-wrong proposers; 5 requests in one batch."""
    check_all_proposers(model, prompts_for(512, seed=k), GREEDY, k=k, quantization="int4", **DEFAULT_MODE)
    assert counted_verify_steps and max(counted_verify_steps) > k  # several requests' drafts in one fused step


@pytest.mark.parametrize("k", [1, 3, 8])
def test_greedy_unchanged_bundled_model(ext: ModuleType, counted_verify_steps: list[int], k: int) -> None:
    tok = load_tokenizer(EngineConfig())
    text = "def add(a, b):\n    return a + b\n\n"
    prompts = [tok.encode(text * 3), tok.encode("The capital of France is"), tok.encode("1, 2, 3, 4, 5, 6,")]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    check_all_proposers("smollm2", prompts, params, k=k, **DEFAULT_MODE)
    assert counted_verify_steps


@torch.inference_mode()
def test_lm_head_chosen_by_rows_without_drafts(runner: ModelRunner) -> None:
    """More sampled rows than the int8 head's cut-off, from 5 requests: still the int8 head (the
    one their lone decodes use), so each row's logits are its lone decode's bits."""
    model = runner.model
    hidden = torch.randn(model.lm_head_max_rows + 12, model.cfg.hidden_size).to(torch.bfloat16)
    logits = model.compute_logits(hidden, 5)
    for row in (0, hidden.shape[0] // 2, hidden.shape[0] - 1):
        assert torch.equal(logits[row], model.compute_logits(hidden[row : row + 1])[0])


def test_greedy_unchanged_with_32_drafts(ext: ModuleType, counted_verify_steps: list[int]) -> None:
    """5 requests verifying up to 32 drafts each, more sampled rows than the int8 head's cut-off."""
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    check_all_proposers("tiny-llama", prompts_for(512, seed=9), params, k=32, quantization="int4", **DEFAULT_MODE)
    assert max(counted_verify_steps) + 5 > 128


def test_more_requests_run_fused_on_the_dense_weights(ext: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """4 requests more than the int4 cut-off (12 with AMX, 20 without): their decode and
    verification steps run fused on the dense weights (bf16, or fp32 without native bf16), in
    row-invariant chunks, and greedy output is the same with speculation on or off while the batch
    stays past the cut-off (always-right and always-wrong proposers: every request advances alike,
    so none finishes early and leaves a batch of int4 size). On the bundled model: its matrices
    are where the libraries' kernels depend on the row count."""
    steps: list[tuple[int, int, bool]] = []
    run = FusedDecode.run

    def recording(self: FusedDecode, *args: object) -> torch.Tensor:
        md = args[-1]
        assert isinstance(md, AttentionMetadata)
        if not md.num_prefill_reqs:  # the prompts' steps run fused too
            steps.append((md.num_reqs, md.num_draft_tokens, self.uses_int4(md)))
        return run(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(FusedDecode, "run", recording)
    tok = load_tokenizer(EngineConfig())
    texts = ["def add(a, b):\n    return a + b\n\n" * 2, "The capital of France is", "1, 2, 3, 4, 5, 6,"]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    # Every prompt prefilled in the first step, so that every later step decodes all n requests.
    big: dict[str, object] = dict(max_num_seqs=32, kv_cache_bytes=64 << 20, max_num_batched_tokens=1024)
    plain = make_engine("smollm2", **big, **DEFAULT_MODE)
    assert plain.runner.fused is not None
    n = plain.runner.fused.int4_max_requests + 4
    if plain.runner.fused.dense_chunk < n:
        pytest.skip(f"the dense matmul gives no row-invariant chunk of {n} rows here")
    prompts = [tok.encode(f"{i}. {texts[i % 3]}") for i in range(n)]
    reference = run_engine(plain, prompts, params)
    for wrong in (False, True):
        proposer = OracleProposer(reference, 49152, wrong=wrong)
        engine = spec_engine("smollm2", proposer, k=4, **big, **DEFAULT_MODE)
        steps.clear()
        assert run_engine(engine, prompts, params) == reference, f"wrong={wrong}"
        assert all(reqs == n and not int4 for reqs, _, int4 in steps) and any(drafts for _, drafts, _ in steps)
