"""The greedy sampler's argmax on a CPU: max(dim) against the blocked first_argmax, by rows.

A step verifying k drafts takes the argmax of 1 + k rows of logits per request.
services/engine_core/sampler.py's first_argmax takes rows blockwise past _ARGMAX_PLAIN_MAX
logits and with the plain max(dim) below; this times both paths at each row count, on fresh
logits (a new tensor per call, as the LM head writes them, so not in cache), alternated round
by round in one process, 1 thread, CPU time (time.thread_time): the figures that set the
threshold, on whatever machine runs it.

    .venv/bin/python benchmarks/first_argmax.py                 # SmolLM2's 49,152-token vocabulary
    .venv/bin/python benchmarks/first_argmax.py --rounds 4      # a smoke run

Writes benchmarks/results/first_argmax.json (with machine_info).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
from machine_info import machine_info, write_results  # noqa: E402

import services.engine_core.sampler as sampler  # noqa: E402

RESULTS = os.path.join(HERE, "results", "first_argmax.json")


def time_path(path: str, rows: int, vocab: int, calls: int) -> float:
    """Mean CPU ms of one call on `rows` fresh rows through one path (plain or blocked)."""
    xs = [torch.randn(rows, vocab) for _ in range(calls)]
    plain_max = sampler._ARGMAX_PLAIN_MAX
    sampler._ARGMAX_PLAIN_MAX = sys.maxsize if path == "plain" else 0
    try:
        t0 = time.thread_time()
        for x in xs:
            sampler.first_argmax(x)
        return 1000 * (time.thread_time() - t0) / calls
    finally:
        sampler._ARGMAX_PLAIN_MAX = plain_max


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", type=int, default=[1, 2, 3, 4, 5, 6, 9, 17, 72])
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=20, help="calls per round and path")
    p.add_argument("--output", default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    times: dict[tuple[int, str], list[float]] = {}
    for r in range(args.rounds):
        for rows in args.rows:
            # Alternate which path goes first: neither always meets the warmer cache.
            for path in ("plain", "blocked") if r % 2 == 0 else ("blocked", "plain"):
                times.setdefault((rows, path), []).append(time_path(path, rows, args.vocab, args.calls))
    points: list[dict[str, Any]] = []
    for rows in args.rows:
        plain, blocked = (statistics.median(times[(rows, p)]) for p in ("plain", "blocked"))
        chosen = "plain" if rows * args.vocab <= sampler._ARGMAX_PLAIN_MAX else "blocked"
        points.append({"rows": rows, "plain_ms": plain, "blocked_ms": blocked, "first_argmax_takes": chosen})
        print(f"{rows:>3} rows  plain {plain:.4f} ms  blocked {blocked:.4f} ms  first_argmax takes {chosen}")
    out = {
        "benchmark": "first_argmax",
        "machine": machine_info(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": vars(args),
        "plain_max_logits": sampler._ARGMAX_PLAIN_MAX,
        "points": points,
    }
    write_results(args.output, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
