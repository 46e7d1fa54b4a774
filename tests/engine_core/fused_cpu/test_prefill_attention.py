"""The fused step's prefill attention kernel (fused_cpu/csrc/prefill_attention.h): against the
fp32 reference within bf16 tolerance (GQA shapes, chunks after a cached prefix, chunks of one
row, contexts across key blocks, any block size), and invariant to the bit: a prompt's rows get
the same output however the prompt is cut into chunks, whatever else shares the call, and at
any thread count (what keeps a prompt's K/V and first token independent of the scheduler,
test_mixed.py)."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
from types import ModuleType

import pytest
import torch

from services.engine_core.attention.torch_backend import reference_attention
from tests.engine_core.conftest import rel_error
from tests.engine_core.fused_cpu.test_kernels import cached_step

I32 = torch.int32


def prefill(
    ext: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor, q_lens: list[int],
    seq_lens: list[int], scale: float,
) -> torch.Tensor:  # fmt: skip
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=I32)
    return ext.prefill_attention(q, k, v, tables, starts, torch.tensor(seq_lens, dtype=I32), scale)


@pytest.mark.parametrize("n_heads, n_kv, d", [(9, 3, 64), (4, 2, 16), (8, 8, 128), (4, 1, 32), (6, 2, 40)])
@pytest.mark.parametrize(
    "query_lens, context_lens",
    [
        ([1], [0]),
        ([40], [0]),  # one chunk: the first key block on the diagonal for every row
        ([1], [700]),  # a chunk of one row, deep into a prompt
        ([17, 100, 3], [0, 33, 1000]),  # chunks after cached prefixes, across key blocks
        ([300], [1100]),
    ],
)
def test_against_fp32_reference(
    ext: ModuleType, n_heads: int, n_kv: int, d: int, query_lens: list[int], context_lens: list[int]
) -> None:
    """Over a NaN-poisoned paged cache with shuffled blocks: reading a slot outside a request's
    context would turn its rows NaN."""
    q, k_cache, v_cache, md, scale = cached_step(query_lens, context_lens, n_heads, n_kv, d)
    ref = reference_attention(q, k_cache.float(), v_cache.float(), md, scale)
    out = ext.prefill_attention(q, k_cache, v_cache, md.block_tables, md.query_start_loc, md.seq_lens, scale)
    assert out.shape == (sum(query_lens), n_heads * d) and out.dtype == torch.bfloat16
    for r in range(md.num_reqs):  # per request: a short one's error is not hidden by a long one's
        rows = slice(int(md.query_start_loc[r]), int(md.query_start_loc[r + 1]))
        assert rel_error(out.view_as(ref)[rows], ref[rows]) < 1e-2, f"request {r}"


@pytest.mark.parametrize("block_size", [1, 5, 32, 256])
def test_any_block_size(ext: ModuleType, block_size: int) -> None:
    q, k_cache, v_cache, md, scale = cached_step([3, 1, 70], [300, 40, 0], 9, 3, 64, block_size=block_size)
    ref = reference_attention(q, k_cache.float(), v_cache.float(), md, scale)
    out = ext.prefill_attention(q, k_cache, v_cache, md.block_tables, md.query_start_loc, md.seq_lens, scale)
    assert rel_error(out.view_as(ref), ref) < 1e-2


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


PROMPT = 1100


@pytest.fixture(scope="module")
def prompt() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """A 1100-token prompt's q and its K/V in a shuffled paged cache (9 heads, 3 KV heads, 64)."""
    q, k_cache, v_cache, md, scale = cached_step([PROMPT], [0], 9, 3, 64, seed=5)
    return q, k_cache, v_cache, md.block_tables[:1], scale


@pytest.mark.parametrize(
    "cuts",
    [
        [300, 700],
        [1, 2, 33, 64, 65, 1099],  # chunks of one row, cuts on and off key-block and tile boundaries
        [17 * i for i in range(1, 65)],
    ],
)
def test_rows_independent_of_chunking(
    ext: ModuleType, prompt: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], cuts: list[int],
    threads: int,
) -> None:  # fmt: skip
    """The prompt in one chunk at 2 threads, against the prompt cut at `cuts` (each chunk a
    request attending to what precedes it, all in one call) at 1 or 2 threads: the same bits."""
    q, k_cache, v_cache, table, scale = prompt
    torch.set_num_threads(2)
    whole = prefill(ext, q, k_cache, v_cache, table, [PROMPT], [PROMPT], scale)
    torch.set_num_threads(threads)
    bounds = [0, *cuts, PROMPT]
    lens = [b - a for a, b in pairwise(bounds)]
    chunked = prefill(ext, q, k_cache, v_cache, table.expand(len(lens), -1), lens, bounds[1:], scale)
    assert torch.equal(chunked, whole)


def test_rows_independent_of_other_requests(
    ext: ModuleType, prompt: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]
) -> None:
    """The prompt's last 400 rows alone, and beside other requests' chunks before and after it."""
    q, k_cache, v_cache, table, scale = prompt
    alone = prefill(ext, q[700:], k_cache, v_cache, table, [400], [PROMPT], scale)
    others = [(0, 50), (200, 201), (900, 1000)]  # other chunks of the same cache, as other requests
    rows = torch.cat([q[a:b] for a, b in others[:2]] + [q[700:]] + [q[a:b] for a, b in others[2:]])
    lens = [b - a for a, b in others[:2]] + [400] + [b - a for a, b in others[2:]]
    seq = [b for _, b in others[:2]] + [PROMPT] + [b for _, b in others[2:]]
    out = prefill(ext, rows.contiguous(), k_cache, v_cache, table.expand(4, -1), lens, seq, scale)
    first = sum(lens[:2])
    assert torch.equal(out[first : first + 400], alone)
