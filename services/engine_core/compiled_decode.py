"""torch.compile'd pure-decode steps on a CPU: the counterpart of the CUDA graphs (cuda_graph.py).

A CPU decode step of a small model is bound by reading weights and by hundreds of small eager
ops per token (norms, RoPE, SiLU x mul, residual adds, dtype casts around the int4 kernel), each
costing microseconds of dispatch. Inductor's CPU C++ codegen fuses each layer's elementwise work
into a few loops around the matmuls. Each layer is compiled as two regions, everything before
attention (DecoderLayer.attn_in) and everything after it (attn_out_mlp), with paged attention
between them run by the attention backend: its plan depends on host-side context lengths, which
a static graph cannot see change. All layers share the two compiled regions (their weights are
graph inputs, not constants), so compiling costs two graphs per batch size, not two per layer.

Shapes are static per batch size (dynamic=False: Inductor specialises loops and picks kernels
for the exact size), so, as with CUDA graphs, a step of B requests runs the smallest compiled
size >= B from the same ladder (cuda_graph.capture_sizes), its rows past B padded with token 0
at position 0; attention and the KV writes see only the B real rows, so the padding touches no
cache and its outputs are dropped. Every size is compiled at start-up, so no request waits on
a compile. Inductor's FX graph cache keeps the generated kernels on disk (under the engine's
cache dir unless TORCHINDUCTOR_CACHE_DIR is set), so a restart mostly reloads them.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from services.engine_core.attention.base import AttentionBackend, AttentionMetadata
from services.engine_core.cuda_graph import capture_sizes
from services.engine_core.models.llama import CausalLM, DecoderLayer

log = logging.getLogger(__name__)


def use_cache_dir(cache_dir: str) -> None:
    """Keep Inductor's on-disk caches under cache_dir (unless the user chose a directory)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache_dir, "inductor"))


class CompiledDecode:
    def __init__(self, model: CausalLM, backend: AttentionBackend, max_batch: int) -> None:
        self.model, self.backend = model, backend
        self.sizes = capture_sizes(max_batch)
        # Each region holds a graph per size (and per dtype and int4 use, should one process
        # build several engines); past the limit Dynamo would silently run a region eagerly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 1024)
        self.attn_in = torch.compile(DecoderLayer.attn_in, dynamic=False)
        self.attn_out_mlp = torch.compile(DecoderLayer.attn_out_mlp, dynamic=False)
        self.compile_time_s = 0.0

    @torch.inference_mode()
    def compile(self, kv_caches: list[tuple[Tensor, Tensor]]) -> None:
        """Compile every size by running it once: one request, one token of context in block 0
        (the step writes slot 0, which no request owns yet: the block manager has allocated none)."""
        t0 = time.perf_counter()
        for size in self.sizes:
            self._forward(
                size,
                torch.zeros(1, dtype=torch.long),
                torch.zeros(1, dtype=torch.long),
                kv_caches,
                _one_token_metadata(),
            )
        self.compile_time_s = time.perf_counter() - t0
        log.info("compiled the CPU decode step for batch sizes %s in %.1fs", self.sizes, self.compile_time_s)

    def can_run(self, md: AttentionMetadata) -> bool:
        return md.is_pure_decode and md.num_reqs <= self.sizes[-1]

    def run(
        self, input_ids: Tensor, positions: Tensor, kv_caches: list[tuple[Tensor, Tensor]], md: AttentionMetadata
    ) -> Tensor:
        """The final hidden states [num_reqs, hidden] of a pure-decode step."""
        size = next(s for s in self.sizes if s >= md.num_reqs)
        return self._forward(size, input_ids, positions, kv_caches, md)

    def _forward(
        self,
        size: int,
        input_ids: Tensor,
        positions: Tensor,
        kv_caches: list[tuple[Tensor, Tensor]],
        md: AttentionMetadata,
    ) -> Tensor:
        model, b = self.model, md.num_reqs
        if size > b:
            input_ids = F.pad(input_ids, (0, size - b))
            positions = F.pad(positions, (0, size - b))
        h = F.embedding(input_ids, model.embed)
        cos = model.rope_cos.index_select(0, positions).unsqueeze(1)
        sin = model.rope_sin.index_select(0, positions).unsqueeze(1)
        for layer, (k_cache, v_cache) in zip(model.layers, kv_caches, strict=True):
            q, k, v = self.attn_in(layer, h, cos, sin)
            q, k, v = q[:b], k[:b], v[:b]
            self.backend.write_kv(k, v, k_cache, v_cache, md)
            attn = self.backend.forward(q, k, v, k_cache, v_cache, md, layer.scale)
            if size > b:
                attn = F.pad(attn, (0, 0, 0, 0, 0, size - b))
            h = self.attn_out_mlp(layer, h, attn)
        return F.rms_norm(h[:b], model.hidden_shape, model.norm, model.cfg.rms_norm_eps)


def _one_token_metadata() -> AttentionMetadata:
    i32 = torch.int32
    return AttentionMetadata(
        num_reqs=1,
        num_tokens=1,
        query_start_loc=torch.tensor([0, 1], dtype=i32),
        seq_lens=torch.tensor([1], dtype=i32),
        block_tables=torch.zeros((1, 1), dtype=i32),
        slot_mapping=torch.zeros(1, dtype=torch.long),
        max_query_len=1,
        max_seq_len=1,
        query_lens_cpu=[1],
        seq_lens_cpu=[1],
    )
