"""Row invariance of every kernel a fused CPU step runs: a row's result is bit-identical whatever
the other rows of the call are and however many there are. Together these make a fused step's
row the same bits as a lone decode of that token (test_verify.py), so verifying drafts there
does not change greedy output. The dense matmul (oneDNN's bf16, MKL's fp32) is not row-invariant,
which is why a step picks its weights by its number of requests, not rows, and multiplies dense
rows in calls the start-up probes found row-invariant (fused_cpu/decode.py).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest
import torch

from services.engine_core.attention.base import AttentionMetadata
from services.engine_core.attention.torch_backend import reference_attention
from services.engine_core.fused_cpu.decode import dense_call, dense_calls, padded_rows
from services.engine_core.fused_cpu.int4_matmul import repack
from services.engine_core.models.int4 import Int4Weight
from services.engine_core.models.int8 import Int8Weight
from tests.engine_core.conftest import rel_error
from tests.engine_core.fused_cpu.test_kernels import cached_step, paged, rope_inputs, rope_tables

BF16 = torch.bfloat16


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_row_invariant(f: Callable[[slice], torch.Tensor], n: int) -> None:
    """f(rows), a kernel's output for the given rows of its inputs, is f(all n rows)[rows] to the
    bit for every prefix and suffix of the n rows."""
    full = f(slice(0, n))
    for m in range(1, n + 1):
        for rows in (slice(0, m), slice(n - m, n)):
            assert torch.equal(f(rows), full[rows]), f"rows {rows.start}:{rows.stop} of {n}"


def rows_of(kernel: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[slice], torch.Tensor]:
    return lambda rows: kernel(x[rows].contiguous())


@pytest.mark.parametrize("out_features, in_features", [(960, 576), (3072, 576), (576, 1536), (128, 64)])
def test_torch_int4_matmul(out_features: int, in_features: int) -> None:
    """torch's _weight_int4pack_mm_for_cpu (the eager path's int4 kernel), SmolLM2's four layer
    shapes and a tiny one: up to 72 rows (8 requests verifying 8 drafts each)."""
    weight = Int4Weight.quantize(randn(out_features, in_features).to(BF16))
    assert_row_invariant(rows_of(weight, randn(72, in_features, seed=1).to(BF16)), 72)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "out_features, in_features", [(960, 576), (576, 576), (3072, 576), (576, 1536), (80, 64), (80, 96)]
)
def test_int4_matmul(ext: ModuleType, out_features: int, in_features: int, threads: int) -> None:
    """The fused step's int4 matmul (csrc/int4_matmul.h: int8 activations), SmolLM2's layer shapes
    and tiny ones with a partial unit (80 columns: 5 vectors; K = 96: 3 groups, not a multiple of
    64), at 1..80 rows (every row blocking: blocks of up to 3 rows on AVX-512) and 1 and 2 threads:
    every row its lone bits, the same at either count."""
    packed, scales_zeros = repack(Int4Weight.quantize(randn(out_features, in_features).to(BF16)))
    x = randn(80, in_features, seed=1).to(BF16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lone = torch.cat([ext.int4_matmul(x[i : i + 1], packed, scales_zeros) for i in range(80)])
        assert_row_invariant(lambda rows: ext.int4_matmul(x[rows].contiguous(), packed, scales_zeros), 80)
        assert torch.equal(ext.int4_matmul(x, packed, scales_zeros), lone)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(ext.int4_matmul(x, packed, scales_zeros), lone), "another thread count, other bits"


def test_int8_lm_head() -> None:
    """The int8 LM head (oneDNN's u8 x s8 matmul, integer accumulation, a scale per row) over its
    whole range of rows (models/int8.py MAX_ROWS)."""
    head = Int8Weight.quantize(randn(4096, 576))
    assert_row_invariant(rows_of(head, randn(head.max_rows, 576, seed=1).to(BF16)), head.max_rows)


def test_add_rms_norm_and_silu_mul(ext: ModuleType) -> None:
    weight = (1 + 0.1 * randn(576, seed=3)).to(BF16)
    h, delta = 100 * randn(40, 576, seed=1), randn(40, 576, seed=2).to(BF16)
    for with_delta in (False, True):

        def norm(rows: slice, with_delta: bool = with_delta) -> torch.Tensor:
            return ext.add_rms_norm(h[rows].clone(), delta[rows].contiguous() if with_delta else None, weight, 1e-5)

        assert_row_invariant(norm, 40)
    assert_row_invariant(rows_of(ext.silu_mul, (3 * randn(40, 2 * 1536, seed=4)).to(BF16)), 40)


@pytest.mark.parametrize("variant", ["llama", "qwen2-bias", "qwen3-qk-norm"])
def test_rope_write_kv(ext: ModuleType, variant: str) -> None:
    """q (returned) and the k and v written to the cache."""
    n_heads, n_kv, d, bs, n = 9, 3, 64, 16, 40
    qkv, bias, q_norm, k_norm = rope_inputs(n, n_heads, n_kv, d, variant)
    cos, sin = rope_tables(1000, d)
    positions = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(5))
    slots = torch.randperm(4 * n, generator=torch.Generator().manual_seed(6))[:n]

    def rope(rows: slice) -> torch.Tensor:
        k_cache = torch.zeros(4 * n // bs, bs, n_kv, d, dtype=BF16)
        v_cache = torch.zeros_like(k_cache)
        q = ext.rope_write_kv(
            qkv[rows].contiguous(), bias, q_norm, k_norm, 1e-6, positions[rows].contiguous(), cos, sin,
            slots[rows].contiguous(), n_heads, k_cache, v_cache,
        )  # fmt: skip
        written = torch.cat((k_cache.view(-1, n_kv * d), v_cache.view(-1, n_kv * d)), dim=1)[slots[rows]]
        return torch.cat((q.view(q.shape[0], -1), written.float()), dim=1)

    assert_row_invariant(rope, n)


def single(md: AttentionMetadata, r: int, seq_len: int, q_len: int = 1) -> AttentionMetadata:
    """Request r of md alone, with q_len rows ending at position seq_len - 1 (same cache)."""
    return AttentionMetadata(
        num_reqs=1,
        num_tokens=q_len,
        query_start_loc=torch.tensor([0, q_len], dtype=torch.int32),
        seq_lens=torch.tensor([seq_len], dtype=torch.int32),
        block_tables=md.block_tables[r : r + 1].clone(),
        slot_mapping=torch.zeros(q_len, dtype=torch.int64),
        max_query_len=q_len,
        max_seq_len=seq_len,
        query_lens_cpu=[q_len],
        seq_lens_cpu=[seq_len],
    )


def test_paged_attention_decode_rows(ext: ModuleType) -> None:
    """A decode row alone, and among rows of other requests with shorter and far longer contexts,
    and at one thread: the fixed KV splits give it the same bits."""
    lens = [700, 1, 31, 2100, 64, 129, 300, 5]
    q, k_cache, v_cache, md, scale = cached_step([1] * len(lens), lens, 9, 3, 64)
    full = paged(ext, q, k_cache, v_cache, md, scale)
    for i in range(len(lens)):
        for rows in ([i], [i, (i + 3) % len(lens)], list(range(i, len(lens)))):
            index = torch.tensor(rows)
            out = ext.paged_attention(
                q[index].contiguous(), k_cache, v_cache, md.block_tables[index],
                torch.arange(len(rows) + 1, dtype=torch.int32), md.seq_lens[index], scale,
            )  # fmt: skip
            assert torch.equal(out[0], full[i]), (i, rows)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(paged(ext, q, k_cache, v_cache, md, scale), full)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("n_heads, n_kv, d", [(9, 3, 64), (6, 3, 128)])
def test_paged_attention_verify_rows_equal_decode_rows(ext: ModuleType, n_heads: int, n_kv: int, d: int) -> None:
    """Every row of a verify group (a decode row and its drafts: consecutive positions of one
    request, sharing each KV read), in a step mixed with other requests, gets exactly the bits a
    lone decode row at its position gets from the same cache. A work item takes all of a split's
    KV heads (3 x 128: groups of 2 and 1) where a step has splits enough for the threads, else
    one KV head (a lone short request at 2 threads): the same bits either way."""
    query_lens, contexts = [9, 1, 4, 17], [250, 900, 0, 1020]  # groups across split boundaries
    q, k_cache, v_cache, md, scale = cached_step(query_lens, contexts, n_heads, n_kv, d, seed=7)
    step = paged(ext, q, k_cache, v_cache, md, scale)
    for r, (q_len, ctx) in enumerate(zip(query_lens, contexts, strict=True)):
        start = int(md.query_start_loc[r])
        for j in range(q_len):
            row = start + j
            decode = paged(ext, q[row : row + 1], k_cache, v_cache, single(md, r, ctx + j + 1), scale)
            assert torch.equal(decode, step[row : row + 1]), f"request {r}, row {j}"
        # Alone, a short request's rows are dealt out over several work items (as many as the
        # threads want); at 1 thread, over fewer.
        group = paged(ext, q[start : start + q_len], k_cache, v_cache, single(md, r, ctx + q_len, q_len), scale)
        assert torch.equal(group, step[start : start + q_len]), f"request {r} alone"
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            group = paged(ext, q[start : start + q_len], k_cache, v_cache, single(md, r, ctx + q_len, q_len), scale)
        finally:
            torch.set_num_threads(before)
        assert torch.equal(group, step[start : start + q_len]), f"request {r} alone, 1 thread"


@pytest.mark.parametrize(
    "n_heads, n_kv, d",
    # G = 3, 5, 8, 1 query heads a KV head; d = 40: 5 vectors (a block of 2 and a single vector
    # left over on AVX2), 16: 2 vectors, 128: 16
    [(9, 3, 64), (5, 1, 64), (16, 2, 64), (4, 4, 128), (10, 2, 40), (3, 3, 16)],
)
@pytest.mark.parametrize("drafts", [1, 3, 8])
def test_paged_attention_register_blocks(ext: ModuleType, n_heads: int, n_kv: int, d: int, drafts: int) -> None:
    """The micro-kernels' register blocks of query heads (a verify group's 1 + k rows x G heads
    of a KV head, 6 a block on AVX2 and 8 or 4 on AVX-512, the chunk's last heads in smaller
    blocks with more key or value vectors each) x vectors of keys or dimensions: every row of a
    verify group, whatever block its heads fall in, gets exactly the bits a lone decode row at
    its position gets. Groups end at every kind of position: in a 16-token block and a 32-token
    chunk, on their boundaries, across a 128-token split."""
    contexts = [0, 14, 15, 16, 31, 32, 33, 120, 127, 128, 250, 517]
    q_len = 1 + drafts
    q, k_cache, v_cache, md, scale = cached_step([q_len] * len(contexts), contexts, n_heads, n_kv, d, seed=d + drafts)
    ref = reference_attention(q, k_cache.float(), v_cache.float(), md, scale)
    step = paged(ext, q, k_cache, v_cache, md, scale)
    for r, ctx in enumerate(contexts):
        rows = slice(r * q_len, (r + 1) * q_len)
        assert rel_error(step.view_as(ref)[rows], ref[rows]) < 1e-2, f"context {ctx}"
        for j in range(q_len):
            row = rows.start + j
            decode = paged(ext, q[row : row + 1], k_cache, v_cache, single(md, r, ctx + j + 1), scale)
            assert torch.equal(decode, step[row : row + 1]), f"context {ctx}, row {j}"


DENSE_DTYPES = [BF16, torch.float32]
"""The fused step's dense weights: bf16 where the CPU has native bf16, fp32 elsewhere."""


@pytest.mark.parametrize("dtype", DENSE_DTYPES)
@pytest.mark.parametrize("out_features, in_features", [(960, 576), (3072, 576), (576, 1536), (128, 64)])
def test_dense_matmul_in_row_invariant_chunks(
    ext: ModuleType, out_features: int, in_features: int, dtype: torch.dtype
) -> None:
    """The step's dense matmul (csrc/dense_matmul.h: oneDNN's bf16 matmul, or MKL's fp32 one on
    bf16 rows) in calls of up to the probed chunk, each padded to the probed multiple of rows
    (dense_calls: what a fused dense step runs), gives every row its lone bits, wherever it sits
    in the call and whatever the other rows; and the probes see the very product the step
    computes (decode.dense_call, before the step rounds an fp32 product to bf16)."""
    weight = (0.05 * randn(out_features, in_features)).to(dtype)
    multiple, chunk = dense_calls([weight])
    if not chunk:
        pytest.skip(f"no row-invariant chunk of the dense {dtype} matmul on this CPU")
    x = randn(3 * chunk, in_features, seed=1).to(BF16)

    def call(rows: torch.Tensor) -> torch.Tensor:
        return ext.dense_matmul(rows, weight, padded_rows(rows.shape[0], multiple))

    lone = torch.cat([call(x[i : i + 1]) for i in range(x.shape[0])])
    for start in range(0, 2 * chunk + 1, max(1, chunk // 4)):
        for m in (1, 3, chunk // 2 + 1, chunk):
            assert torch.equal(call(x[start : start + m]), lone[start : start + m]), (start, m)
    for m in (1, 5, chunk):
        for rows in (m, padded_rows(m, multiple), 2 * chunk):
            want = dense_call(x[:m], weight, rows).to(BF16)
            assert torch.equal(ext.dense_matmul(x[:m], weight, rows), want), (m, rows)
