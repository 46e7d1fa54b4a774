"""Where a single-stream CPU decode step's time goes, per mode (issue 10).

For each mode (perplexity.py's), an LLMEngine (the engine the server steps, without its
processes) decodes one greedy request whose prompt is --context tokens long. Over --steps decode
steps per variant (mode x torch thread count), variants interleaved in blocks of a few steps (the
machine is shared), it times engine.step() and, inside it, the model runner's input building
(`prepare`), the forward through the layers, the LM head, the sampler, and the rest (scheduler,
block manager, output building: `engine`). Then torch.profiler over --profile-steps more steps
(at the first thread count) counts the aten ops Python issues per step and their time by kind
(inclusive of the kernels they call); `python (between ops)` is the part of the profiled steps
that no op accounts for (interpreter, dispatch, the profiler's own overhead).

    .venv/bin/python benchmarks/decode_profile.py                       # int4-bf16, int4, fp32; 2 and 1 threads
    .venv/bin/python benchmarks/decode_profile.py --modes int4-bf16 --threads 1 --steps 20
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/decode_profile.py --output /tmp/passive.json

OpenMP's wait policy is read once per process, so compare it across runs (it is recorded).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from machine_info import machine_info, write_results  # noqa: E402
from perplexity import MODES  # noqa: E402

from services.engine_core.engine import LLMEngine  # noqa: E402
from shared.config import EngineConfig  # noqa: E402
from shared.protocol import SamplingParams  # noqa: E402

RESULTS = os.path.join(HERE, "results", "decode_profile.json")
PARTS = ("prepare", "forward", "lm_head", "sampler")

# aten op (as Python issues it) -> kind, for the per-kind table; anything else is "other".
KINDS = {
    "aten::_weight_int4pack_mm_for_cpu": "int4/int8 matmul",
    "aten::_weight_int8pack_mm": "int4/int8 matmul",
    "aten::linear": "dense matmul",
    "aten::addmm_": "dense matmul",
    "aten::addmm": "dense matmul",
    "aten::mm": "dense matmul",
    "aten::scaled_dot_product_attention": "attention (SDPA)",
    "aten::index_select": "gathers (K/V, rows, RoPE tables)",
    "aten::embedding": "gathers (K/V, rows, RoPE tables)",
    "aten::index_copy_": "KV-cache writes",
    "aten::rms_norm": "RMSNorm",
    "aten::mul": "RoPE, SiLU x mul, residual adds",
    "aten::roll": "RoPE, SiLU x mul, residual adds",
    "aten::addcmul_": "RoPE, SiLU x mul, residual adds",
    "aten::silu_": "RoPE, SiLU x mul, residual adds",
    "aten::mul_": "RoPE, SiLU x mul, residual adds",
    "aten::add_": "RoPE, SiLU x mul, residual adds",
    "aten::view": "views, slices, casts",
    "aten::slice": "views, slices, casts",
    "aten::select": "views, slices, casts",
    "aten::reshape": "views, slices, casts",
    "aten::transpose": "views, slices, casts",
    "aten::unsqueeze": "views, slices, casts",
    "aten::split": "views, slices, casts",
    "aten::chunk": "views, slices, casts",
    "aten::to": "views, slices, casts",
    "aten::contiguous": "views, slices, casts",
    # The fused decode step's own kernels (services/engine_core/fused_cpu), recorded by name.
    "novainfer::paged_attention": "attention (fused)",
    "novainfer::add_rms_norm": "RMSNorm",
    "novainfer::rope_write_kv": "RoPE + KV-cache writes (fused)",
    "novainfer::silu_mul": "RoPE, SiLU x mul, residual adds",
}


class Timed:
    """Wraps a callable, adding each call's wall time to totals[name] (totals may be swapped)."""

    def __init__(self, fn: Callable[..., Any], totals: dict[str, float], name: str) -> None:
        self.fn, self.totals, self.name = fn, totals, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.totals[self.name] += time.perf_counter() - t0


def build_engine(mode: str, threads: int, context: int, steps: int) -> tuple[LLMEngine, list[Timed]]:
    overrides, _ = MODES[mode]
    engine = LLMEngine(EngineConfig(num_threads=threads, max_num_seqs=8, kv_cache_bytes=256 << 20, **overrides))
    runner = engine.runner
    totals: dict[str, float] = defaultdict(float)
    timers = [
        Timed(runner._prepare, totals, "prepare"),
        Timed(runner.forward, totals, "forward"),
        Timed(runner.model.compute_logits, totals, "lm_head"),
        Timed(runner.sampler, totals, "sampler"),
    ]
    runner._prepare, runner.forward, runner.model.compute_logits, runner.sampler = timers  # type: ignore[method-assign,assignment]
    prompt = torch.randint(100, 20000, (context,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=10 * steps + 100, temperature=0.0, ignore_eos=True)
    engine.add_request("profiled", prompt, params)
    # Prefill (the whole prompt in chunks) until the first decode step.
    while not any(r.num_computed_tokens >= context for r in engine.scheduler.running):
        engine.step()
    return engine, timers


def profile_ops(engine: LLMEngine, steps: int) -> dict[str, Any]:
    """Top-level ops per step, by kind, inclusive of their kernels: the aten ops Python issues,
    and in the fused decode step the aten ops and named kernels its one C++ call runs."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - t0
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.cpu_parent is not None or not ev.name.startswith(("aten::", "novainfer::")):
            continue
        kind = KINDS.get(ev.name, "other")
        by_kind[kind][0] += 1
        by_kind[kind][1] += ev.cpu_time_total / 1e3  # us -> ms
    ops = sum(n for n, _ in by_kind.values())
    op_ms = sum(ms for _, ms in by_kind.values())
    kinds = {k: {"ops_per_step": n / steps, "ms_per_step": ms / steps} for k, (n, ms) in by_kind.items()}
    kinds["python (between ops)"] = {"ops_per_step": 0, "ms_per_step": (wall * 1e3 - op_ms) / steps}
    return {"profiled_step_ms": wall * 1e3 / steps, "aten_ops_per_step": ops / steps, "by_kind": kinds}


BLOCK = 5
"""Steps a variant runs before the next one takes over (thread-count switches stay rare)."""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=["int4-bf16", "int4", "fp32"])
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="torch thread counts to compare")
    p.add_argument("--context", type=int, default=512, help="prompt tokens before the decode steps")
    p.add_argument("--steps", type=int, default=60, help="timed decode steps per variant")
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument("--output", default=RESULTS)
    args = p.parse_args()
    variants = [(m, t) for m in args.modes for t in args.threads]
    engines = {m: build_engine(m, max(args.threads), args.context, len(args.threads) * args.steps) for m in args.modes}
    totals = {v: defaultdict(float) for v in variants}
    step_ms: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
    for _ in range(-(-args.steps // BLOCK)):
        for mode, threads in variants:
            engine, timers = engines[mode]
            torch.set_num_threads(threads)
            for timer in timers:
                timer.totals = totals[(mode, threads)]
            for _ in range(BLOCK):
                t0 = time.perf_counter()
                engine.step()
                step_ms[(mode, threads)].append((time.perf_counter() - t0) * 1e3)

    out: dict[str, Any] = {
        "benchmark": "decode_profile",
        "machine": machine_info(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_"))},
        "context": args.context,
        "steps": len(step_ms[variants[0]]),
        "variants": [],
    }
    for mode, threads in variants:
        engine, timers = engines[mode]
        n = len(step_ms[(mode, threads)])
        parts = {k: totals[(mode, threads)][k] * 1e3 / n for k in PARTS}
        mean_step = statistics.fmean(step_ms[(mode, threads)])
        parts["engine"] = mean_step - sum(parts.values())
        r = {
            "mode": mode,
            "config": MODES[mode][0],
            "threads": threads,
            "step_ms_median": statistics.median(step_ms[(mode, threads)]),
            "step_ms_mean": mean_step,
            "parts_ms_mean": parts,
        }
        print(
            f"{mode}, {threads} threads: step {r['step_ms_median']:.2f} ms median; "
            + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()),
            flush=True,
        )
        if threads == args.threads[0]:
            torch.set_num_threads(threads)
            for timer in timers:
                timer.totals = defaultdict(float)
            r["ops"] = ops = profile_ops(engine, args.profile_steps)
            print(f"    {ops['aten_ops_per_step']:.0f} aten ops/step (profiled: {ops['profiled_step_ms']:.2f} ms)")
            for kind, v in sorted(ops["by_kind"].items(), key=lambda kv: -kv[1]["ms_per_step"]):
                print(f"    {kind:36s} {v['ops_per_step']:6.0f} ops {v['ms_per_step']:7.2f} ms", flush=True)
        out["variants"].append(r)
    write_results(args.output, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
