"""Steps that mix prefill chunks with decodes and verifications in the fused CPU path
(fused_cpu/decode.py): their logits stay close to the eager default's, their decode rows are
bit-identical to the same step without the prefill chunk, and a prompt's K/V (and its last row)
do not depend on how the prompt is cut into chunks or on what shares its steps: what keeps
greedy output the same with speculation on or off when prompts arrive while others decode
(tests/engine_core/speculative/test_spec_mixed.py)."""

from __future__ import annotations

import random
from types import ModuleType

import pytest
import torch

from services.engine_core.attention.base import AttentionMetadata
from services.engine_core.fused_cpu.decode import FusedDecode, position_invariant_block
from services.engine_core.model_runner import ModelRunner
from shared.config import EngineConfig
from tests.engine_core.fused_cpu.test_decode import _prefilled
from tests.engine_core.fused_cpu.test_verify import verify_step

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the fused path is the CPU default's")

Caches = list[tuple[torch.Tensor, torch.Tensor]]


@pytest.fixture(scope="module")
def runner(ext: ModuleType) -> ModelRunner:
    """The default mode on the bundled model."""
    runner = ModelRunner(EngineConfig(kv_cache_bytes=64 << 20, max_num_seqs=16))
    assert runner.fused is not None
    return runner


def mixed_step(
    table: torch.Tensor, contexts: list[int], tokens: list[list[int]], drafts: list[int], block_size: int
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Request i (its blocks table[i], contexts[i] tokens cached) feeds tokens[i]: the decode
    requests (drafts[i] >= 0: its next token, then drafts[i] drafts) first, then the prefill
    chunks (drafts[i] < 0), as model_runner orders them."""
    ids, pos, md = verify_step(table, contexts, tokens, block_size)
    md.num_draft_tokens = sum(k for k in drafts if k > 0)
    md.num_prefill_reqs = sum(k < 0 for k in drafts)
    assert all(k >= 0 for k in drafts[: md.num_reqs - md.num_prefill_reqs]), "decodes first"
    return ids, pos, md


def random_tokens(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(100, 20000) for _ in range(n)]


def step_tokens(next_ids: torch.Tensor, drafts: list[int], chunks: list[int], rng: random.Random) -> list[list[int]]:
    """A decode request's next token and its random drafts; a prefill request's chunk of random tokens."""
    return [
        [int(t), *random_tokens(k, rng)] if k >= 0 else random_tokens(n, rng)
        for t, k, n in zip(next_ids, drafts, chunks, strict=True)
    ]


@pytest.mark.parametrize(("context", "chunk"), [(0, 384), (0, 2048), (1600, 64), (2000, 1000)])
def test_steps_with_long_prefill_chunks_run_fused(runner: ModelRunner, context: int, chunk: int) -> None:
    """However long its prefill chunks (a long prompt, or a chunk deep into one), a step runs as
    the one fused call: the prefill rows take prefill_attention.h's kernel, as fast as the eager
    path's SDPA (benchmarks/prefill_step_cost.py), so the decode rows beside them keep their
    decode step's bits (test_decode_rows_unchanged_by_prefill)."""
    blocks = -(-(context + chunk) // runner.block_size)
    table = torch.arange(2 * blocks, dtype=torch.int32).view(2, blocks)
    _, _, md = mixed_step(table, [10, context], [[1], [5] * chunk], [0, -1], runner.block_size)
    assert runner.fused is not None and runner.fused.can_run(md)


@torch.inference_mode()
@pytest.mark.parametrize(
    ("contexts", "drafts", "chunks"),
    [
        ([17, 3, 64, 40], [2, 0, 5, -1], [0, 0, 0, 100]),  # int4 decode rows, a 100-row chunk after 40 cached
        ([30, 1], [3, -1], [0, 257]),  # a chunk of more rows than the prefill calls take, with a padded tail
        ([5 + 9 * i for i in range(10)] + [8, 20], [i % 3 for i in range(10)] + [-1, -1], [0] * 10 + [33, 64]),
    ],
)
def test_logits_close_to_eager(runner: ModelRunner, contexts: list[int], drafts: list[int], chunks: list[int]) -> None:
    caches, md0, next_ids, _ = _prefilled(runner, contexts, room=max(chunks) + 1 + max(drafts))
    copies = [(k.clone(), v.clone()) for k, v in caches]
    tokens = step_tokens(next_ids, drafts, chunks, random.Random(0))
    ids, pos, md = mixed_step(md0.block_tables, contexts, tokens, drafts, runner.block_size)
    assert runner.fused is not None and runner.fused.can_run(md)
    got = runner.model.compute_logits(runner.fused.run(ids, pos, caches, md))
    ref = runner.model.compute_logits(runner.model(ids, pos, copies, md, runner.backend))
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    # As test_decode.assert_fused_logits_close, but a few hundred rows of a random-token prompt
    # hold the odd row that amplifies rounding chaotically (one of 257 here at 0.965; against a
    # float32 model, eager and fused rows alike): at most 1 % of rows past 0.99.
    if runner.fused.prefill_int4:
        # Prefill rows on int4 (int8 activations, as the decode rows'; the eager path's are dense
        # bf16): over random seeds 0-3 of these steps (Zen 4, 2026-12-03) the worst mean was 0.9986,
        # from one row of 261 at 0.64, the same 0.64 as a decode row (the activations' int8
        # rounding), every other row past 0.99; argmax agreement at worst 0.76.
        assert cos.mean() > 0.998 and (cos > 0.99).float().mean() >= 0.99 and cos.min() > 0.6, cos
    else:
        assert cos.mean() > 0.999 and (cos > 0.99).float().mean() >= 0.99 and cos.min() > 0.9, cos
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


@torch.inference_mode()
@pytest.mark.parametrize(
    ("contexts", "drafts", "chunks"),
    [
        ([17, 3, 64, 40], [2, 0, 5, -1], [0, 0, 0, 100]),  # int4
        ([5 + 9 * i for i in range(10)] + [20], [i % 3 for i in range(10)] + [-1], [0] * 10 + [150]),  # dense
        # A chunk past the old 384 x 384 limit (which ran such steps eagerly): int4, then dense.
        ([30, 200, 500], [4, 0, -1], [0, 0, 700]),
        ([5 + 9 * i for i in range(10)] + [300], [i % 3 for i in range(10)] + [-1], [0] * 10 + [500]),
    ],
)
def test_decode_rows_unchanged_by_prefill(
    runner: ModelRunner, contexts: list[int], drafts: list[int], chunks: list[int]
) -> None:
    """The decode and draft rows of a mixed step are bit for bit those of the same step without
    its prefill chunk, on the weights that step uses (int4 for a few requests, else dense),
    however long the chunk."""
    fused = runner.fused
    assert isinstance(fused, FusedDecode)
    caches, md0, next_ids, _ = _prefilled(runner, contexts, room=max(chunks) + 1 + max(drafts))
    alone_caches = [(k.clone(), v.clone()) for k, v in caches]
    tokens = step_tokens(next_ids, drafts, chunks, random.Random(1))
    ids, pos, md = mixed_step(md0.block_tables, contexts, tokens, drafts, runner.block_size)
    decodes = md.num_reqs - md.num_prefill_reqs
    ids_a, pos_a, md_a = mixed_step(
        md0.block_tables[:decodes], contexts[:decodes], tokens[:decodes], drafts[:decodes], runner.block_size
    )
    assert fused.uses_int4(md) == fused.uses_int4(md_a) == (decodes <= fused.int4_max_requests)
    hidden = fused.run(ids, pos, caches, md)
    alone = fused.run(ids_a, pos_a, alone_caches, md_a)
    assert torch.equal(hidden[: md_a.num_tokens], alone)


def _prefill_in_chunks(
    runner: ModelRunner, caches: Caches, md0: AttentionMetadata, next_ids: torch.Tensor, prompt: list[int],
    chunks: list[int], others: list[int], seed: int,
) -> torch.Tensor:  # fmt: skip
    """Feeds request 0's prompt (after its cached first token) in chunks of the given sizes, each
    in a step beside requests 1.. (contexts `others`), which decode with random drafts; returns
    the hidden state of the prompt's last row."""
    assert runner.fused is not None and sum(chunks) == len(prompt)
    rng = random.Random(seed)
    contexts = list(others)
    done = 0
    hidden = torch.empty(0)
    for n in chunks:
        drafts = [rng.randrange(0, 4) for _ in others]
        tokens = [[int(t), *random_tokens(k, rng)] for t, k in zip(next_ids[1 : 1 + len(others)], drafts, strict=True)]
        # Decodes first: the table's rows reordered to match.
        table = torch.cat([md0.block_tables[1 : 1 + len(others)], md0.block_tables[:1]])
        ids, pos, md = mixed_step(
            table, [*contexts, 1 + done], [*tokens, prompt[done : done + n]], [*drafts, -1], runner.block_size
        )
        hidden = runner.fused.run(ids, pos, caches, md)
        contexts = [c + 1 + k for c, k in zip(contexts, drafts, strict=True)]
        done += n
    return hidden[-1]


@torch.inference_mode()
@pytest.mark.parametrize(
    ("length", "chunks", "others", "threads"),
    [
        (300, [1, 37, 130, 132], [], 2),
        (300, [1, 37, 130, 132], [40, 7], 2),
        (300, [1, 37, 130, 132], [5 + 9 * i for i in range(10)], 2),
        # Past the old 384 x 384 limit (whose steps ran eagerly), at one thread against two.
        (1100, [1, 400, 63, 636], [40, 7], 1),
        (1100, [700, 1, 399], [], 2),
    ],
)
@pytest.mark.parametrize("prefill_int4", [True, False], ids=["int4-prefill", "dense-prefill"])
def test_prompt_kv_independent_of_chunking(
    runner: ModelRunner,
    monkeypatch: pytest.MonkeyPatch,
    length: int,
    chunks: list[int],
    others: list[int],
    threads: int,
    prefill_int4: bool,
) -> None:
    """A prompt prefilled in one step alone (at 2 threads), and in chunks of the given sizes
    each beside decoding requests (none, 2 or 10 on int4) at `threads` threads: the same K/V
    bits in every layer, and the same last row, with the prefill rows on the int4 copies or on
    the dense weights (FusedDecode.prefill_int4; test_prefill_int4.py: beside dense decode rows)."""
    assert runner.fused is not None
    monkeypatch.setattr(runner.fused, "prefill_int4", prefill_int4)
    if not prefill_int4 and runner.fused.prefill_block == 0:
        pytest.skip("oneDNN's dense matmul gives no position-invariant call size here")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        caches, md0, next_ids, _ = _prefilled(runner, [1, *others], room=length + 10)
        one_caches = [(k.clone(), v.clone()) for k, v in caches]
        prompt = random_tokens(length, random.Random(2))
        lone = _prefill_in_chunks(runner, one_caches, md0, next_ids, prompt, [length], [], 3)
        if others:
            one_caches = [(k.clone(), v.clone()) for k, v in caches]
            # Alone, then beside decodes in one step.
            beside = _prefill_in_chunks(runner, one_caches, md0, next_ids, prompt, [length], others, 3)
            assert torch.equal(beside, lone)
        torch.set_num_threads(threads)
        last = _prefill_in_chunks(runner, caches, md0, next_ids, prompt, chunks, others, 4)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(last, lone)
    assert_prompt_kv_equal(runner, md0, length, caches, one_caches)


def assert_prompt_kv_equal(
    runner: ModelRunner,
    md0: AttentionMetadata,
    length: int,
    caches: list[tuple[torch.Tensor, torch.Tensor]],
    other: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Request 0's prompt (positions 1..length) has the same K/V bits in both caches, every layer."""
    bs = runner.block_size
    slots = torch.tensor([int(md0.block_tables[0, p // bs]) * bs + p % bs for p in range(1, length + 1)])
    n_kv, d = caches[0][0].shape[2:]
    for (k, v), (k1, v1) in zip(caches, other, strict=True):
        assert torch.equal(k.view(-1, n_kv, d)[slots], k1.view(-1, n_kv, d)[slots])
        assert torch.equal(v.view(-1, n_kv, d)[slots], v1.view(-1, n_kv, d)[slots])


@torch.inference_mode()
def test_position_invariant_block(runner: ModelRunner) -> None:
    """The prefill call size the probe picks gives a row the same bits at any index of the call,
    beside any rows, on every layer's matrices (the probe checks the first layer's)."""
    assert runner.fused is not None
    block = runner.fused.prefill_block
    if block == 0 or block == runner.fused.dense_chunk:
        pytest.skip("no position-invariant call size of more rows than a lone-bits chunk here")
    layer = runner.model.layers[-1]
    weights = [layer.qkv_weight, layer.o_weight, layer.gate_up_weight, layer.down_weight]
    assert position_invariant_block(weights, (block,)) == block
