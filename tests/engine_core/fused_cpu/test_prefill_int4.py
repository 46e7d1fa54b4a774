"""Prefill rows on the int4 copies in the fused CPU step (FusedDecode.prefill_int4, the default
without AMX: models/int4.py fused_prefill_int4): a prompt row's bits are what the int4 kernel
gives that row alone, so its K/V do not depend on how the prompt is chunked or on what shares
its steps, with the decode rows on the int4 copies (one call over all rows) or on the dense
weights (more decoding requests than the int4 copies serve: separate calls). test_mixed.py
checks chunking on both prefill paths; this checks the int4 path against the kernel row by row
and beside dense decode rows."""

from __future__ import annotations

import random
from types import ModuleType

import pytest
import torch

from services.engine_core.attention.base import AttentionMetadata
from services.engine_core.fused_cpu.decode import FusedDecode
from services.engine_core.model_runner import ModelRunner
from services.engine_core.models import int4
from shared.config import EngineConfig
from tests.engine_core.fused_cpu.test_decode import _prefilled
from tests.engine_core.fused_cpu.test_mixed import (
    _prefill_in_chunks,
    assert_prompt_kv_equal,
    mixed_step,
    random_tokens,
    step_tokens,
)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the fused path is the CPU default's")


@pytest.fixture(scope="module")
def runner(ext: ModuleType) -> ModelRunner:
    """The default mode on the bundled model (a 4-bit GGUF: int4 copies)."""
    runner = ModelRunner(EngineConfig(kv_cache_bytes=64 << 20, max_num_seqs=16))
    assert isinstance(runner.fused, FusedDecode) and runner.fused.int4
    return runner


def test_prefill_rows_on_int4_by_policy(runner: ModelRunner) -> None:
    fused = runner.fused
    assert fused is not None
    assert fused.prefill_int4 == int4.fused_prefill_int4(runner.model.layers[0].qkv_weight.dtype)


def _prompt_step(
    runner: ModelRunner, prompt: list[int]
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, AttentionMetadata]:
    """A fresh KV cache and the step that prefills `prompt` in one chunk from position 0
    (blocks 0.., token i in slot i): (caches, positions, metadata)."""
    n = len(prompt)
    blocks = -(-n // runner.block_size)
    md = AttentionMetadata(
        num_reqs=1,
        num_tokens=n,
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=torch.arange(blocks, dtype=torch.int32)[None],
        slot_mapping=torch.arange(n),
        max_query_len=n,
        max_seq_len=n,
        query_lens_cpu=[n],
        seq_lens_cpu=[n],
        num_prefill_reqs=1,
    )
    return runner._allocate_kv_cache(blocks), torch.arange(n), md


@torch.inference_mode()
@pytest.mark.parametrize("prefill_int4", [True, False])
def test_first_layer_kv_is_the_int4_kernels_row_by_row(
    runner: ModelRunner, ext: ModuleType, monkeypatch: pytest.MonkeyPatch, prefill_int4: bool
) -> None:
    """The first layer's K/V of a 150-token prompt prefilled in one step: with prefill_int4, bit
    for bit the int4 kernel's q|k|v of each row alone (ext.int4_matmul on one row), RoPE'd and
    written by the step's own kernels; on the dense weights, other bits (the switch takes effect)."""
    fused = runner.fused
    assert isinstance(fused, FusedDecode)
    monkeypatch.setattr(fused, "prefill_int4", prefill_int4)
    prompt = random_tokens(150, random.Random(5))
    caches, pos, md = _prompt_step(runner, prompt)
    fused.run(torch.tensor(prompt), pos, caches, md)

    model, layer = runner.model, runner.model.layers[0]
    h = model.embed[torch.tensor(prompt)].float()
    x = ext.add_rms_norm(h, None, layer.attn_norm, layer.eps)
    packed, scales_zeros = fused.int4["qkv"][0]
    qkv = torch.cat([ext.int4_matmul(x[i : i + 1].contiguous(), packed, scales_zeros) for i in range(len(prompt))])
    k_ref, v_ref = torch.zeros_like(caches[0][0]), torch.zeros_like(caches[0][1])
    ext.rope_write_kv(
        qkv, layer.qkv_bias, layer.q_norm, layer.k_norm, layer.eps, pos, model.rope_cos, model.rope_sin,
        md.slot_mapping, model.cfg.num_heads, k_ref, v_ref,
    )  # fmt: skip
    n_kv, d = k_ref.shape[2:]
    n = len(prompt)
    same = all(
        torch.equal(c.view(-1, n_kv, d)[:n], r.view(-1, n_kv, d)[:n])
        for c, r in zip(caches[0], (k_ref, v_ref), strict=True)
    )
    assert same == prefill_int4


@torch.inference_mode()
@pytest.mark.parametrize(("length", "chunks"), [(300, [1, 37, 130, 132]), (700, [650, 1, 49])])
def test_prompt_kv_independent_of_chunking_beside_dense_decodes(
    runner: ModelRunner, monkeypatch: pytest.MonkeyPatch, length: int, chunks: list[int]
) -> None:
    """With the decode rows on the dense weights (more decoding requests than the int4 copies
    serve: here the cut-off lowered to 1) and the prefill rows on int4, a prompt prefilled in
    chunks beside two decoding requests has the K/V and last row of the prompt prefilled alone in
    one step."""
    fused = runner.fused
    assert isinstance(fused, FusedDecode)
    monkeypatch.setattr(fused, "prefill_int4", True)
    monkeypatch.setattr(fused, "int4_max_requests", 1)
    others = [40, 7]
    caches, md0, next_ids, _ = _prefilled(runner, [1, *others], room=length + 10)
    lone_caches = [(k.clone(), v.clone()) for k, v in caches]
    prompt = random_tokens(length, random.Random(2))
    lone = _prefill_in_chunks(runner, lone_caches, md0, next_ids, prompt, [length], [], 3)
    last = _prefill_in_chunks(runner, caches, md0, next_ids, prompt, chunks, others, 4)
    assert torch.equal(last, lone)
    assert_prompt_kv_equal(runner, md0, length, caches, lone_caches)


@torch.inference_mode()
@pytest.mark.parametrize("int4_max_requests", [1, 64])
def test_decode_rows_unchanged_by_int4_prefill(
    runner: ModelRunner, monkeypatch: pytest.MonkeyPatch, int4_max_requests: int
) -> None:
    """The decode and draft rows of a step beside an int4 prefill chunk are bit for bit those of
    the same step without it, on the dense weights (cut-off 1: separate calls) or on int4 (one
    call over all rows)."""
    fused = runner.fused
    assert isinstance(fused, FusedDecode)
    monkeypatch.setattr(fused, "prefill_int4", True)
    monkeypatch.setattr(fused, "int4_max_requests", int4_max_requests)
    contexts, drafts, chunks = [30, 200, 500], [4, 0, -1], [0, 0, 300]
    caches, md0, next_ids, _ = _prefilled(runner, contexts, room=max(chunks) + 1 + max(drafts))
    alone_caches = [(k.clone(), v.clone()) for k, v in caches]
    tokens = step_tokens(next_ids, drafts, chunks, random.Random(1))
    ids, pos, md = mixed_step(md0.block_tables, contexts, tokens, drafts, runner.block_size)
    ids_a, pos_a, md_a = mixed_step(md0.block_tables[:2], contexts[:2], tokens[:2], drafts[:2], runner.block_size)
    assert fused.uses_int4(md) == (int4_max_requests >= 2)
    hidden = fused.run(ids, pos, caches, md)
    alone = fused.run(ids_a, pos_a, alone_caches, md_a)
    assert torch.equal(hidden[: md_a.num_tokens], alone)
