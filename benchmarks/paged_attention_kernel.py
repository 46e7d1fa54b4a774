"""The fused CPU step's paged attention kernel alone (fused_cpu/csrc/attention.h), per layer call.

Times `paged_attention` on SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head_dim
64, 16-token blocks) over B requests of a given context, each with 1 + k query rows (k drafts
being verified), two ways on the same cache and queries:
  grouped  one call with the rows grouped by request: every KV block is read and converted once
           per (request, KV head, split) for all 1 + k rows
  per_row  the same rows, each attended as its own decode row (a block table per row and
           seq_len = its position + 1): each row re-reads its whole context
k = 0 (pure decode) is the same call both ways. The two are timed alternately in every round
(A/B interleaved, the machine is shared) and the medians reported, with grouped / per_row:
wall time, or with --threads 1 the calling thread's CPU time (a loaded machine's preemptions
left out). Writes benchmarks/results/paged_attention_kernel.json with machine_info.

    .venv/bin/python benchmarks/paged_attention_kernel.py             # B 1 and 8, k 0/4/8, contexts 128..2048
    .venv/bin/python benchmarks/paged_attention_kernel.py --quick     # a smoke check
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from machine_info import machine_info, write_results  # noqa: E402

from services.engine_core.fused_cpu import extension  # noqa: E402
from shared.config import available_cores  # noqa: E402

RESULTS = os.path.join(HERE, "results", "paged_attention_kernel.json")
N_HEADS, N_KV, HEAD_DIM, BLOCK = 9, 3, 64, 16  # SmolLM2-135M


class Case:
    """B requests of `context` tokens before this step, each with 1 + k rows, on shuffled blocks."""

    def __init__(self, batch: int, k: int, context: int) -> None:
        gen = torch.Generator().manual_seed(batch * 1000 + k)
        q_len = 1 + k
        seq_lens = [context + q_len + i for i in range(batch)]  # lengths that differ a little
        blocks = -(-max(seq_lens) // BLOCK)
        table = torch.randperm(batch * blocks, generator=gen).to(torch.int32).view(batch, blocks)
        shape = (batch * blocks, BLOCK, N_KV, HEAD_DIM)
        self.k_cache = torch.randn(shape, generator=gen).to(torch.bfloat16)
        self.v_cache = torch.randn(shape, generator=gen).to(torch.bfloat16)
        self.q = torch.randn(batch * q_len, N_HEADS, HEAD_DIM, generator=gen)
        self.tables, self.seq_lens = table, torch.tensor(seq_lens, dtype=torch.int32)
        self.starts = torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32)
        # Per row: its request's table, and its own position + 1 as its context.
        self.row_tables = table.repeat_interleave(q_len, dim=0)
        self.row_lens = torch.tensor([s - q_len + j + 1 for s in seq_lens for j in range(q_len)], dtype=torch.int32)
        self.row_starts = torch.arange(batch * q_len + 1, dtype=torch.int32)

    def grouped(self, ext: ModuleType) -> Callable[[], Any]:
        return lambda: ext.paged_attention(
            self.q, self.k_cache, self.v_cache, self.tables, self.starts, self.seq_lens, HEAD_DIM**-0.5
        )

    def per_row(self, ext: ModuleType) -> Callable[[], Any]:
        return lambda: ext.paged_attention(
            self.q, self.k_cache, self.v_cache, self.row_tables, self.row_starts, self.row_lens, HEAD_DIM**-0.5
        )


def time_call(fn: Callable[[], Any], reps: int, clock: Callable[[], float]) -> float:
    """Mean microseconds per call over reps calls (after one warm-up)."""
    fn()
    t0 = clock()
    for _ in range(reps):
        fn()
    return (clock() - t0) / reps * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--drafts", type=int, nargs="+", default=[0, 4, 8])
    p.add_argument("--context", type=int, nargs="+", default=[128, 512, 1024, 2048])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--reps", type=int, default=10, help="calls per timing")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core, as the engine)")
    p.add_argument("--quick", action="store_true", help="a smoke check, not figures")
    p.add_argument("--output", default=RESULTS)
    args = p.parse_args()
    if args.quick:
        args.batch, args.drafts, args.context, args.rounds, args.reps = [1, 8], [0, 4], [128, 600], 2, 2
    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    # One thread runs the kernel on the calling thread: its CPU time is what the kernel costs,
    # whatever else the machine runs. With more, wall time (the threads' waits are the point).
    clock = time.thread_time if threads == 1 else time.perf_counter
    ext = extension.load(extension.DEFAULT_CACHE_DIR)
    if ext is None:
        raise SystemExit("the fused CPU kernels did not build here (see the warning above)")

    cases = {(b, k, c): Case(b, k, c) for b in args.batch for k in args.drafts for c in args.context}
    times: dict[tuple[int, int, int], dict[str, list[float]]] = {key: {"grouped": [], "per_row": []} for key in cases}
    for _ in range(args.rounds):
        for key, case in cases.items():
            for name, fn in (("grouped", case.grouped(ext)), ("per_row", case.per_row(ext))):
                times[key][name].append(time_call(fn, args.reps, clock))

    rows = []
    what = "CPU time" if threads == 1 else "wall time"
    print(f"{threads} threads; microseconds ({what}) per layer call, medians of {args.rounds} rounds")
    print(f"{'B':>3} {'k':>3} {'context':>8} {'grouped':>9} {'per_row':>9} {'ratio':>6}")
    for (b, k, c), t in times.items():
        grouped, per_row = statistics.median(t["grouped"]), statistics.median(t["per_row"])
        rows.append(
            {"batch": b, "drafts": k, "context": c, "grouped_us": grouped, "per_row_us": per_row,
             "grouped_over_per_row": grouped / per_row}
        )  # fmt: skip
        print(f"{b:>3} {k:>3} {c:>8} {grouped:>9.1f} {per_row:>9.1f} {grouped / per_row:>6.2f}")
    out = {
        "benchmark": "paged_attention_kernel",
        "machine": machine_info(),
        "threads": threads,
        "clock": "thread_time" if threads == 1 else "perf_counter",
        "shape": {"n_heads": N_HEADS, "n_kv_heads": N_KV, "head_dim": HEAD_DIM, "block_size": BLOCK},
        "rounds": args.rounds,
        "quick": args.quick,
        "results": rows,
    }
    write_results(args.output, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
