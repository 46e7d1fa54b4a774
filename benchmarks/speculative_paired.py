"""Speculative decoding served, paired: every method's server at once, each request sent to
each server in turn (`benchmarks/speculative.py --paired`).

The sequential mode runs one server per method, one after the other, minutes apart, and this
VM's speed drifts by +-30 % within minutes: each ratio of two such runs is mostly drift. This
is the standard interleaved (paired) A/B design instead: all servers start before the first
request, and the workload goes out in small units, each unit to every server back to back:

  single stream  one request to one server, the same request to the next, ... (one request
                 in flight at a time, whichever server it is on);
  concurrency c  a batch of c requests to one server at concurrency c, then the same batch to
                 the next.

Which server goes first rotates with each unit (alternates for two methods), so neither one
systematically meets a warmer or a cooler machine. Both servers of a pair then run on the
same machine within seconds, and the ratio of the pair (the speculative method's output
tok/s over off's for that unit, and off's mean TPOT over the method's) cancels the drift that
a whole-run ratio carries. Reported per method and workload point: the aggregate output tok/s
and TPOT, with the sequential mode's fields and JSON schema, over all units; and per method
against off, the units' ratios: median, geometric mean and a 95 % percentile-bootstrap
interval of the geometric mean (units resampled with replacement, seeded).

Honest by construction: the same prompts and flags for every server, each server sees each
request exactly once (so the suffix method's global cache of earlier outputs learns from the
same outputs as in the sequential mode, across units and points), one unit in flight at a
time. Idle servers must really be idle while another serves: each server's process tree's CPU
time is read (/proc/<pid>/stat) over the units it did not serve, and reported as
`idle_cpu_cores` (a busy-polling server would show here, and would tax the one serving).
Over the units it served, the same readings split by process (engine core, tokenizer pool,
gateway, launcher: benchmarks/process_cpu.py) give `process_cpu_ms_per_step`, what each
process costs a served engine step on the cores the engine's threads also need.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import compare_peers as cp
import process_cpu
import serve_bench as sb
import speculative as spec
from machine_info import machine_info

BOOTSTRAP_RESAMPLES = 2000
STEPS = "novainfer_engine_steps_total"


# ---------------------------------------------------------------- statistics of the pairs


def units(jobs: list[sb.Job], concurrency: int) -> list[list[sb.Job]]:
    """The workload cut into what every server gets in turn: a request (c = 1) or a batch of c."""
    return [jobs[i : i + concurrency] for i in range(0, len(jobs), concurrency)]


def turn_order(methods: Sequence[str], unit: int) -> list[str]:
    """The servers' order for the unit-th unit: rotated by one each unit, so that each method
    goes first equally often (for two methods: alternately)."""
    r = unit % len(methods)
    return [*methods[r:], *methods[:r]]


def geomean(xs: Sequence[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs))


def ratio_summary(ratios: Sequence[float], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """Median, geometric mean and a 95 % percentile-bootstrap interval of the geometric mean of
    paired ratios (None where there are none; ratios that are not positive are left out)."""
    xs = [x for x in ratios if x > 0 and math.isfinite(x)]
    if not xs:
        return {"n": 0, "median": None, "geomean": None, "ci95": None}
    rng = random.Random(seed)
    boot = sorted(geomean(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    return {
        "n": len(xs),
        "median": statistics.median(xs),
        "geomean": geomean(xs),
        "ci95": [sb.percentile(boot, 2.5), sb.percentile(boot, 97.5)],
    }


@dataclass
class UnitRun:
    """One server's share of one unit: its requests' results and the wall time it took."""

    duration_s: float
    results: list[tuple[sb.RequestSpec, sb.Result]]
    unfinished: int = 0
    """Requests still running at the point's timeout (cancelled)."""

    @property
    def tok_per_s(self) -> float:
        tokens = sum(r.output_tokens for _, r in self.results if r.ok)
        return tokens / self.duration_s if self.duration_s > 0 else math.nan

    @property
    def tpot(self) -> float:
        values = [t for _, r in self.results if r.ok and not math.isnan(t := sb.tpot(r))]
        return statistics.fmean(values) if values else math.nan


def paired_ratios(off: Sequence[UnitRun], other: Sequence[UnitRun]) -> dict[str, list[float]]:
    """Per unit: the method's output tok/s over off's, and off's mean TPOT over the method's
    (both > 1 when the method is faster); a unit with a failed request on either side is left out."""
    tok, tpot = [], []
    for a, b in zip(off, other, strict=True):
        if a.unfinished or b.unfinished or not all(r.ok for _, r in (*a.results, *b.results)):
            continue
        tok.append(b.tok_per_s / a.tok_per_s)
        tpot.append(a.tpot / b.tpot)
    return {"output_tok_per_s_ratio": tok, "tpot_speedup": tpot}


# ---------------------------------------------------------------- servers


@dataclass
class PairedServer:
    method: str
    server: cp.Server
    outputs: dict[str, str] = field(default_factory=dict)
    """Request body -> digest of its output text."""
    idle_cpu_s: float = 0.0
    """CPU seconds of the server's processes while another server served ..."""
    idle_s: float = 0.0
    """... over this many seconds."""


def run_unit(ps: PairedServer, jobs: list[sb.Job], concurrency: int, args: argparse.Namespace) -> UnitRun:
    results: list[tuple[sb.RequestSpec, sb.Result]] = []

    def record(s: sb.RequestSpec, r: sb.Result) -> None:
        results.append((s, r))
        if r.ok:
            ps.outputs[json.dumps(s.body, sort_keys=True)] = spec.digest(r.text)

    summary = asyncio.run(
        sb.run_jobs(
            ps.server.url,
            cp.MODEL_NAME,
            jobs,
            concurrency,
            None,
            args.point_timeout_s,
            args.point_timeout_s,
            args.seed,
            on_result=record,
        )
    )
    if summary["truncated"]:
        ps.server.settle()
    return UnitRun(summary["duration_s"], results, summary["unfinished"])


def method_run(
    ps: PairedServer, workload: str, concurrency: int, runs: list[UnitRun], stats: dict[str, Any]
) -> dict[str, Any]:
    """The method's point over all units, with the sequential mode's fields."""
    results = [r for u in runs for _, r in u.results]
    unfinished = sum(u.unfinished for u in runs)
    s = sb.summarize(results, sum(u.duration_s for u in runs), unfinished=unfinished)
    return {
        "method": ps.method,
        "workload": workload,
        "concurrency": concurrency,
        "completed": s["completed"],
        "errors": s["errors"],
        "unfinished": s["unfinished"],
        "truncated": unfinished > 0,
        "duration_s": s["duration_s"],
        "output_tok_per_s": s["output_tok_per_s"],
        "tpot_mean_s": s["tpot_s"]["mean"],
        "tpot_p50_s": s["tpot_s"]["p50"],
        "tpot_p99_s": s["tpot_s"]["p99"],
        "ttft_p50_s": s["ttft_s"]["p50"],
        "output_len_mismatches": s["output_len_mismatches"],
        **stats,
        "error_samples": s["error_samples"],
        "units": len(runs),
        "unit_output_tok_per_s": [u.tok_per_s for u in runs],
    }


def run_point(
    servers: list[PairedServer], workload: str, concurrency: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """One workload at one concurrency, unit by unit over every server; the methods' runs."""
    jobs = spec.jobs_for(workload, concurrency, args)
    by_method = {ps.method: ps for ps in servers}
    runs: dict[str, list[UnitRun]] = {ps.method: [] for ps in servers}
    cpu: dict[str, dict[str, float]] = {ps.method: dict.fromkeys(process_cpu.ROLES, 0.0) for ps in servers}
    before = {ps.method: spec.scrape(ps.server.url) for ps in servers}
    for i, unit in enumerate(units(jobs, concurrency)):
        for method in turn_order([ps.method for ps in servers], i):
            t0 = {ps.method: process_cpu.roles(ps.server.proc.pid) for ps in servers}
            run = run_unit(by_method[method], unit, concurrency, args)
            for ps in servers:
                used = process_cpu.diff(process_cpu.roles(ps.server.proc.pid), t0[ps.method])
                if ps.method == method:
                    cpu[method] = {role: cpu[method][role] + used[role] for role in process_cpu.ROLES}
                else:
                    ps.idle_cpu_s += sum(used.values())
                    ps.idle_s += run.duration_s
            runs[method].append(run)
    out = []
    for ps in servers:
        after = spec.scrape(ps.server.url)
        run = method_run(ps, workload, concurrency, runs[ps.method], spec.speculation_stats(before[ps.method], after))
        steps = after.get(STEPS, 0.0) - before[ps.method].get(STEPS, 0.0)
        run["process_cpu_s"] = cpu[ps.method]
        # What each process costs a served step, on the cores the engine's threads need too.
        run["process_cpu_ms_per_step"] = {k: 1000 * v / steps for k, v in cpu[ps.method].items()} if steps else None
        out.append(run)
    if "off" in runs:
        for r in out:
            if r["method"] == "off":
                continue
            ref, mine = by_method["off"].outputs, by_method[r["method"]].outputs
            bodies = {json.dumps(s.body, sort_keys=True) for u in runs["off"] for s, _ in u.results}
            common = [k for k in bodies if k in ref and k in mine]
            r["outputs_same_as_off"] = sum(mine[k] == ref[k] for k in common) / len(common) if common else None
            ratios = paired_ratios(runs["off"], runs[r["method"]])
            r["paired"] = {name: ratio_summary(xs, seed=args.seed) | {"values": xs} for name, xs in ratios.items()}
    for r in out:
        rate = r["acceptance_rate"]
        paired = r.get("paired", {}).get("output_tok_per_s_ratio", {})
        vs_off = (
            f"  paired x off: median {paired['median']:.2f} geomean {paired['geomean']:.2f} "
            f"[{paired['ci95'][0]:.2f}, {paired['ci95'][1]:.2f}]"
            if paired.get("n")
            else ""
        )
        print(
            f"  {r['method']:<6} {workload:<8} c={concurrency:<3} {r['output_tok_per_s']:7.1f} out tok/s  "
            f"TPOT p50 {r['tpot_p50_s'] * 1000:.1f}ms  acceptance {'-' if rate is None else f'{rate:.0%}'}  "
            f"done {r['completed']} err {r['errors']}{vs_off}",
            flush=True,
        )
    return out


def compare_paired(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sequential mode's comparison (aggregate ratios), with the paired ratios beside it."""
    paired = {(r["method"], r["workload"], r["concurrency"]): r.get("paired") for r in runs}
    return [c | {"paired": paired[(c["method"], c["workload"], c["concurrency"])]} for c in spec.compare(runs)]


def start(methods: Sequence[str], args: argparse.Namespace, out: dict[str, Any]) -> list[PairedServer]:
    """Every method's server, started together; each warmed up once it is ready."""
    started = []
    for m in methods:
        extra = spec.method_args(m, args.k, args.fixed_k)
        started.append(PairedServer(m, cp.Server(args.mode, args.threads, "float32", extra_args=extra)))
    servers = []
    for ps in started:
        try:
            ready_s = ps.server.wait_ready()
        except RuntimeError as e:
            out["servers"][ps.method] = {"command": ps.server.cmd, "error": str(e), "log_tail": cp._log_tail(ps.server)}
            print(f"{ps.method}: did not start: {e}", flush=True)
            ps.server.stop()
            continue
        print(f"{ps.method}: ready in {ready_s:.1f}s ({' '.join(ps.server.cmd)})", flush=True)
        out["servers"][ps.method] = {"command": ps.server.cmd, "ready_s": ready_s}
        servers.append(ps)
    for ps in servers:
        cp._warm_up(ps.server, burst=False)
    return servers


def main(args: argparse.Namespace) -> int:
    out: dict[str, Any] = {
        "benchmark": "speculative",
        "design": "paired",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine_info": machine_info(),
        "config": vars(args),
        "servers": {},
        "runs": [],
        "comparison": [],
    }
    # off first: it is the reference of every pair (the order of turns rotates regardless).
    methods = sorted(args.methods, key=lambda m: m != "off")
    servers = start(methods, args, out)
    try:
        for workload in args.workloads:
            for c in args.concurrency:
                out["runs"] += run_point(servers, workload, c, args)
                out["comparison"] = compare_paired(out["runs"])
                cp.save(out, args.output)
                for ps in servers:
                    if ps.server.proc.poll() is not None:
                        raise RuntimeError(f"{ps.method} died during {workload} c={c}: {cp._log_tail(ps.server, 5)}")
    finally:
        for ps in servers:
            ps.server.stop()
            out["servers"][ps.method]["idle_cpu_cores"] = ps.idle_cpu_s / ps.idle_s if ps.idle_s else None
        cp.save(out, args.output)
    for c in out["comparison"]:
        p = (c["paired"] or {}).get("output_tok_per_s_ratio") or {}
        same = c["outputs_same_as_off"]
        print(
            f"{c['method']:<6} {c['workload']:<8} c={c['concurrency']:<3} paired output tok/s vs off: "
            + (
                f"median {p['median']:.2f}x, geomean {p['geomean']:.2f}x [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}]"
                if p.get("n")
                else "-"
            )
            + f"; {'-' if same is None else f'{same:.0%}'} of outputs identical to off"
        )
    for ps in servers:
        idle = out["servers"][ps.method]["idle_cpu_cores"]
        print(f"{ps.method}: {'-' if idle is None else f'{idle:.3f}'} CPU cores while the others served")
    print(f"wrote {args.output}")
    return 0
