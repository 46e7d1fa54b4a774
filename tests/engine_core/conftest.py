"""Random paged batches for the attention tests (TRITON_INTERPRET is set in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from services.engine_core.attention.base import AttentionMetadata


@dataclass
class PagedBatch:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    md: AttentionMetadata
    scale: float


def build_paged_batch(
    query_lens: list[int],
    context_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    pad_rows: int = 0,
    shuffle_blocks: bool = True,
) -> PagedBatch:
    """A step's batch over a NaN-poisoned cache: only each request's cached context (positions
    before context_lens[i]) holds values, so reading any slot it should not (a partial last
    block's tail, a padding or foreign block) turns the output NaN. Blocks are handed out in a
    shuffled order; query/key/value are strided views of one fused qkv tensor, as a model's
    projection gives them. pad_rows extra rows past the batch mimic a CUDA-graph padded batch
    (slot -1, no request)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
    blocks_per_req = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 3  # a few blocks no request owns
    order = torch.randperm(num_blocks, generator=gen).tolist() if shuffle_blocks else list(range(num_blocks))
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_req) + 1, dtype=torch.int32)
    taken = 0
    for i, n in enumerate(blocks_per_req):
        block_tables[i, :n] = torch.tensor(order[taken : taken + n], dtype=torch.int32)
        taken += n

    def slot(i: int, pos: int) -> int:
        return int(block_tables[i, pos // block_size]) * block_size + pos % block_size

    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    v_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    for i, ctx in enumerate(context_lens):
        slots = torch.tensor([slot(i, p) for p in range(ctx)], dtype=torch.int64)
        k_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(ctx, num_kv_heads, head_dim, generator=gen).to(
            dtype
        )
        v_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(ctx, num_kv_heads, head_dim, generator=gen).to(
            dtype
        )

    num_tokens = sum(query_lens)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens + pad_rows, width, generator=gen).to(dtype=dtype, device=device)
    query = qkv[:, : num_heads * head_dim].view(-1, num_heads, head_dim)
    key = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(-1, num_kv_heads, head_dim)
    value = qkv[:, (num_heads + num_kv_heads) * head_dim :].view(-1, num_kv_heads, head_dim)
    slots = [slot(i, p) for i in range(len(seq_lens)) for p in range(context_lens[i], seq_lens[i])] + [-1] * pad_rows
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    md = AttentionMetadata(
        num_reqs=len(seq_lens),
        num_tokens=num_tokens,
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=seq_lens,
    )
    for name in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping"):
        setattr(md, name, getattr(md, name).to(device))
    return PagedBatch(query, key, value, k_cache.to(device), v_cache.to(device), md, head_dim**-0.5)


@pytest.fixture
def paged_batch() -> Callable[..., PagedBatch]:
    return build_paged_batch


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp32 (NaN if out holds any NaN)."""
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.fixture
def relative_error() -> Callable[[torch.Tensor, torch.Tensor], float]:
    return rel_error
