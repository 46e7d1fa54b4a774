"""The GPU runner's paths, checked on a CPU: decode graphs (the batch-size ladder, the replay path's
padding and static buffers) and the memory-profiling forward.

Without a GPU the graphs are EagerGraph stand-ins (replay = run the captured function again),
with the Triton backend in its interpreter: the same buffers, padding rows and kernels as a
CUDA replay, so a padding row that wrote to the cache or a stale buffer row would change tokens.
"""

from __future__ import annotations

import random

import pytest

from services.engine_core.cuda_graph import DecodeGraphs, EagerGraph, capture_sizes
from services.engine_core.engine import LLMEngine
from shared.config import EngineConfig
from shared.protocol import SamplingParams


@pytest.mark.parametrize(
    ("max_batch", "sizes"),
    [
        (1, [1]),
        (3, [1, 2, 3]),
        (8, [1, 2, 4, 8]),
        (20, [1, 2, 4, 8, 16, 20]),
        (64, [1, 2, 4, 8, 16, 32, 48, 64]),
    ],
)
def test_capture_sizes(max_batch: int, sizes: list[int]) -> None:
    assert capture_sizes(max_batch) == sizes


def _engine() -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model="tiny-qwen3",
            exact=True,  # replay == eager token for token
            attention_backend="triton",
            block_size=4,
            kv_cache_bytes=4 << 20,
            max_num_seqs=6,
            max_num_batched_tokens=64,
        )
    )


def _run(engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    # Arrivals spread over the run, so batches grow and shrink and reuse rows of other sizes.
    pending = list(enumerate(zip(prompts, max_tokens, strict=True)))
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step // 3:
            i, (p, n) = pending.pop(0)
            engine.add_request(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            out[f"r{i}"] = []
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
        step += 1
    return out


def test_decode_graph_replay_matches_eager() -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(4, 512) for _ in range(n)] for n in (5, 9, 17, 3, 12, 7)]
    max_tokens = [6, 11, 3, 9, 14, 8]
    eager = _run(_engine(), prompts, max_tokens)

    engine = _engine()
    runner = engine.runner
    assert runner.graphs is None  # CPU: no graphs unless asked for
    graphs: DecodeGraphs = runner._decode_graphs(EagerGraph)
    graphs.capture()
    runner.graphs = graphs
    replayed: list[tuple[int, int]] = []
    run = graphs.run

    def counting_run(ids, pos, md):
        replayed.append((md.num_reqs, next(s for s in graphs.sizes if s >= md.num_reqs)))
        return run(ids, pos, md)

    graphs.run = counting_run  # type: ignore[method-assign]
    assert _run(engine, prompts, max_tokens) == eager
    assert any(b < size for b, size in replayed), "no step exercised the padding rows"
    assert len({size for _, size in replayed}) >= 3
    assert engine.block_manager.num_free_blocks == engine.runner.num_blocks


def test_padding_rows_are_inert() -> None:
    engine = _engine()
    graphs = engine.runner._decode_graphs(EagerGraph)
    graphs.capture()
    engine.runner.graphs = graphs
    for i, n in enumerate((4, 6, 5)):
        engine.add_request(f"r{i}", list(range(10, 10 + n)), SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()  # the prefills
    engine.step()  # a decode step of 3 requests: graph size 4
    assert graphs.slot_mapping[3].item() == -1
    assert graphs.seq_lens[3].item() == 1
    assert graphs.query_start_loc[:5].tolist() == [0, 1, 2, 3, 4]
    assert all(s > 0 for s in graphs.slot_mapping[:3].tolist())


def test_memory_profiling_forward_stays_in_bounds() -> None:
    # On a GPU the KV budget comes from this forward (one request of a full token budget in a
    # one-block cache); its block table must cover every block the kernel attends over, or the
    # Triton kernel reads past it.
    engine = _engine()
    runner = engine.runner
    md = runner._dummy_metadata(40)
    assert md.block_tables.shape == (1, 10)  # 40 tokens in blocks of 4
    logits = runner._profile_forward()
    assert logits.shape == (6, runner.model_config.vocab_size)  # max_num_seqs rows
    assert bool(logits.isfinite().all())
