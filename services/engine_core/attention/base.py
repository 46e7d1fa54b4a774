"""The attention-backend interface: what the model code sees of the paged KV cache.

A step's batch is flattened: the new tokens of every scheduled request are
concatenated (decodes are 1-token rows, prefill chunks are longer rows), so the
model runs one forward over `num_tokens` rows whatever the mix. The metadata says
where each request's rows start, how long its whole context is, and where each
new token's K/V goes in the cache.

KV cache layout, per layer: k_cache and v_cache of shape
[num_blocks, block_size, num_kv_heads, head_dim]; token `t` of a request lives in
block `block_table[t // block_size]` at offset `t % block_size`, i.e. at flat slot
`block_table[t // block_size] * block_size + t % block_size`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    num_reqs: int
    num_tokens: int
    query_start_loc: torch.Tensor
    """int32 [num_reqs + 1]: request i's new tokens are rows query_start_loc[i]:query_start_loc[i+1]."""
    seq_lens: torch.Tensor
    """int32 [num_reqs]: context length after this step (cached tokens + new tokens)."""
    block_tables: torch.Tensor
    """int32 [num_reqs, max_blocks_per_req], padded with 0 past each request's blocks."""
    slot_mapping: torch.Tensor
    """int64 [num_tokens]: flat cache slot of each new token."""
    max_query_len: int
    max_seq_len: int
    # Host-side copies, so CPU backends can plan without device syncs.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    num_draft_tokens: int = 0
    """Of num_tokens, the speculative drafts this step verifies (each request's rows are its
    new tokens, then its drafts): the step without them is num_tokens - num_draft_tokens rows."""
    num_prefill_reqs: int = 0
    """Of num_reqs, the last ones are prefill chunks (prompt rows, or a preempted request's
    recompute); the others decode, each one new token and its drafts (model_runner orders them
    so). The fused CPU path multiplies the two row sets differently (fused_cpu/decode.py)."""

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """Stateless kernels; the model's attention layer calls write_kv then forward."""

    name: str = "abstract"

    @abstractmethod
    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        md: AttentionMetadata,
    ) -> None:
        """Store key/value [num_tokens, num_kv_heads, head_dim] at md.slot_mapping."""

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        md: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Causal attention of query [num_tokens, num_heads, head_dim] over each request's
        whole context (the cache, which already holds this step's key/value, written by
        write_kv). key/value are this step's new rows, passed so a backend may use them
        directly (e.g. a prefill chunk with no cached context). Returns
        [num_tokens, num_heads, head_dim]. num_heads is a multiple of num_kv_heads (GQA)."""
