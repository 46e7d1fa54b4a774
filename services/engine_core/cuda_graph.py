"""CUDA graphs for pure-decode steps.

A decode step of a small model on a GPU is bound by launch overhead: hundreds of kernels of a
few microseconds each. Capturing the forward once per batch size and replaying it launches the
whole step at once. Graphs are captured for a ladder of batch sizes (1, 2, 4, 8, then every 16
up to max_num_seqs); a step of B requests replays the smallest size >= B, with the rows past B
padded so they are harmless: slot -1 (the KV write skips it), a one-token context and a
one-token query each, so the attention kernel reads one valid cache slot and the result is
discarded.

Everything a replay reads lives in static buffers sized for the largest graph: a step copies its
inputs into them on the device (a handful of small copies) and reads the hidden states out of a
static output buffer. Only the forward up to the final norm is captured; the LM head and the
sampler run eagerly on the sampled rows, whose count varies.

Graphs need a backend that plans on the device alone (the Triton one): the torch backend reads
host-side lengths, which a replay would never see change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from services.engine_core.attention.base import AttentionBackend, AttentionMetadata

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE  # what graph_pool_handle() returns; importing it at run time is a cycle

log = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    """The batch sizes graphs are captured for, ascending; the last one is >= max_batch."""
    ladder = [1, 2, 4, 8, *range(16, max_batch, 16)]
    return [s for s in ladder if s < max_batch] + [max_batch]


class Graph(Protocol):
    def capture(self, fn: Callable[[], None]) -> None: ...
    def replay(self) -> None: ...


class CudaGraph:
    """torch.cuda.CUDAGraph sharing one memory pool with the other sizes' graphs (they never
    run at once, so their intermediate tensors may overlap)."""

    def __init__(self, pool: _POOL_HANDLE | None) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, fn: Callable[[], None]) -> None:
        with torch.cuda.graph(self.graph, pool=self.pool):
            fn()

    def replay(self) -> None:
        self.graph.replay()


class EagerGraph:
    """Replays by calling the captured function again: the same padding and buffer logic
    without CUDA, so it can be checked on a CPU (tests, the Triton interpreter)."""

    def __init__(self) -> None:
        self.fn: Callable[[], None] | None = None

    def capture(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        fn()

    def replay(self) -> None:
        assert self.fn is not None
        self.fn()


class DecodeGraphs:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[tuple[Tensor, Tensor]],
        backend: AttentionBackend,
        max_batch: int,
        max_model_len: int,
        block_size: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        make_graph: Callable[[], Graph] | None = None,
    ) -> None:
        """make_graph: a factory for the graphs; default: CUDA graphs sharing one pool."""
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_batch)
        n = self.sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        i32: dict[str, Any] = dict(dtype=torch.int32, device=device)
        i64: dict[str, Any] = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(n, **i64)
        self.positions = torch.zeros(n, **i64)
        self.slot_mapping = torch.full((n,), -1, **i64)
        self.seq_lens = torch.ones(n, **i32)
        # One new token per row in every pure-decode step: the offsets never change.
        self.query_start_loc = torch.arange(n + 1, **i32)
        self.block_tables = torch.zeros((n, max_blocks), **i32)
        self.hidden = torch.zeros((n, hidden_size), dtype=dtype, device=device)
        if make_graph is None:
            pool = torch.cuda.graph_pool_handle()
            make_graph = lambda: CudaGraph(pool)  # noqa: E731
        self._make_graph = make_graph
        self.graphs: dict[int, Graph] = {}

    def _metadata(self, size: int) -> AttentionMetadata:
        # Sized as if every context were as long as the model allows, so a backend that plans
        # from lengths (the split count) picks a plan valid for any context the replay meets.
        return AttentionMetadata(
            num_reqs=size,
            num_tokens=size,
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            slot_mapping=self.slot_mapping[:size],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            query_lens_cpu=[1] * size,
            seq_lens_cpu=[self.max_model_len] * size,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first so the shared pool is sized by the first graph.
        The buffers hold padding only (slot -1), so capturing writes nothing to the cache."""
        t0 = time.perf_counter()
        for size in reversed(self.sizes):
            md = self._metadata(size)

            def forward(size: int = size, md: AttentionMetadata = md) -> None:
                h = self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, md, self.backend)
                self.hidden[:size].copy_(h)

            forward()  # warm-up: compiles kernels and settles allocations outside the capture
            if self.hidden.is_cuda:
                torch.cuda.synchronize(self.hidden.device)
            graph = self._make_graph()
            graph.capture(forward)
            self.graphs[size] = graph
        if self.hidden.is_cuda:
            torch.cuda.synchronize(self.hidden.device)
        log.info("captured decode graphs for batch sizes %s in %.1fs", self.sizes, time.perf_counter() - t0)

    def can_run(self, md: AttentionMetadata) -> bool:
        return md.is_pure_decode and md.num_reqs <= self.sizes[-1] and bool(self.graphs)

    def run(self, input_ids: Tensor, positions: Tensor, md: AttentionMetadata) -> Tensor:
        """The final hidden states [num_reqs, hidden] of a pure-decode step, by graph replay."""
        b = md.num_reqs
        size = next(s for s in self.sizes if s >= b)
        self.input_ids[:b].copy_(input_ids, non_blocking=True)
        self.positions[:b].copy_(positions, non_blocking=True)
        self.slot_mapping[:b].copy_(md.slot_mapping, non_blocking=True)
        self.seq_lens[:b].copy_(md.seq_lens, non_blocking=True)
        width = md.block_tables.shape[1]
        self.block_tables[:b, :width].copy_(md.block_tables, non_blocking=True)
        if size > b:
            # The previous step may have left real requests' values in these rows.
            self.slot_mapping[b:size].fill_(-1)
            self.seq_lens[b:size].fill_(1)
            self.block_tables[b:size, 0].zero_()
        self.graphs[size].replay()
        return self.hidden[:b]
