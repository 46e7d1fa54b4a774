"""The torch attention backend against the slow reference, and the reference against plain SDPA."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from services.engine_core.attention import torch_backend
from services.engine_core.attention.torch_backend import TorchAttentionBackend, reference_attention

# (num_heads, num_kv_heads, head_dim): GQA ratios 1, 3 (SmolLM2) and 8.
SHAPES = [(4, 4, 64), (9, 3, 64), (8, 1, 128)]

# Decode rows interleaved with prefill chunks: so the decode rows are not one contiguous range.
# Contexts: block-aligned (32) and partial last blocks; a first-step prompt of one token (context 0,
# a "decode" row with nothing cached); a chunk with no context and chunks after a prefix-cache hit
# (aligned 16 and unaligned 19).
MIXED = ([1, 7, 1, 20, 1, 1, 13, 1], [36, 0, 32, 16, 0, 70, 19, 5])
SPEC = ([4, 1, 9, 2, 1, 11], [36, 70, 19, 150, 0, 0])
"""Speculative decoding: rows verifying drafts (1 + k tokens after a context) among plain decodes."""


def run(batch, backend) -> torch.Tensor:
    backend.write_kv(batch.key, batch.value, batch.k_cache, batch.v_cache, batch.md)
    return backend.forward(batch.query, batch.key, batch.value, batch.k_cache, batch.v_cache, batch.md, batch.scale)


def _attend_gqa(paged_batch, relative_error, dtype, tol, query_lens, context_lens, shuffle) -> TorchAttentionBackend:
    """Attend a 9-query-head, 3-KV-head batch; check it against the reference; return the backend (its plan)."""
    batch = paged_batch(
        query_lens, context_lens, num_heads=9, num_kv_heads=3, head_dim=64, dtype=dtype, shuffle_blocks=shuffle
    )
    backend = TorchAttentionBackend()
    out = run(batch, backend)
    ref = reference_attention(batch.query, batch.k_cache, batch.v_cache, batch.md, batch.scale)
    assert relative_error(out, ref) < tol
    return backend


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("lens", [MIXED, SPEC], ids=["mixed", "spec"])
def test_mixed_batch_matches_reference(paged_batch, relative_error, shape, dtype, tol, lens):
    num_heads, num_kv, head_dim = shape
    batch = paged_batch(*lens, num_heads=num_heads, num_kv_heads=num_kv, head_dim=head_dim, dtype=dtype)
    out = run(batch, TorchAttentionBackend())
    ref = reference_attention(batch.query, batch.k_cache, batch.v_cache, batch.md, batch.scale)
    assert relative_error(out, ref) < tol


def test_decode_groups_by_length_and_budget(paged_batch, relative_error, monkeypatch):
    # One long context among short ones, and a budget small enough to split equal-length rows too.
    monkeypatch.setattr(torch_backend, "_DECODE_GROUP_TOKENS", 400)
    lens = [300, 3, 40, 150, 151, 160, 17, 64]
    assert torch_backend._group_decodes(list(range(len(lens))), lens) == [[0], [5, 4], [3], [7, 2], [6], [1]]
    batch = paged_batch([1] * len(lens), [n - 1 for n in lens], num_heads=9, num_kv_heads=3, head_dim=64, seed=1)
    out = run(batch, TorchAttentionBackend())
    ref = reference_attention(batch.query, batch.k_cache, batch.v_cache, batch.md, batch.scale)
    assert relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(
    "context_lens, shuffle, path",
    [
        ([40], False, "block_range"),  # one stream on consecutive blocks: read in place
        ([40], True, "blocks"),
        ([31, 31, 31], False, "blocks"),  # equal lengths: whole blocks, no mask
        ([15, 15, 15, 15], True, "blocks"),  # context ends on a block boundary
        ([31, 20, 31], True, "slots"),  # different lengths: padded slots and a mask
    ],
)
def test_pure_decode_paths(paged_batch, relative_error, dtype, tol, context_lens, shuffle, path):
    n = len(context_lens)
    batch = paged_batch(
        [1] * n, context_lens, num_heads=9, num_kv_heads=3, head_dim=64, dtype=dtype, shuffle_blocks=shuffle
    )
    backend = TorchAttentionBackend()
    out = run(batch, backend)
    ref = reference_attention(batch.query, batch.k_cache, batch.v_cache, batch.md, batch.scale)
    assert relative_error(out, ref) < tol
    assert backend._plan is not None
    (group,) = backend._plan.decode_groups
    assert getattr(group, path) is not None
    # Equal lengths keep the step's row order, so the query and output are used as they are.
    assert (group.rows is None) == (path != "slots")


def test_plan_is_reused_across_layers_and_rebuilt_per_step(paged_batch, relative_error):
    backend = TorchAttentionBackend()
    for step, shape in enumerate((MIXED, ([1, 1, 3], [4, 50, 0]))):
        first = paged_batch(*shape, num_heads=9, num_kv_heads=3, head_dim=64, seed=step)
        # A second layer: same metadata object (as every layer of a step), other values (NaN stays NaN).
        second = dataclasses.replace(
            first, **{name: getattr(first, name) * -2 + 0.5 for name in ("query", "key", "value", "k_cache", "v_cache")}
        )
        for layer in (first, second):
            out = run(layer, backend)
            ref = reference_attention(layer.query, layer.k_cache, layer.v_cache, layer.md, layer.scale)
            assert relative_error(out, ref) < 1e-5


def test_write_kv_stores_at_slots(paged_batch):
    batch = paged_batch(*MIXED, num_heads=9, num_kv_heads=3, head_dim=64)
    TorchAttentionBackend().write_kv(batch.key, batch.value, batch.k_cache, batch.v_cache, batch.md)
    slots = batch.md.slot_mapping
    assert torch.equal(batch.k_cache.view(-1, 3, 64)[slots], batch.key)
    assert torch.equal(batch.v_cache.view(-1, 3, 64)[slots], batch.value)


@pytest.mark.parametrize("num_heads, num_kv", [(4, 4), (6, 2)])
def test_reference_matches_dense_causal_sdpa(paged_batch, relative_error, num_heads, num_kv):
    # Two fresh prompts: the reference over the paged cache must equal dense causal attention.
    batch = paged_batch([23, 9], [0, 0], num_heads=num_heads, num_kv_heads=num_kv, head_dim=64)
    TorchAttentionBackend().write_kv(batch.key, batch.value, batch.k_cache, batch.v_cache, batch.md)
    ref = reference_attention(batch.query, batch.k_cache, batch.v_cache, batch.md, batch.scale)
    for rows in (slice(0, 23), slice(23, 32)):
        dense = F.scaled_dot_product_attention(
            batch.query[rows].transpose(0, 1),
            batch.key[rows].transpose(0, 1).repeat_interleave(num_heads // num_kv, 0),
            batch.value[rows].transpose(0, 1).repeat_interleave(num_heads // num_kv, 0),
            is_causal=True,
            scale=batch.scale,
        ).transpose(0, 1)
        assert relative_error(ref[rows], dense) < 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(
    "query_lens, context_lens, shuffle, path",
    [
        ([5], [40], False, "block_range"),  # one stream verifying 4 drafts, consecutive blocks: in place
        ([5], [40], True, "blocks"),
        ([3, 3, 3], [31, 31, 31], True, "blocks"),  # equal contexts: whole blocks, no padding
        ([9, 9, 9], [31, 20, 15], True, "slots"),  # different contexts: padded slots, masked
        ([16, 16], [0, 0], False, "blocks"),  # short prompts with nothing cached: causal over themselves
    ],
)
def test_short_rows_are_attended_in_groups(
    paged_batch, relative_error, dtype, tol, query_lens, context_lens, shuffle, path
):
    """Rows of a few tokens (verifications) go through one grouped call per query length."""
    backend = _attend_gqa(paged_batch, relative_error, dtype, tol, query_lens, context_lens, shuffle)
    assert backend._plan is not None and not backend._plan.chunks
    (group,) = backend._plan.decode_groups
    assert group.q_len == query_lens[0] and getattr(group, path) is not None
    assert group.rows is None  # the whole step: query and output used in place


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_short_rows_of_several_lengths_beside_chunks(paged_batch, relative_error, dtype, tol, shuffle):
    """A group per query length (plain decodes, verifications of 2 and 8 drafts) among long
    prefill chunks, rows interleaved."""
    query_lens = [3, 1, 9, 20, 3, 1, 17, 9]
    context_lens = [31, 20, 16, 40, 70, 5, 0, 31]
    backend = _attend_gqa(paged_batch, relative_error, dtype, tol, query_lens, context_lens, shuffle)
    assert backend._plan is not None
    assert {g.q_len for g in backend._plan.decode_groups} == {1, 3, 9}
    assert sorted(c.q_len for c in backend._plan.chunks) == [17, 20]
    if not shuffle:
        assert all(c.block_range is not None for c in backend._plan.chunks if c.mask is not None)
