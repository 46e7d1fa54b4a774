"""The exact mode's attention: the torch backend, batch-invariant.

SDPA's result for a query row depends, in the last bits, on the shape of its call: how many
query rows share a causal chunk (a verification row of 1 + k tokens vs a decode row) and how
far the context is padded (a decode group's longest request). So the fast backend's attention
of a step depends on the batch around a request and on how its tokens were grouped into steps,
and a seeded sampled token can flip when a draw lies near a token boundary.

Here every query row is computed in one canonical form: its own batch entry of an SDPA call
over its context rounded up to a multiple of _BUCKET positions, the excess masked (the kernel
computes each batch entry alone, and masked positions add exact zeros). A token's attention
output is then the same bits whether it was decoded alone, in a batch, verified as a draft or
computed in any prefill chunk. The rows of one request in one bucket (a prefill chunk's, a
verification row's) share one K/V gather; decodes in one bucket share one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.engine_core.attention.base import AttentionMetadata
from services.engine_core.attention.torch_backend import TorchAttentionBackend

_BUCKET = 64
"""The context lengths one call shape covers. Larger: fewer calls for a prefill chunk and more
decodes per call; smaller: fewer masked positions computed."""


@dataclass
class _Call:
    """Query rows of the same rounded-up context length, attended in one SDPA call."""

    rows: torch.Tensor
    """int64 [n]: the rows of the flattened batch."""
    length: int
    """The context length of the call: each row's own, rounded up to _BUCKET."""
    slots: torch.Tensor
    """int64 [length] (one request's rows: one context, shared) or [n * length] (one per row): the
    cache slot of every position, those past a request's last token pointing at it so the K/V
    read stay finite whatever the cache holds there (a NaN would survive a masked softmax)."""
    valid: torch.Tensor
    """bool [n, 1, 1, length]: which positions are each row's context."""

    @property
    def shared(self) -> bool:
        return len(self.slots) == self.length


class BatchInvariantTorchBackend(TorchAttentionBackend):
    """The torch backend's K/V writes and gather workspace, with every row attended canonically."""

    def __init__(self) -> None:
        super().__init__()
        # Planned once per step, as the fast path's plan: every layer sees the same metadata.
        self._calls_md: AttentionMetadata | None = None
        self._calls: list[_Call] = []

    def forward(self, query, key, value, k_cache, v_cache, md: AttentionMetadata, scale: float):
        if self._calls_md is not md:
            self._calls, self._calls_md = _plan(md, k_cache.shape[1]), md
        n_heads, d = query.shape[1], query.shape[2]
        n_kv = k_cache.shape[2]
        k_slots = k_cache.view(-1, n_kv * d)
        v_slots = v_cache.view(-1, n_kv * d)
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        for call in self._calls:
            n, length = len(call.rows), call.length
            k, v = self._gather(k_slots, v_slots, call.slots)
            # [n, kv_heads, length, d] views; one request's rows share its context (stride 0)
            shape = (n, n_kv, length, d)
            strides = (0 if call.shared else length * n_kv * d, d, n_kv * d, 1)
            o = F.scaled_dot_product_attention(
                query.index_select(0, call.rows).view(n, n_kv, n_heads // n_kv, d),
                k.as_strided(shape, strides, k.storage_offset()),
                v.as_strided(shape, strides, v.storage_offset()),
                attn_mask=call.valid,
                scale=scale,
            )
            out.index_copy_(0, call.rows, o.reshape(n, n_heads, d))
        return out


def _plan(md: AttentionMetadata, block_size: int) -> list[_Call]:
    """Row j of request i has context c = seq_len - q_len + 1 + j, and is attended over
    positions [0, round_up(c)) with those from c on masked: grouped into calls by that
    length, one request's several rows together, single rows of all requests together."""
    device = md.block_tables.device
    # length -> [(first row, rows' contexts, request)]
    units: dict[int, list[tuple[int, list[int], int]]] = {}
    row = 0
    for i, (q_len, seq_len) in enumerate(zip(md.query_lens_cpu, md.seq_lens_cpu, strict=True)):
        contexts = range(seq_len - q_len + 1, seq_len + 1)
        j = 0
        while j < q_len:
            length = -(-contexts[j] // _BUCKET) * _BUCKET
            n = min(q_len - j, length - contexts[j] + 1)  # the rows whose context rounds up to length
            units.setdefault(length, []).append((row + j, list(contexts[j : j + n]), i))
            j += n
        row += q_len
    calls = []
    pos = torch.arange(max(units, default=0), device=device)
    for length, members in units.items():
        singles = [m for m in members if len(m[1]) == 1]
        for first, row_contexts, req in [m for m in members if len(m[1]) > 1]:
            calls.append(_call(md, block_size, length, first, row_contexts, [req], pos))
        if singles:
            calls.append(
                _call(
                    md,
                    block_size,
                    length,
                    [r for r, _, _ in singles],
                    [c[0] for _, c, _ in singles],
                    [i for _, _, i in singles],
                    pos,
                )
            )
    return calls


def _call(
    md: AttentionMetadata,
    block_size: int,
    length: int,
    rows: int | list[int],
    contexts: list[int],
    reqs: list[int],
    pos: torch.Tensor,
) -> _Call:
    """rows: a request's consecutive rows from this one (reqs: that request), or one row per
    request of reqs."""
    device = md.block_tables.device
    p = pos[:length]
    idx = torch.tensor(reqs, device=device)
    last = md.seq_lens[idx].long() - 1
    clamped = torch.minimum(p[None, :], last[:, None])  # [len(reqs), length]
    table = md.block_tables[idx].long()
    slots = table.gather(1, clamped // block_size) * block_size + clamped % block_size
    ctx = torch.tensor(contexts, device=device)
    row_ids = (
        torch.arange(rows, rows + len(contexts), device=device)
        if isinstance(rows, int)
        else torch.tensor(rows, device=device)
    )
    valid = (p[None, :] < ctx[:, None])[:, None, None, :]
    return _Call(row_ids, length, slots.reshape(-1), valid)
