"""Triton kernels for the paged KV cache: the cache write and one attention kernel for a mixed batch.

Importing this module defines the kernels, so TRITON_INTERPRET (to run them on CPU) must be set
before the first import. Written for triton >= 3.6 (what the GPU machine has).

Attention grid: (query blocks, KV heads, splits). A query block is up to BLOCK_Q consecutive new
tokens of one request times the GROUP query heads sharing one KV head, packed as the BLOCK_M rows
of one tile, so each K/V tile is loaded once per KV head and serves all its query heads (GQA).
Query blocks are numbered as in vLLM's unified kernel: request i's blocks start at
query_start_loc[i] // BLOCK_Q + i, so the grid is sized from host-known counts alone
(num_tokens // BLOCK_Q + num_reqs) and a program finds its request by binary search; programs
past the end of their request's rows exit at once. The launch needs no device-to-host sync.

With NUM_SPLITS > 1 (flash-decoding) each program covers one slice of the context tiles and
writes an unnormalised partial result with its running max and sum; a second kernel merges them.
That gives enough programs to fill the GPU when a few requests have long contexts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _write_kv_kernel(
    key,
    value,
    k_cache,
    v_cache,
    slot_mapping,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_cs,
    stride_ch,
    NUM_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    KV_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping + token)
    if slot < 0:  # padding rows (e.g. a CUDA-graph batch padded to its captured size)
        return
    heads = tl.arange(0, KV_PAD)[:, None]
    dims = tl.arange(0, HEAD_DIM)[None, :]
    mask = heads < NUM_KV
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + heads * stride_ch + dims
    k = tl.load(key + token * stride_kt + heads * stride_kh + dims, mask=mask)
    tl.store(k_cache + dst, k, mask=mask)
    v = tl.load(value + token * stride_vt + heads * stride_vh + dims, mask=mask)
    tl.store(v_cache + dst, v, mask=mask)


@triton.jit
def _find_request(query_start_loc, q_block, num_reqs, BLOCK_Q: tl.constexpr):
    """The last request whose first query block is <= q_block."""
    # Typed so the loop-carried values stay int32 tensors even if num_reqs is specialised.
    lo: tl.int32 = 0
    hi: tl.int32 = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc + mid) // BLOCK_Q + mid <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# num_reqs varies every step: no recompiles for its value being 1 or a multiple of 16.
@triton.jit(do_not_specialize=["num_reqs"])
def _paged_attention_kernel(
    query,
    out,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    query_start_loc,
    part_acc,
    part_max,
    part_sum,
    qk_scale,
    num_reqs,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    req = _find_request(query_start_loc, q_block, num_reqs, BLOCK_Q)
    q_start = tl.load(query_start_loc + req)
    q_len = tl.load(query_start_loc + req + 1) - q_start
    q_block_local = q_block - (q_start // BLOCK_Q + req)
    if q_block_local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens + req)
    context_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_tok = q_block_local * BLOCK_Q + rows // GROUP  # token index within this request's chunk
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (q_tok < q_len)
    q_pos = context_len + q_tok  # absolute position: the causal limit of each row
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        query + (q_start + q_tok)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    ).to(k_cache.dtype.element_ty)

    # Keys up to the block's last query row: later tiles are fully masked for every row.
    kv_end = tl.minimum(seq_len, context_len + (q_block_local + 1) * BLOCK_Q)
    num_tiles = tl.cdiv(kv_end, TILE_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table = block_tables + req * stride_bt
    for tile in range(tile_lo, tile_hi):
        pos = tile * TILE_N + tl.arange(0, TILE_N)
        pos_ok = pos < kv_end
        block = tl.load(table + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
        # int64: block * stride_cb passes 2**31 elements in a large cache.
        kv_off = block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
        # K as [HEAD_DIM, TILE_N]: each token's head_dim run is contiguous, so loads coalesce.
        k = tl.load(k_cache + kv_off[None, :] + dims[:, None], mask=pos_ok[None, :], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(pos_ok[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row may have seen no visible key yet (a split past its causal limit): subtracting
        # -inf would give NaN, and 0 keeps its p and alpha at 0.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache + kv_off[:, None] + dims[None, :], mask=pos_ok[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    token = q_start + q_tok
    if NUM_SPLITS == 1:
        # Key 0 is visible to every row, so l_i > 0 for every stored row.
        o = acc / l_i[:, None]
        tl.store(
            out + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
            o.to(out.dtype.element_ty),
            mask=row_ok[:, None],
        )
    else:
        # Partials are [num_tokens, NUM_HEADS, NUM_SPLITS(, HEAD_DIM)], contiguous.
        part = (token * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(part_max + part, m_i, mask=row_ok)
        tl.store(part_sum + part, l_i, mask=row_ok)
        tl.store(part_acc + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["num_reqs"])
def _merge_splits_kernel(
    out,
    part_acc,
    part_max,
    part_sum,
    query_start_loc,
    num_reqs,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    if token >= tl.load(query_start_loc + num_reqs):  # rows past the batch hold no partials
        return
    splits = tl.arange(0, SPLITS_PAD)
    ok = splits < NUM_SPLITS
    part = (token * NUM_HEADS + head) * NUM_SPLITS + splits
    m = tl.load(part_max + part, mask=ok, other=float("-inf"))
    sums = tl.load(part_sum + part, mask=ok, other=0.0)
    dims = tl.arange(0, HEAD_DIM)
    acc = tl.load(part_acc + part[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None], other=0.0)
    # Split 0 always holds key 0, so the max is finite; empty splits (max -inf) weigh 0.
    w = tl.math.exp2(m - tl.max(m, 0))
    o = tl.sum(acc * w[:, None], 0) / tl.sum(sums * w, 0)
    tl.store(out + token * stride_ot + head * stride_oh + dims, o.to(out.dtype.element_ty))


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store key/value [num_tokens, num_kv_heads, head_dim] at the flat cache slots in slot_mapping
    (negative slots are skipped)."""
    num_tokens, num_kv, head_dim = key.shape
    if num_tokens == 0:
        return
    key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)
    _check_cache(k_cache, v_cache)
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV=num_kv,
        HEAD_DIM=head_dim,
        KV_PAD=triton.next_power_of_2(num_kv),
        BLOCK_SIZE=k_cache.shape[1],
    )


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of query [num_tokens, num_heads, head_dim] over the paged cache (which
    already holds this step's K/V), for any mix of decode rows and prefill chunks. num_splits > 1
    splits each context into that many slices merged by a second kernel. `out` (e.g. a static
    CUDA-graph buffer) receives the result when given; rows past the batch's tokens are left as
    they were."""
    num_tokens, num_heads, head_dim = query.shape
    num_reqs = seq_lens.shape[0]
    num_kv = k_cache.shape[2]
    group = num_heads // num_kv
    _check_cache(k_cache, v_cache)
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    query = _last_dim_contiguous(query)
    if out is None:
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return out
    block_m, tile_n, num_warps = _tile_config(group, head_dim, max_query_len, k_cache.dtype)
    block_q = block_m // group
    if num_splits > 1:
        part_acc = torch.empty((num_tokens, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device)
        part_max = torch.empty((num_tokens, num_heads, num_splits), dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
    else:  # unused by the kernel: any tensor will do
        part_acc = part_max = part_sum = out
    grid = (num_tokens // block_q + num_reqs, num_kv, num_splits)
    _paged_attention_kernel[grid](
        query,
        out,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        part_acc,
        part_max,
        part_sum,
        scale * _LOG2E,
        num_reqs,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        NUM_HEADS=num_heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        TILE_N=tile_n,
        NUM_SPLITS=num_splits,
        # fp32 inputs would otherwise run the dots in tf32 (~1e-3 relative error) on tensor cores.
        DOT_PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out,
            part_acc,
            part_max,
            part_sum,
            query_start_loc,
            num_reqs,
            out.stride(0),
            out.stride(1),
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=1 if head_dim <= 64 else 2,
        )
    return out


def _tile_config(group: int, head_dim: int, max_query_len: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, TILE_N, num_warps), sized from sm_90 builds to stay clear of register spills.
    Decode rows need only GROUP rows each, so a pure-decode batch uses the smallest tile tl.dot
    allows (16 rows); prefill chunks take as many rows as fit, so each K/V tile read serves more
    query tokens. fp32 (no tensor cores: FMA dots) needs the smaller tiles."""
    if max_query_len == 1:
        return max(16, triton.next_power_of_2(group)), 64, 4
    if dtype == torch.float32:
        return max(64, triton.next_power_of_2(group)), 32, 8
    return max(128 if head_dim <= 64 else 64, triton.next_power_of_2(group)), 64, 8


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    # The kernels index both caches with k_cache's strides.
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need equal strides and a contiguous head_dim")
