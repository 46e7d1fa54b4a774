"""The GPU attention backend: the Triton kernels of triton_kernels.py behind the backend interface."""

from __future__ import annotations

import torch
import triton

from services.engine_core.attention.base import AttentionBackend, AttentionMetadata
from services.engine_core.attention.triton_kernels import paged_attention, write_kv_cache

# A split below this many context tokens costs more in its fixed work and in the merge than the
# parallelism it adds.
_MIN_TOKENS_PER_SPLIT = 256
_MAX_SPLITS = 16


def choose_num_splits(num_reqs: int, num_kv_heads: int, max_query_len: int, max_seq_len: int, num_sms: int) -> int:
    """Flash-decoding split count: > 1 only for a pure-decode batch whose (request, KV head)
    programs cannot fill the GPU alone, split so the launch makes about two programs per SM.
    Prefill chunks bring enough query blocks of their own and dominate a mixed step's time."""
    programs = num_reqs * num_kv_heads
    if max_query_len > 1 or programs >= num_sms:
        return 1
    wanted = triton.cdiv(2 * num_sms, programs)
    return max(1, min(_MAX_SPLITS, wanted, max_seq_len // _MIN_TOKENS_PER_SPLIT))


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(self, device: torch.device, num_splits: int | None = None) -> None:
        """num_splits forces the split count (tests); None chooses it per step. On a CPU device
        (the Triton interpreter) the heuristic never splits: there are no SMs to fill."""
        self.num_splits = num_splits
        device = torch.device(device)
        self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0

    def write_kv(self, key, value, k_cache, v_cache, md: AttentionMetadata) -> None:
        write_kv_cache(key, value, k_cache, v_cache, md.slot_mapping)

    def forward(self, query, key, value, k_cache, v_cache, md: AttentionMetadata, scale: float):
        num_splits = self.num_splits or choose_num_splits(
            md.num_reqs, k_cache.shape[2], md.max_query_len, md.max_seq_len, self._num_sms
        )
        return paged_attention(
            query,
            k_cache,
            v_cache,
            md.block_tables,
            md.seq_lens,
            md.query_start_loc,
            md.max_query_len,
            scale,
            num_splits,
        )
