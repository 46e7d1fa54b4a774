"""The exact mode's batch-invariant attention: right, and every row's bits those of a lone decode."""

from __future__ import annotations

import pytest
import torch

from services.engine_core.attention.base import AttentionMetadata
from services.engine_core.attention.batch_invariant import BatchInvariantTorchBackend
from services.engine_core.attention.torch_backend import reference_attention
from tests.engine_core.test_torch_attention import MIXED, SPEC, run


def _lone_decode_md(md: AttentionMetadata, i: int, seq_len: int) -> AttentionMetadata:
    """Request i's query at context length seq_len as a one-row step of its own."""
    return AttentionMetadata(
        num_reqs=1,
        num_tokens=1,
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        seq_lens=torch.tensor([seq_len], dtype=torch.int32),
        block_tables=md.block_tables[i : i + 1],
        slot_mapping=torch.zeros(1, dtype=torch.long),
        max_query_len=1,
        max_seq_len=seq_len,
        query_lens_cpu=[1],
        seq_lens_cpu=[seq_len],
    )


@pytest.mark.parametrize(
    "lens",
    [MIXED, SPEC, ([1, 1, 1, 5], [300, 3, 40, 150]), ([1, 1, 1], [31, 31, 31])],
    ids=["mixed", "spec", "padded-decodes", "equal-decodes"],
)
@pytest.mark.parametrize("shuffle", [False, True])
def test_batch_invariant_rows_equal_lone_decodes(paged_batch, relative_error, lens, shuffle):
    """The exact mode: every row's output is, to the bit, that of the same query decoded alone
    over its context, whether it sits in a prefill chunk, a verification row or a padded batch."""
    batch = paged_batch(*lens, num_heads=9, num_kv_heads=3, head_dim=64, shuffle_blocks=shuffle)
    backend = BatchInvariantTorchBackend()
    out = run(batch, backend)
    ref = reference_attention(batch.query, batch.k_cache, batch.v_cache, batch.md, batch.scale)
    assert relative_error(out, ref) < 1e-5
    row = 0
    for i, (q_len, context) in enumerate(zip(*lens, strict=True)):
        for j in range(q_len):
            md = _lone_decode_md(batch.md, i, context + j + 1)
            q = batch.query[row : row + 1]
            lone = BatchInvariantTorchBackend().forward(q, None, None, batch.k_cache, batch.v_cache, md, batch.scale)
            assert torch.equal(out[row], lone[0]), (i, j)
            row += 1
