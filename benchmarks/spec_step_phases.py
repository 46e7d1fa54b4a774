"""Where an engine step's time goes, speculation off vs on, by the drafts the step verifies.

Runs the grounded workload of benchmarks/speculative.py one request at a time (c = 1, greedy,
EOS honoured) through the offline engine (the served engine core's loop minus ZMQ, with its
start-up heap frozen as the server freezes it) for each method, and times every step by phase:

  propose   the proposer and the draft-length policy (engine._propose)
  schedule  scheduler.schedule
  prepare   ModelRunner._prepare (input ids, positions, slots, block tables)
  forward   ModelRunner.forward; `path` says which ran: fused (one C++ call) or eager
  lm_head   compute_logits over the sampled rows (1 + k per request)
  sampler   the sampler over those rows
  update    scheduler.update (acceptance, rollback, stops)
  other     the rest of the step: sampling metadata, acceptance, outputs, step-cost record
  emit      after the step, what the engine-core process does with its outputs: the engine's
            stats and the msgspec encoding of the step's EngineOutputs message (server._flush)
  detok     the tokenizer pool's incremental detokenizer per output message (RequestStream)

`--clock cpu` times with time.thread_time instead of the wall clock: with `--threads 1` every
op runs on the calling thread, so that is the step's CPU time, which other processes on a
shared machine do not inflate (the wall clock, with 2 threads, is what a quiet machine serves).
The tokenizer pool's and the gateway's own CPU per served step, in their processes, is what
`speculative.py --paired` reports (`process_cpu_ms_per_step`).

Steps are grouped by kind (prefill or mixed; decode-only by the draft tokens they verify,
k = 0..K). Also the collector's pauses (gc) over the run. Medians and means per group, ms.
The expected step time from the cost of each k (benchmarks/verify_step_cost.py) and this
histogram of k is the figure to compare with TPOT x tokens per step.

    .venv/bin/python benchmarks/spec_step_phases.py                                # off, suffix, ngram; 12 requests
    .venv/bin/python benchmarks/spec_step_phases.py --methods suffix --requests 2  # a smoke run
    .venv/bin/python benchmarks/spec_step_phases.py --threads 1 --clock cpu        # on a shared machine

Writes benchmarks/results/spec_step_phases.json (with machine_info).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import speculative as spec_bench  # noqa: E402
from machine_info import machine_info, write_results  # noqa: E402

from novainfer.llm import LLM  # noqa: E402
from services.engine_core.attention.base import AttentionMetadata  # noqa: E402
from services.engine_core.server import freeze_startup_heap  # noqa: E402
from services.tokenizer_pool.detokenizer import RequestStream  # noqa: E402
from shared.protocol import EngineOutputs, SamplingParams, encode  # noqa: E402

RESULTS = os.path.join(HERE, "results", "spec_step_phases.json")
PHASES = ("propose", "schedule", "prepare", "forward", "lm_head", "sampler", "update")
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


class StepTimer:
    """Wraps the engine's phases (instance attributes shadowing the methods) and records,
    per step, the seconds of each and the step's shape."""

    def __init__(self, llm: LLM, clock: Callable[[], float]) -> None:
        engine = llm.engine
        self.clock = clock
        runner = engine.runner
        self.steps: list[dict[str, Any]] = []
        self.cur: dict[str, Any] = {}
        if engine.proposer is not None:
            self._wrap(engine, "_propose", "propose")
        self._wrap(engine.scheduler, "schedule", "schedule")
        self._wrap(runner, "_prepare", "prepare")
        self._wrap(runner, "forward", "forward")
        self._wrap(runner.model, "compute_logits", "lm_head")
        self._wrap(runner, "sampler", "sampler")
        self._wrap(engine.scheduler, "update", "update")
        forward = runner.forward

        def forward_with_path(ids: Any, pos: Any, md: AttentionMetadata) -> Any:
            fused = runner.fused is not None and runner.fused.can_run(md)
            self.cur["shape"] = (md.num_reqs, md.num_tokens, md.num_draft_tokens, fused)
            return forward(ids, pos, md)

        runner.forward = forward_with_path  # type: ignore[method-assign]
        step = engine.step

        def timed_step() -> Any:
            self.cur = {}
            t0 = clock()
            out = step()
            t1 = clock()
            self.cur["step"] = t1 - t0
            # What the engine-core process sends once a step is done (server._flush).
            encode(EngineOutputs(engine_index=0, outputs=out, stats=engine.stats()))
            self.cur["emit"] = clock() - t1
            if "shape" in self.cur:
                self.steps.append(self.cur)
            return out

        engine.step = timed_step  # type: ignore[method-assign]

    def _wrap(self, obj: Any, name: str, key: str) -> None:
        fn: Callable[..., Any] = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cur[key] = self.cur.get(key, 0.0) + self.clock() - t0

        setattr(obj, name, timed)


class GcPauses:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.pauses: list[float] = []
        self._t0 = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = self.clock()
        else:
            self.pauses.append(self.clock() - self._t0)

    def close(self) -> None:
        gc.callbacks.remove(self._callback)


def kind(shape: tuple[int, int, int, bool]) -> str:
    reqs, tokens, drafts, fused = shape
    if tokens - drafts != reqs:
        return "prefill/mixed"
    return f"k={drafts}" + ("" if fused else " EAGER")


def summarize(steps: list[dict[str, Any]]) -> dict[str, Any]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in steps:
        groups[kind(s["shape"])].append(s)
    out: dict[str, Any] = {}
    for name, group in sorted(groups.items(), key=lambda kv: (len(kv[0]), kv[0])):
        row: dict[str, Any] = {"steps": len(group), "fused": sum(s["shape"][3] for s in group)}
        for phase in ("step", *PHASES, "emit"):
            values = [s.get(phase, 0.0) * 1000 for s in group]
            row[phase + "_ms"] = {"median": statistics.median(values), "mean": statistics.fmean(values)}
        other = [1000 * (s["step"] - sum(s.get(p, 0.0) for p in PHASES)) for s in group]
        row["other_ms"] = {"median": statistics.median(other), "mean": statistics.fmean(other)}
        out[name] = row
    return out


def run_method(method: str, args: argparse.Namespace) -> dict[str, Any]:
    engine_args: dict[str, Any] = {"num_threads": args.threads}
    if method != "off":
        engine_args |= {"speculative_method": method, "num_speculative_tokens": args.k}
    llm = LLM(**engine_args)
    greedy = SamplingParams(max_tokens=args.output_len, temperature=0.0)
    llm.generate("Hello there", SamplingParams(max_tokens=16, temperature=0.0), use_tqdm=False)  # warm-up
    freeze_startup_heap()  # as the engine-core process does
    clock = CLOCKS[args.clock]
    timer = StepTimer(llm, clock)
    pauses = GcPauses(clock)
    detok: list[float] = []
    process = RequestStream.process

    def timed_process(stream: RequestStream, out: Any) -> Any:
        t0 = clock()
        try:
            return process(stream, out)
        finally:
            detok.append(clock() - t0)

    RequestStream.process = timed_process  # type: ignore[method-assign]
    tokens = 0
    t0 = time.perf_counter()
    try:
        for item in spec_bench.grounded_items(args.requests, args.seed):
            if item.path == "/v1/completions":
                result = llm.generate(item.prompt, greedy, use_tqdm=False)
            else:
                result = llm.chat([{"role": "user", "content": item.prompt}], greedy, use_tqdm=False)
            tokens += len(result[0].outputs[0].token_ids)
    finally:
        RequestStream.process = process  # type: ignore[method-assign]
        pauses.close()
    wall = time.perf_counter() - t0
    steps = timer.steps
    line = (
        f"{method}: {tokens} tokens in {len(steps)} steps ({tokens / len(steps):.2f}/step), "
        f"{1000 * wall / tokens:.2f} ms/token"
    )
    print(line, flush=True)
    groups = summarize(steps)
    for name, row in groups.items():
        parts = "  ".join(f"{p} {row[p + '_ms']['median']:.2f}" for p in ("step", *PHASES, "other", "emit"))
        print(f"  {name:<14} n={row['steps']:<4} {parts}", flush=True)
    return {
        "method": method,
        "tokens": tokens,
        "steps": len(steps),
        "tokens_per_step": tokens / len(steps),
        "wall_s": wall,
        "ms_per_token": 1000 * wall / tokens,
        "eager_decode_steps": sum(1 for s in steps if kind(s["shape"]).endswith("EAGER")),
        "by_kind": groups,
        "detok_ms_per_message": 1000 * statistics.fmean(detok) if detok else None,
        "gc": {
            "pauses": len(pauses.pauses),
            "total_ms": 1000 * sum(pauses.pauses),
            "max_ms": 1000 * max(pauses.pauses, default=0.0),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["off", "suffix", "ngram"], choices=["off", "suffix", "ngram"])
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="wall: time.perf_counter; cpu: time.thread_time (with --threads 1, the step's CPU time)",
    )
    p.add_argument("--output", default=RESULTS)
    args = p.parse_args(argv)
    out: dict[str, Any] = {
        "benchmark": "spec_step_phases",
        "machine": machine_info(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": vars(args),
        "runs": [run_method(m, args) for m in args.methods],
    }
    write_results(args.output, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
