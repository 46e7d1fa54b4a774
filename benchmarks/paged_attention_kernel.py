"""The fused CPU step's paged attention kernel alone (fused_cpu/csrc/attention.h), per layer call.

Times `paged_attention` on SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head_dim
64, 16-token blocks) over B requests of a given context, each with 1 + k query rows (k drafts
being verified), two ways on the same cache and queries:
  grouped  one call with the rows grouped by request: every KV block is read and converted once
           per (request, KV head, split) for all 1 + k rows
  per_row  the same rows, each attended as its own decode row (a block table per row and
           seq_len = its position + 1): each row re-reads its whole context
k = 0 (pure decode) is the same call both ways. --layers N gives each call the next of N layers'
caches, as a step's 30 layer calls have (by default one: its K/V stay in L2 from call to call,
which a step's do not). With --baseline REF, a third: the grouped call
of the kernel as git REF has it (its csrc/ built aside), for an A/B of a kernel change. They are
timed alternately in every round, each first in turn (interleaved, the machine is shared) and the medians reported,
with grouped / per_row (and grouped / baseline): wall time, or with --threads 1 the calling
thread's CPU time (a loaded machine's preemptions left out). Per (B, context), also the first
row's cost (k = 0) and each further row's (the least-squares slope over the k given, per
request). Writes benchmarks/results/paged_attention_kernel.json with machine_info.

    .venv/bin/python benchmarks/paged_attention_kernel.py             # B 1 and 8, k 0/4/8, contexts 128..2048
    .venv/bin/python benchmarks/paged_attention_kernel.py --quick     # a smoke check
    .venv/bin/python benchmarks/paged_attention_kernel.py --batch 1 --drafts 0 8 --context 128 500 2000 \
        --threads 1 --layers 30 --baseline main                       # a step's K/V traffic, A/B
    .venv/bin/python benchmarks/paged_attention_kernel.py --batch 1 --drafts 0 1 2 3 4 5 6 7 \
        --context 600 --threads 1 --baseline main~1                   # rows 1..8 of one request, A/B
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
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

    def __init__(self, batch: int, k: int, context: int, layers: int = 1) -> None:
        gen = torch.Generator().manual_seed(batch * 1000 + k)
        q_len = 1 + k
        seq_lens = [context + q_len + i for i in range(batch)]  # lengths that differ a little
        blocks = -(-max(seq_lens) // BLOCK)
        table = torch.randperm(batch * blocks, generator=gen).to(torch.int32).view(batch, blocks)
        shape = (batch * blocks, BLOCK, N_KV, HEAD_DIM)
        self.caches = [
            (torch.randn(shape, generator=gen).to(torch.bfloat16), torch.randn(shape, generator=gen).to(torch.bfloat16))
            for _ in range(layers)
        ]
        self.q = torch.randn(batch * q_len, N_HEADS, HEAD_DIM, generator=gen)
        self.tables, self.seq_lens = table, torch.tensor(seq_lens, dtype=torch.int32)
        self.starts = torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32)
        # Per row: its request's table, and its own position + 1 as its context.
        self.row_tables = table.repeat_interleave(q_len, dim=0)
        self.row_lens = torch.tensor([s - q_len + j + 1 for s in seq_lens for j in range(q_len)], dtype=torch.int32)
        self.row_starts = torch.arange(batch * q_len + 1, dtype=torch.int32)

    def grouped(self, ext: ModuleType) -> Callable[[], Any]:
        return self._calls(ext, self.tables, self.starts, self.seq_lens)

    def per_row(self, ext: ModuleType) -> Callable[[], Any]:
        return self._calls(ext, self.row_tables, self.row_starts, self.row_lens)

    def _calls(
        self, ext: ModuleType, tables: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor
    ) -> Callable[[], Any]:
        """A call on the next layer's caches each time."""
        layers = itertools.cycle(self.caches)

        def call() -> Any:
            k_cache, v_cache = next(layers)
            return ext.paged_attention(self.q, k_cache, v_cache, tables, starts, lens, HEAD_DIM**-0.5)

        return call


def build_baseline(ref: str) -> ModuleType:
    """The extension as git `ref` has its csrc/, built in a temporary directory. Its FusedDecoder
    class is registered module-local so that it loads beside this tree's."""
    csrc = "services/engine_core/fused_cpu/csrc"
    archive = subprocess.run(["git", "-C", ROOT, "archive", ref, csrc], check=True, capture_output=True).stdout
    work = tempfile.mkdtemp(prefix="paged_attention_baseline_")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(work, filter="data")
    src = os.path.join(work, csrc)
    main_cpp = os.path.join(src, extension.SOURCES[0])
    with open(main_cpp) as f:
        text = f.read()
    with open(main_cpp, "w") as f:
        f.write(text.replace('(m, "FusedDecoder")', '(m, "FusedDecoder", py::module_local())'))
    import ninja
    from torch.utils import cpp_extension

    os.environ["PATH"] = os.pathsep.join((ninja.BIN_DIR, os.environ.get("PATH", "")))
    build = os.path.join(work, "build")
    os.makedirs(build)
    try:
        return cpp_extension.load(
            name="paged_attention_baseline",
            sources=[os.path.join(src, s) for s in extension.SOURCES],
            extra_cflags=extension.cflags(),
            extra_ldflags=list(extension.LDFLAGS),
            extra_include_paths=[src],
            build_directory=build,
            verbose=False,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def slope(xs: list[int], ys: list[float]) -> float:
    """The least-squares slope of ys over xs (0 for a single point)."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


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
    p.add_argument("--baseline", default=None, help="a git ref whose kernel to time beside this tree's")
    p.add_argument("--layers", type=int, default=1, help="layers' caches, a call on each in turn (a step: 30)")
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

    base = build_baseline(args.baseline) if args.baseline else None

    cases = {(b, k, c): Case(b, k, c, args.layers) for b in args.batch for k in args.drafts for c in args.context}
    names = ("grouped", "per_row") + (("baseline",) if base else ())
    times: dict[tuple[int, int, int], dict[str, list[float]]] = {key: {n: [] for n in names} for key in cases}
    # Made once: with --layers, each goes on through the layers from round to round.
    calls = {key: [("grouped", case.grouped(ext)), ("per_row", case.per_row(ext))] for key, case in cases.items()}
    if base:
        for key, case in cases.items():
            calls[key].append(("baseline", case.grouped(base)))
    for i in range(args.rounds):
        for key in cases:
            # Each its turn first: the first call after another case's ran slower (a k = 0 call,
            # the same one three ways, 104 / 74 / 64 us first / second / third, AVX-512 Zen 4).
            turn = i % len(calls[key])
            for name, fn in calls[key][turn:] + calls[key][:turn]:
                times[key][name].append(time_call(fn, args.reps, clock))

    rows = []
    what = "CPU time" if threads == 1 else "wall time"
    print(f"{threads} threads; microseconds ({what}) per layer call, medians of {args.rounds} rounds")
    extra = f" {'baseline':>9} {'ratio':>6}" if base else ""
    print(f"{'B':>3} {'k':>3} {'context':>8} {'grouped':>9} {'per_row':>9} {'ratio':>6}{extra}")
    for (b, k, c), t in times.items():
        grouped, per_row = statistics.median(t["grouped"]), statistics.median(t["per_row"])
        row = {"batch": b, "drafts": k, "context": c, "grouped_us": grouped, "per_row_us": per_row,
               "grouped_over_per_row": grouped / per_row}  # fmt: skip
        line = f"{b:>3} {k:>3} {c:>8} {grouped:>9.1f} {per_row:>9.1f} {grouped / per_row:>6.2f}"
        if base:
            baseline = statistics.median(t["baseline"])
            row |= {"baseline_us": baseline, "grouped_over_baseline": grouped / baseline}
            line += f" {baseline:>9.1f} {grouped / baseline:>6.2f}"
        rows.append(row)
        print(line)
    # Per (B, context): the first row of each request (k = 0) and each further row (the slope
    # over k, per request), this tree's and the baseline's.
    costs = []
    for b in args.batch:
        for c in args.context:
            ks = sorted(args.drafts)
            cost: dict[str, Any] = {"batch": b, "context": c}
            for name in ("grouped",) + (("baseline",) if base else ()):
                us = [statistics.median(times[(b, k, c)][name]) for k in ks]
                first = us[0] / b if ks[0] == 0 else None
                cost[name] = {"first_row_us": first, "per_extra_row_us": slope(ks, us) / b}
            costs.append(cost)
            parts = [
                f"{name} first row {v['first_row_us'] or float('nan'):.1f}, per extra row {v['per_extra_row_us']:.1f}"
                for name, v in cost.items()
                if isinstance(v, dict)
            ]
            print(f"B={b} context {c}: us per request per layer: " + "; ".join(parts))
    out = {
        "benchmark": "paged_attention_kernel",
        "machine": machine_info(),
        "threads": threads,
        "clock": "thread_time" if threads == 1 else "perf_counter",
        "shape": {"n_heads": N_HEADS, "n_kv_heads": N_KV, "head_dim": HEAD_DIM, "block_size": BLOCK},
        "rounds": args.rounds,
        "quick": args.quick,
        "layers": args.layers,
        "baseline": args.baseline,
        "results": rows,
        "row_costs": costs,
    }
    write_results(args.output, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
