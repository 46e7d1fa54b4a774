"""The compiled CPU decode path (--compile-decode): the same step as eager up to rounding, padding
rows that touch no cache, and an engine that serves with it."""

from __future__ import annotations

import pytest
import torch

from services.engine_core.attention.base import AttentionMetadata
from services.engine_core.engine import LLMEngine
from services.engine_core.model_runner import ModelRunner
from shared.config import EngineConfig
from shared.protocol import SamplingParams


def _config(tmp_path, **extra) -> EngineConfig:
    return EngineConfig(
        model="tiny-qwen3",
        block_size=4,
        kv_cache_bytes=4 << 20,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        compile_decode=True,
        dtype="float32",  # the tolerance below is float32's (the CPU default may be bf16)
        cache_dir=str(tmp_path),
        **extra,
    )


def _decode_step(contexts: list[int], block_size: int, blocks_each: int = 8) -> tuple[torch.Tensor, ...]:
    """Request i decodes its token at position contexts[i], on blocks i*blocks_each onwards."""
    n = len(contexts)
    table = torch.arange(n * blocks_each, dtype=torch.int32).view(n, blocks_each)
    pos = torch.tensor(contexts)
    slots = table[torch.arange(n), pos // block_size].long() * block_size + pos % block_size
    md = AttentionMetadata(
        num_reqs=n,
        num_tokens=n,
        query_start_loc=torch.arange(n + 1, dtype=torch.int32),
        seq_lens=(pos + 1).int(),
        block_tables=table,
        slot_mapping=slots,
        max_query_len=1,
        max_seq_len=max(contexts) + 1,
        query_lens_cpu=[1] * n,
        seq_lens_cpu=[c + 1 for c in contexts],
    )
    return torch.tensor([7, 99, 300][:n]), pos, md  # type: ignore[return-value]


@pytest.mark.parametrize("quantization", ["none", "int4"])
@torch.inference_mode()
def test_compiled_step_matches_eager(tmp_path, quantization: str) -> None:
    runner = ModelRunner(_config(tmp_path, quantization=quantization))
    assert runner.compiled is not None and runner.compiled.sizes == [1, 2, 4]
    torch.manual_seed(0)
    for k, v in runner.kv_caches:
        k.normal_()
        v.normal_()
    ids, pos, md = _decode_step([5, 17, 2], runner.block_size)  # 3 requests: size 4, one padding row
    assert runner.compiled.can_run(md)
    before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    compiled = runner.forward(ids, pos, md).clone()
    written = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    eager = runner.model(ids, pos, runner.kv_caches, md, runner.backend)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    # The padding row wrote nothing: only the three requests' slots changed.
    for (k0, v0), (k1, v1) in zip(before, written, strict=True):
        changed = ((k0 != k1) | (v0 != v1)).flatten(2).any(-1).flatten().nonzero().flatten()
        assert sorted(changed.tolist()) == sorted(md.slot_mapping.tolist())


def test_engine_serves_with_compiled_decode(tmp_path) -> None:
    engine = LLMEngine(_config(tmp_path))
    runner = engine.runner
    assert runner.compiled is not None
    sizes: list[tuple[int, int]] = []
    run = runner.compiled.run

    def counting_run(ids, pos, kv_caches, md):
        sizes.append((md.num_reqs, next(s for s in runner.compiled.sizes if s >= md.num_reqs)))
        return run(ids, pos, kv_caches, md)

    runner.compiled.run = counting_run  # type: ignore[method-assign]
    out: dict[str, list[int]] = {}
    for i, n in enumerate((5, 9, 3)):
        engine.add_request(f"r{i}", list(range(10, 10 + n)), SamplingParams(max_tokens=6, ignore_eos=True))
        out[f"r{i}"] = []
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    assert all(len(t) == 6 for t in out.values())
    assert (3, 4) in sizes  # three requests ran padded to the size-4 graph
    assert engine.block_manager.num_free_blocks == runner.num_blocks
