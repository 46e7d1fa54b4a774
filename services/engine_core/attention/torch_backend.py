"""Attention in plain torch: the CPU backend, and the reference the Triton kernels are tested against.

`reference_attention` is the slow, obviously-correct definition. `TorchAttentionBackend` computes
the same thing fast on a CPU, where a per-request loop costs more in call overhead than in math:
the decode rows of a batch (query length 1) are gathered, padded to the longest context, into one
buffer and go through one SDPA call per layer (one per group of similar lengths when lengths
differ widely, so padding stays bounded); only prefill chunks (few per step) are handled one
request at a time.

A decode group whose requests all have the same context length (always so for a single stream)
needs no padding and no mask: whole blocks are gathered (a few dozen indices, not one per token)
and the context is a prefix of them; a lone request whose blocks are consecutive in the cache
(the usual case for one stream: the block manager hands out free blocks in order) is attended
over in place, with no copy at all. When that group is the whole step, the query is used and the
output returned as they are. A single-stream step is then three views and one SDPA call per layer.

Rows of a few tokens (up to _SHORT_QUERY: decodes verifying draft tokens, short prefill chunks)
are grouped the same way, by query length: each KV head's query rows are its query heads times
the row's tokens, with an additive causal mask made once per step. One SDPA call then serves a
group of verification rows, and reads each KV head once, which is what keeps a verification
row's attention near a decode row's (a row of 1 + k tokens attended on its own, with K/V
broadcast over the query heads and a boolean mask, cost 2-3x as much). Longer rows (prefill
chunks) are attended one request at a time; they too read a context in consecutive blocks in
place, with slots and causal masks made once per step.

The exact mode needs every row's bits independent of the batch around it: that is the
subclass in batch_invariant.py, which reuses this backend's K/V writes and gather workspace.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

from services.engine_core.attention.base import AttentionBackend, AttentionMetadata


def reference_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    md: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal GQA attention of each request's new rows over its whole context, read token by
    token from the paged cache, in fp32. Slow on purpose: a per-request loop with an explicit
    softmax, so it shares no shortcut with the backends it checks."""
    n_heads, d = query.shape[1], query.shape[2]
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    k_slots = k_cache.reshape(-1, n_kv, d)
    v_slots = v_cache.reshape(-1, n_kv, d)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    start = 0
    for i in range(md.num_reqs):
        q_len, seq_len = md.query_lens_cpu[i], md.seq_lens_cpu[i]
        pos = torch.arange(seq_len, device=query.device)
        slots = md.block_tables[i].long()[pos // block_size] * block_size + pos % block_size
        k = k_slots[slots].float().repeat_interleave(group, dim=1)  # [seq, heads, d]
        v = v_slots[slots].float().repeat_interleave(group, dim=1)
        q = query[start : start + q_len].float()
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = pos[seq_len - q_len :].unsqueeze(1)
        scores = scores.masked_fill(pos.unsqueeze(0) > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start : start + q_len] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
        start += q_len
    return out


# Padded context positions per batched decode call: bounds the gather buffer (and so memory
# when one long request shares a batch with many short ones) at ~25 MB per K/V for SmolLM2 fp32.
_DECODE_GROUP_TOKENS = 32768
_SHORT_QUERY = 16
"""Rows of up to this many query tokens are attended in groups (as decodes are); longer ones one
by one. Covers a verification row of up to 15 drafts."""


@dataclass
class _DecodeGroup:
    """Requests whose rows have the same query length q_len (1: plain decodes), attended in one call."""

    num_reqs: int
    max_len: int
    rows: torch.Tensor | None
    """int64 [n * q_len]: the group's rows of the flattened batch, request by request; None when
    they are all the step's rows, in order (query and output need no gather or scatter)."""
    q_len: int = 1
    causal: torch.Tensor | None = None
    """q_len > 1: additive float [n, 1, q_per_kv * q_len, max_len] mask in the query's dtype,
    rows (query head in its KV group, token): position p is seen by token t of a request of
    context L when p <= L - q_len + t (its context and the row's tokens up to t; padded
    positions never)."""
    block_range: slice | None = None
    """One request whose blocks are consecutive cache blocks: its context is read in place."""
    blocks: torch.Tensor | None = None
    """int32 [n * blocks]: the blocks holding each request's context, when every request has the
    same context length (max_len): the context is the first max_len slots of its blocks."""
    slots: torch.Tensor | None = None
    """int64 [n * max_len], for requests of different lengths: cache slot of every context
    position, padded positions pointing at the request's last token so the gathered K/V stay
    finite whatever the cache holds past a request's end (a NaN there would survive a masked
    softmax)."""
    valid: torch.Tensor | None = None
    """bool [n, 1, 1, max_len], with slots and q_len 1: which padded positions are real context."""


@dataclass
class _Chunk:
    """A row of several query tokens (a prefill chunk, or a decode verifying draft tokens)."""

    rows: slice
    q_len: int
    seq_len: int
    block_range: slice | None = None
    """Its context in consecutive cache blocks: read in place (as a lone decode's)."""
    slots: torch.Tensor | None = None
    """Else int64 [seq_len]: the cache slot of every context position, to gather."""
    mask: torch.Tensor | None = None
    """bool [q_len, seq_len], with a cached context: causal over the chunk, all of the context
    before it (None: no cached context, the chunk's own K/V are the whole context)."""


@dataclass
class _Plan:
    starts: list[int]
    decode_groups: list[_DecodeGroup]
    chunks: list[_Chunk]


def _context_slots(block_table: torch.Tensor, seq_lens: torch.Tensor, max_len: int, block_size: int) -> torch.Tensor:
    """[n, max_len] flat slots of positions 0..max_len-1, clamped to each request's last token."""
    n_blocks = -(-max_len // block_size)
    offsets = torch.arange(block_size, device=block_table.device)
    slots = (block_table[:, :n_blocks, None].long() * block_size + offsets).view(len(block_table), -1)
    last = slots.gather(1, (seq_lens.long() - 1).unsqueeze(1))
    pos = torch.arange(slots.shape[1], device=block_table.device)
    return torch.where(pos < seq_lens.unsqueeze(1), slots, last)[:, :max_len]


def _group_decodes(decodes: list[int], seq_lens: list[int]) -> list[list[int]]:
    """Longest first, a new group whenever padding to the group's longest context would pass the
    token budget or more than double a request's context."""
    groups: list[list[int]] = []
    for i in sorted(decodes, key=lambda i: seq_lens[i], reverse=True):
        if groups:
            longest = seq_lens[groups[-1][0]]
            if (len(groups[-1]) + 1) * longest <= _DECODE_GROUP_TOKENS and 2 * seq_lens[i] >= longest:
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def __init__(self) -> None:
        # Every layer of a step sees the same metadata object: plan once per step, not per layer.
        # The engine builds a fresh AttentionMetadata each step and never mutates one.
        self._plan_md: AttentionMetadata | None = None
        self._plan: _Plan | None = None
        # Gathered K/V land in one reused buffer: a fresh multi-MB tensor per layer costs more
        # in page faults than the gather itself.
        self._workspace: torch.Tensor | None = None

    def write_kv(self, key, value, k_cache, v_cache, md: AttentionMetadata) -> None:
        n_kv, d = key.shape[1], key.shape[2]
        k_cache.view(-1, n_kv, d).index_copy_(0, md.slot_mapping, key)
        v_cache.view(-1, n_kv, d).index_copy_(0, md.slot_mapping, value)

    def _make_plan(self, md: AttentionMetadata, block_size: int, q_per_kv: int, dtype: torch.dtype) -> _Plan:
        starts = list(accumulate(md.query_lens_cpu, initial=0))
        by_q_len: dict[int, list[int]] = {}
        for i, q_len in enumerate(md.query_lens_cpu):
            if q_len <= _SHORT_QUERY:
                by_q_len.setdefault(q_len, []).append(i)
        prefills = [i for i, q_len in enumerate(md.query_lens_cpu) if q_len > _SHORT_QUERY]
        device = md.block_tables.device
        groups = []
        for q_len, short in sorted(by_q_len.items()):
            for reqs in _group_decodes(short, md.seq_lens_cpu):
                groups.append(self._group(md, block_size, q_per_kv, dtype, starts, q_len, reqs, not prefills))
        # Built once per step, not per layer: a chunk's context slots and mask cost more than its
        # attention when remade in every layer.
        chunks = []
        for i in prefills:
            q_len, seq_len = md.query_lens_cpu[i], md.seq_lens_cpu[i]
            chunk = _Chunk(slice(starts[i], starts[i + 1]), q_len, seq_len)
            if seq_len > q_len:
                n_blocks = -(-seq_len // block_size)
                table = md.block_tables[i, :n_blocks].tolist()
                if table == list(range(table[0], table[0] + n_blocks)):
                    chunk.block_range = slice(table[0], table[0] + n_blocks)
                else:
                    slots = _context_slots(md.block_tables[i : i + 1], md.seq_lens[i : i + 1], seq_len, block_size)
                    chunk.slots = slots.view(-1)
                pos = torch.arange(seq_len, device=device)
                chunk.mask = pos.unsqueeze(0) <= pos[seq_len - q_len :].unsqueeze(1)
            chunks.append(chunk)
        return _Plan(starts, groups, chunks)

    @staticmethod
    def _group(
        md: AttentionMetadata,
        block_size: int,
        q_per_kv: int,
        dtype: torch.dtype,
        starts: list[int],
        q_len: int,
        reqs: list[int],
        no_prefills: bool,
    ) -> _DecodeGroup:
        """The plan of one group: requests `reqs`, each with q_len query rows."""
        device = md.block_tables.device
        max_len = md.seq_lens_cpu[reqs[0]]
        n = len(reqs)
        whole_step = no_prefills and reqs == list(range(md.num_reqs))
        rows = None if whole_step else torch.tensor([starts[i] + t for i in reqs for t in range(q_len)], device=device)
        group = _DecodeGroup(n, max_len, rows, q_len)
        req_idx = torch.tensor(reqs, device=device)
        equal = all(md.seq_lens_cpu[i] == max_len for i in reqs)
        if equal:
            tables = md.block_tables[req_idx, : -(-max_len // block_size)]
            own = tables[0].tolist() if n == 1 else []
            if own and own == list(range(own[0], own[0] + len(own))):
                group.block_range = slice(own[0], own[0] + len(own))
            else:
                group.blocks = tables.reshape(-1)
        else:
            seq_lens = md.seq_lens[req_idx]
            group.slots = _context_slots(md.block_tables[req_idx], seq_lens, max_len, block_size).reshape(-1)
            if q_len == 1:
                valid = torch.arange(max_len, device=device) < seq_lens.unsqueeze(1)
                group.valid = valid[:, None, None, :]
        if q_len > 1:
            # Token t of a request of context L sees positions <= L - q_len + t: causal within
            # the row, and no padding. Additive and in the query's dtype: SDPA's CPU kernel takes
            # it without converting per call (a boolean mask cost ~20 % more here).
            last = torch.tensor([md.seq_lens_cpu[i] for i in reqs], device=device) - q_len
            limit = last[:, None] + torch.arange(q_len, device=device)  # [n, q_len]
            seen = torch.arange(max_len, device=device) <= limit[:, :, None]  # [n, q_len, max_len]
            seen = seen[:, None].expand(n, q_per_kv, q_len, max_len).reshape(n, 1, q_per_kv * q_len, max_len)
            group.causal = torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, float("-inf"))
        return group

    def _buffers(self, rows: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two [rows, kv_heads * head_dim] views of the workspace, which grows by half again
        when too small, so contexts growing a token per step do not reallocate it every step."""
        need = rows * like.shape[1]
        ws = self._workspace
        if ws is None or ws.numel() < 2 * need or ws.dtype != like.dtype or ws.device != like.device:
            ws = self._workspace = torch.empty(3 * need, dtype=like.dtype, device=like.device)
        half = ws.numel() // 2
        return ws[:need].view(rows, -1), ws[half : half + need].view(rows, -1)

    def _gather(
        self, k_slots: torch.Tensor, v_slots: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k_buf, v_buf = self._buffers(len(slots), k_slots)
        return torch.index_select(k_slots, 0, slots, out=k_buf), torch.index_select(v_slots, 0, slots, out=v_buf)

    def _decode(
        self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: _DecodeGroup, scale: float
    ) -> torch.Tensor:
        """Attention of a group's query rows [n * q_len, heads, d] over their contexts."""
        n, q_len = group.num_reqs, group.q_len
        n_heads, d = query.shape[1], query.shape[2]
        block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
        q_per_kv = n_heads // n_kv
        # K/V come as token rows of [kv_heads, d], each request's `req_tokens` in a row from `first`.
        first = 0
        if group.block_range is not None:
            k, v, req_tokens = k_cache, v_cache, 0
            first = group.block_range.start * block_size
        elif group.blocks is not None:
            k, v = self._gather(k_cache.view(k_cache.shape[0], -1), v_cache.view(v_cache.shape[0], -1), group.blocks)
            req_tokens = len(group.blocks) // n * block_size
        else:
            assert group.slots is not None
            k, v = self._gather(k_cache.view(-1, n_kv * d), v_cache.view(-1, n_kv * d), group.slots)
            req_tokens = group.max_len
        # [n, kv_heads, max_len, d] views in one op each (not view, slice and transpose: at one
        # token a step, every op of the 30 layers shows in the step time).
        shape = (n, n_kv, group.max_len, d)
        strides = (req_tokens * n_kv * d, d, n_kv * d, 1)
        # The query heads sharing a KV head (times the row's tokens) become that head's "query
        # rows": one plain SDPA per group reads each KV head once, instead of repeating K/V for GQA.
        if q_len == 1:
            q = query.view(n, n_kv, q_per_kv, d)
        else:
            q = query.view(n, q_len, n_kv, q_per_kv, d).permute(0, 2, 3, 1, 4).reshape(n, n_kv, q_per_kv * q_len, d)
        o = F.scaled_dot_product_attention(
            q,
            k.as_strided(shape, strides, k.storage_offset() + first * n_kv * d),
            v.as_strided(shape, strides, v.storage_offset() + first * n_kv * d),
            attn_mask=group.valid if q_len == 1 else group.causal,
            scale=scale,
        )
        if q_len == 1:
            return o.reshape(n, n_heads, d)
        return o.view(n, n_kv, q_per_kv, q_len, d).permute(0, 3, 1, 2, 4).reshape(n * q_len, n_heads, d)

    def forward(self, query, key, value, k_cache, v_cache, md: AttentionMetadata, scale: float):
        n_heads, d = query.shape[1], query.shape[2]
        block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
        q_per_kv = n_heads // n_kv
        if self._plan_md is not md:
            self._plan, self._plan_md = self._make_plan(md, block_size, q_per_kv, query.dtype), md
        plan = self._plan
        assert plan is not None
        if len(plan.decode_groups) == 1 and plan.decode_groups[0].rows is None:
            return self._decode(query, k_cache, v_cache, plan.decode_groups[0], scale)
        k_slots = k_cache.view(-1, n_kv * d)
        v_slots = v_cache.view(-1, n_kv * d)
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)

        for group in plan.decode_groups:
            assert group.rows is not None
            o = self._decode(query.index_select(0, group.rows), k_cache, v_cache, group, scale)
            out.index_copy_(0, group.rows, o)

        for chunk in plan.chunks:
            rows, q_len, seq_len = chunk.rows, chunk.q_len, chunk.seq_len
            if chunk.mask is None:
                # No cached context: the chunk's own K/V are the whole context.
                k, v, mask, causal = key[rows], value[rows], None, True
            else:
                if chunk.block_range is not None:
                    k, v = k_cache[chunk.block_range], v_cache[chunk.block_range]
                    k, v = k.reshape(-1, n_kv * d)[:seq_len], v.reshape(-1, n_kv * d)[:seq_len]
                else:
                    assert chunk.slots is not None
                    k, v = self._gather(k_slots, v_slots, chunk.slots)
                mask, causal = chunk.mask, False
            # 4-D with K/V broadcast over each KV head's query heads: SDPA's CPU flash kernel takes
            # this without copying K/V, while 3-D or enable_gqa inputs fall back to the math path.
            k = k.view(-1, n_kv, d).transpose(0, 1)[:, None].expand(n_kv, q_per_kv, -1, d)
            v = v.view(-1, n_kv, d).transpose(0, 1)[:, None].expand(n_kv, q_per_kv, -1, d)
            q = query[rows].transpose(0, 1).reshape(n_kv, q_per_kv, q_len, d)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
            out[rows] = o.reshape(n_heads, q_len, d).transpose(0, 1)
        return out
