"""Each fused CPU decode kernel (services/engine_core/fused_cpu/csrc) against the eager torch
ops it replaces, within bf16 tolerance: RMSNorm with the residual add, SiLU x mul, RoPE with the
KV-cache write (+ Qwen2's bias and Qwen3's q/k norms), and paged attention (rows grouped by
request, causal) over GQA shapes, contexts that cross block boundaries and splits, and batches
of different lengths and query lengths. Their row invariance: test_row_invariance.py."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from services.engine_core.attention.base import AttentionMetadata
from services.engine_core.attention.torch_backend import reference_attention
from services.engine_core.models.llama import apply_rope
from tests.engine_core.conftest import build_paged_batch, rel_error

BF16 = torch.bfloat16


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rows, hidden", [(1, 576), (5, 64), (16, 100)])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("residual_dtype", [torch.float32, BF16])
def test_add_rms_norm(
    ext: ModuleType, rows: int, hidden: int, with_residual: bool, residual_dtype: torch.dtype
) -> None:
    """The fused step keeps the residual stream in fp32; a bf16 one is rounded after the add,
    as the eager h.add_()."""
    h, delta = (100 * randn(rows, hidden, seed=1)).to(residual_dtype), randn(rows, hidden, seed=2).to(BF16)
    weight = (1 + 0.1 * randn(hidden, seed=3)).to(BF16)
    expected_h = (h + delta.to(residual_dtype)) if with_residual else h.clone()
    ref = F.rms_norm(expected_h.float(), (hidden,), weight.float(), 1e-5)
    out = ext.add_rms_norm(h, delta if with_residual else None, weight, 1e-5)
    assert torch.equal(h, expected_h)  # the residual stream is updated in place
    assert out.dtype == BF16 and rel_error(out, ref) < 1e-2


@pytest.mark.parametrize("rows, inter", [(1, 1536), (3, 80), (16, 7)])
def test_silu_mul(ext: ModuleType, rows: int, inter: int) -> None:
    gate_up = (3 * randn(rows, 2 * inter)).to(BF16)
    gate, up = gate_up.float().chunk(2, dim=-1)
    assert rel_error(ext.silu_mul(gate_up), F.silu(gate) * up) < 1e-2


def rope_inputs(
    rows: int, n_heads: int, n_kv: int, d: int, variant: str
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """qkv [rows, (n_heads + 2 n_kv) d] and the variant's bias (Qwen2) or q/k norms (Qwen3)."""
    width = (n_heads + 2 * n_kv) * d
    qkv = randn(rows, width, seed=1).to(BF16)
    bias = randn(width, seed=2).to(BF16) if variant == "qwen2-bias" else None
    q_norm = (1 + 0.1 * randn(d, seed=3)).to(BF16) if variant == "qwen3-qk-norm" else None
    k_norm = (1 + 0.1 * randn(d, seed=4)).to(BF16) if variant == "qwen3-qk-norm" else None
    return qkv, bias, q_norm, k_norm


def rope_tables(max_pos: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's layout (CausalLM.rope_cos / rope_sin): cos twice, sin with its first half negated."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    angles = torch.outer(torch.arange(max_pos).float(), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), -1).to(BF16), torch.cat((-sin, sin), -1).to(BF16)


@pytest.mark.parametrize("n_heads, n_kv, d", [(9, 3, 64), (4, 2, 16), (8, 8, 128)])
@pytest.mark.parametrize("variant", ["llama", "qwen2-bias", "qwen3-qk-norm"])
def test_rope_write_kv(ext: ModuleType, n_heads: int, n_kv: int, d: int, variant: str) -> None:
    rows, blocks, bs, eps = 3, 8, 16, 1e-6
    qkv, bias, q_norm, k_norm = rope_inputs(rows, n_heads, n_kv, d, variant)
    cos, sin = rope_tables(1000, d)
    positions = torch.tensor([0, 17, 999])
    slots = torch.tensor([5, 40, 127])  # three blocks, one at the cache's last slot
    k_cache = torch.zeros(blocks, bs, n_kv, d, dtype=BF16)
    v_cache = torch.zeros(blocks, bs, n_kv, d, dtype=BF16)
    q = ext.rope_write_kv(qkv, bias, q_norm, k_norm, eps, positions, cos, sin, slots, n_heads, k_cache, v_cache)

    # The eager model's ops (DecoderLayer.attn_in), in fp32.
    x = (qkv + bias if bias is not None else qkv).float().view(rows, -1, d)
    qk, v = x.split((n_heads + n_kv, n_kv), dim=1)
    if q_norm is not None and k_norm is not None:
        qk = F.rms_norm(qk, (d,), eps=eps)
        qk = torch.cat((qk[:, :n_heads] * q_norm.float(), qk[:, n_heads:] * k_norm.float()), dim=1)
    rotated = apply_rope(qk, cos.float()[positions].unsqueeze(1), sin.float()[positions].unsqueeze(1))
    ref_q, ref_k = rotated.split((n_heads, n_kv), dim=1)
    assert q.dtype == torch.float32 and rel_error(q, ref_q) < 1e-2
    k_slots, v_slots = k_cache.view(-1, n_kv, d), v_cache.view(-1, n_kv, d)
    assert rel_error(k_slots[slots], ref_k) < 1e-2
    assert rel_error(v_slots[slots], v) < 1e-2
    others = torch.ones(blocks * bs, dtype=torch.bool)
    others[slots] = False
    assert not k_slots[others].any() and not v_slots[others].any()  # nothing else written


def cached_step(
    query_lens: list[int],
    context_lens: list[int],
    n_heads: int,
    n_kv: int,
    d: int,
    seed: int = 0,
    block_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float]:
    """A step's q (fp32) and its bf16 paged caches with the step's own K/V already written (as
    rope_write_kv leaves them), over build_paged_batch's NaN-poisoned, shuffled blocks."""
    batch = build_paged_batch(
        query_lens, context_lens, num_heads=n_heads, num_kv_heads=n_kv, head_dim=d, seed=seed, block_size=block_size
    )
    k_cache, v_cache, md = batch.k_cache.to(BF16), batch.v_cache.to(BF16), batch.md
    k_cache.view(-1, n_kv, d).index_copy_(0, md.slot_mapping, batch.key.to(BF16))
    v_cache.view(-1, n_kv, d).index_copy_(0, md.slot_mapping, batch.value.to(BF16))
    return batch.query.float().contiguous(), k_cache, v_cache, md, batch.scale


def paged(
    ext: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: AttentionMetadata, scale: float
) -> torch.Tensor:
    """ext.paged_attention over md's requests."""
    return ext.paged_attention(q, k, v, md.block_tables, md.query_start_loc, md.seq_lens, scale)


@pytest.mark.parametrize(
    "n_heads, n_kv, d",
    [(9, 3, 64), (4, 2, 16), (8, 8, 128), (4, 1, 32), (6, 2, 40), (6, 3, 128)],  # 3 x 128: KV head groups of 2 and 1
)
@pytest.mark.parametrize(
    "context_lens",
    [[0], [15], [16], [511], [1000], [3, 16, 47, 200], [700, 1, 31, 64, 64, 129]],
)
def test_paged_attention_decode_rows(ext: ModuleType, n_heads: int, n_kv: int, d: int, context_lens: list[int]) -> None:
    """A pure-decode step (one row per request), over a NaN-poisoned paged cache with shuffled
    blocks: reading any slot outside a request's context would turn its output NaN."""
    q, k_cache, v_cache, md, scale = cached_step([1] * len(context_lens), context_lens, n_heads, n_kv, d)
    ref = reference_attention(q, k_cache.float(), v_cache.float(), md, scale)
    out = paged(ext, q, k_cache, v_cache, md, scale)
    assert out.shape == (len(context_lens), n_heads * d) and out.dtype == BF16
    assert rel_error(out.view_as(ref), ref) < 1e-2


@pytest.mark.parametrize(
    "n_heads, n_kv, d",
    [(9, 3, 64), (4, 2, 16), (8, 8, 128), (4, 1, 32), (6, 2, 40), (6, 3, 128)],  # 3 x 128: KV head groups of 2 and 1
)
@pytest.mark.parametrize(
    "query_lens, context_lens",
    [
        ([1], [0]),
        ([17], [0]),  # a prefill-like chunk: every row causal within the group
        ([9], [2091]),  # a verify group ending at 2100, across a split boundary
        ([1, 2, 3, 5, 8, 13, 17], [0, 15, 126, 127, 255, 700, 1000]),
        ([4, 1, 9, 1, 16], [12, 2099, 119, 31, 240]),
    ],
)
def test_paged_attention(
    ext: ModuleType, n_heads: int, n_kv: int, d: int, query_lens: list[int], context_lens: list[int]
) -> None:
    """Rows grouped by request, q_len 1..17 mixed, causal by position, against the per-request
    torch reference (explicit softmax over the gathered context, future positions masked).
    Reading a slot outside a request's context would turn its rows NaN."""
    q, k_cache, v_cache, md, scale = cached_step(query_lens, context_lens, n_heads, n_kv, d)
    ref = reference_attention(q, k_cache.float(), v_cache.float(), md, scale)
    out = paged(ext, q, k_cache, v_cache, md, scale)
    assert out.shape == (sum(query_lens), n_heads * d) and out.dtype == BF16
    for r in range(md.num_reqs):  # per request: a short one's error is not hidden by a long one's
        rows = slice(int(md.query_start_loc[r]), int(md.query_start_loc[r + 1]))
        assert rel_error(out.view_as(ref)[rows], ref[rows]) < 1e-2, f"request {r}"


@pytest.mark.parametrize("block_size", [1, 5, 32, 256])
def test_paged_attention_any_block_size(ext: ModuleType, block_size: int) -> None:
    """Blocks smaller than a chunk, not dividing it, and larger than a split."""
    query_lens, context_lens = [3, 1, 9], [300, 40, 0]
    q, k_cache, v_cache, md, scale = cached_step(query_lens, context_lens, 9, 3, 64, block_size=block_size)
    ref = reference_attention(q, k_cache.float(), v_cache.float(), md, scale)
    assert rel_error(paged(ext, q, k_cache, v_cache, md, scale).view_as(ref), ref) < 1e-2


@pytest.mark.parametrize("d", [64, 128, 16, 40])  # 40: not whole 16-dimension blocks, the scalar transpose
@pytest.mark.parametrize("group", [1, 3, 8])  # query heads per KV head
def test_paged_attention_keys_transposed(ext: ModuleType, d: int, group: int) -> None:
    """QK over each chunk's keys transposed to [d, kChunk] (one FMA chain per score over the
    dimensions in order): verify groups of 1..12 rows at odd contexts (short last chunks, a split
    boundary crossed) against the float reference, every row the bits of a lone decode row at its
    position, at 1 and 2 threads."""
    n_kv = 2
    query_lens, contexts = [1, 2, 3, 5, 8, 12], [0, 31, 33, 127, 250, 517]
    q, k_cache, v_cache, md, scale = cached_step(query_lens, contexts, group * n_kv, n_kv, d, seed=d + group)
    ref = reference_attention(q, k_cache.float(), v_cache.float(), md, scale)
    before = torch.get_num_threads()
    try:
        steps = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            step = paged(ext, q, k_cache, v_cache, md, scale)
            for r, q_len in enumerate(query_lens):
                rows = slice(int(md.query_start_loc[r]), int(md.query_start_loc[r + 1]))
                assert rel_error(step.view_as(ref)[rows], ref[rows]) < 1e-2, f"request {r}"
                for j in range(q_len):
                    row = rows.start + j
                    lone = ext.paged_attention(
                        q[row : row + 1].contiguous(), k_cache, v_cache, md.block_tables[r : r + 1],
                        torch.tensor([0, 1], dtype=torch.int32), md.seq_lens[r : r + 1] - (q_len - 1 - j), scale,
                    )  # fmt: skip
                    assert torch.equal(lone, step[row : row + 1]), f"request {r}, row {j}, {threads} threads"
            steps.append(step)
        assert torch.equal(steps[0], steps[1]), "1 and 2 threads, other bits"
    finally:
        torch.set_num_threads(before)
