"""Attention in plain torch: the CPU backend and the reference for the Triton kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.engine_core.attention.base import AttentionBackend, AttentionMetadata


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def write_kv(self, key, value, k_cache, v_cache, md: AttentionMetadata) -> None:
        n_kv, d = key.shape[1], key.shape[2]
        k_cache.view(-1, n_kv, d).index_copy_(0, md.slot_mapping, key)
        v_cache.view(-1, n_kv, d).index_copy_(0, md.slot_mapping, value)

    def forward(self, query, key, value, k_cache, v_cache, md: AttentionMetadata, scale: float):
        n_heads, d = query.shape[1], query.shape[2]
        n_kv = k_cache.shape[2]
        block_size = k_cache.shape[1]
        out = torch.empty_like(query)
        starts = md.query_start_loc.tolist()
        for i in range(md.num_reqs):
            q_len, seq_len = md.query_lens_cpu[i], md.seq_lens_cpu[i]
            ctx_len = seq_len - q_len
            q = query[starts[i] : starts[i] + q_len]
            if ctx_len == 0:
                k, v = key[starts[i] : starts[i] + q_len], value[starts[i] : starts[i] + q_len]
            else:
                n_blocks = (seq_len + block_size - 1) // block_size
                blocks = md.block_tables[i, :n_blocks].long()
                k = k_cache[blocks].reshape(-1, n_kv, d)[:seq_len]
                v = v_cache[blocks].reshape(-1, n_kv, d)[:seq_len]
            # [heads, q, d] x [heads, k, d]; causal with the query at the end of the context.
            mask = None
            if q_len > 1:
                pos_q = torch.arange(ctx_len, seq_len).unsqueeze(1)
                pos_k = torch.arange(seq_len).unsqueeze(0)
                mask = pos_k <= pos_q
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1),
                k.transpose(0, 1),
                v.transpose(0, 1),
                attn_mask=mask,
                scale=scale,
                enable_gqa=n_heads != n_kv,
            )
            out[starts[i] : starts[i] + q_len] = o.transpose(0, 1)
        return out
