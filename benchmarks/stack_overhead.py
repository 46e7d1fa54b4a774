"""Where the time goes: the engine in-process vs over ZMQ vs the full HTTP stack.

One workload (96 requests: 32 random prompt tokens, 50 output tokens, ignore_eos, greedy;
32 in flight, a new one starting whenever one ends) through (1) `engine`: LLMEngine stepped
in this process; (2) `zmq`: `python -m services.engine_core` fed EngineRequests over ipc://
by this process, which binds the PULL its EngineOutputs go to; (3) `full`: `novainfer serve`
driven by 32 concurrent streaming /v1/completions clients. Same engine config everywhere;
each stage is warmed up first. CPU seconds per process are recorded per measurement, so an
overhead can be pinned on a process, and so is other tenants' CPU use (a disturbed
measurement is taken again). Writes benchmarks/results/stack_overhead.json.

    .venv/bin/python benchmarks/stack_overhead.py [--threads 2,1] [--repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine_info import machine_info  # noqa: E402

from shared.config import Config, EngineConfig, ServeConfig, available_cores, config_to_args  # noqa: E402
from shared.protocol import EngineOutputs, EngineRequest, SamplingParams, decoder, encode  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "stack_overhead.json")
START_TIMEOUT_S = 300.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
VOCAB = 49152  # the bundled SmolLM2's; prompts draw ids from [100, VOCAB)

Workload = list[list[int]]


# --- process CPU accounting ------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, float] | None:
    """(name, ppid, cpu seconds) from /proc; the name is the module from the command line."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    name = next((a.decode() for a in argv if a.startswith((b"services.", b"novainfer."))), "other")
    if b"multiprocessing" in b" ".join(argv):
        name = "services.tokenizer_pool (worker)"  # spawned workers run `-c from multiprocessing...`
    return name, int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_by_process(root: int) -> dict[str, float]:
    """CPU seconds of `root` and all its descendants, summed per module name."""
    stats = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := _stat(int(p)))}
    tree, grew = {root}, True
    while grew:
        new = {pid for pid, (_, ppid, _) in stats.items() if ppid in tree} - tree
        tree, grew = tree | new, bool(new)
    out: dict[str, float] = {}
    for name, _, cpu in (stats[pid] for pid in tree if pid in stats):
        out[name] = out.get(name, 0.0) + cpu
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before.get(k, 0.0), 2) for k in after}


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores, every process)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def wait_for_quiet(max_wait_s: float, busy_cores: float = 0.15) -> float:
    """Wait (up to max_wait_s) for a 2 s window in which other processes keep under
    `busy_cores` cores busy: the machine may be shared, and a tenant's load skews the
    stages unevenly (see docs/benchmarks_stack.md). Returns the last window's load."""
    deadline = time.monotonic() + max_wait_s
    while True:
        b0 = machine_busy_s()
        time.sleep(2.0)
        if (load := (machine_busy_s() - b0) / 2.0) < busy_cores or time.monotonic() >= deadline:
            return round(load, 2)


# --- the driver shared by stages 1 and 2 ----------------------------------------------------


def closed_loop(
    prompts: Workload,
    concurrency: int,
    submit: Callable[[str, list[int]], None],
    poll: Callable[[], list[tuple[str, int, bool]]],
    tag: str = "r",
) -> tuple[float, int]:
    """Keep `concurrency` requests in flight until all are done; (seconds, output tokens).

    poll() returns (request id, new tokens, finished) for whatever progressed.
    """
    queue = [(f"{tag}{i}", p) for i, p in enumerate(prompts)][::-1]
    counts: dict[str, int] = {}

    def start_next() -> None:
        rid, prompt = queue.pop()
        counts[rid] = 0
        submit(rid, prompt)

    t0 = time.perf_counter()
    for _ in range(min(concurrency, len(queue))):
        start_next()
    done = 0
    while done < len(prompts):
        for rid, n, finished in poll():
            counts[rid] += n
            if finished:
                done += 1
                if queue:
                    start_next()
    return time.perf_counter() - t0, sum(counts.values())


Measure = Callable[[Workload, str], dict[str, Any]]


@contextlib.contextmanager
def engine_stage(cfg: EngineConfig, args: argparse.Namespace) -> Iterator[Measure]:
    import torch

    from services.engine_core.engine import LLMEngine

    global _ENGINE
    if _ENGINE is None:  # one engine serves every thread setting: loading it again is slow
        _ENGINE = LLMEngine(cfg)
    engine = _ENGINE
    torch.set_num_threads(cfg.num_threads or available_cores())
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    steps = [0]

    def submit(rid: str, prompt: list[int]) -> None:
        engine.add_request(rid, prompt, params)

    def poll() -> list[tuple[str, int, bool]]:
        steps[0] += 1
        return [(o.request_id, len(o.new_token_ids), o.finish_reason is not None) for o in engine.step()]

    def measure(prompts: Workload, tag: str) -> dict[str, Any]:
        before, steps[0] = cpu_by_process(os.getpid()), 0
        secs, tokens = closed_loop(prompts, args.concurrency, submit, poll, tag)
        return {
            "seconds": secs,
            "output_tokens": tokens,
            "steps": steps[0],
            "cpu_s": cpu_delta(before, cpu_by_process(os.getpid())),
        }

    yield measure


_ENGINE: Any = None


@contextlib.contextmanager
def zmq_stage(cfg: EngineConfig, args: argparse.Namespace, tmp: str) -> Iterator[Measure]:
    import zmq

    from shared.zmq_utils import pull_socket, push_socket

    run_dir = tempfile.mkdtemp(prefix="zmq-", dir=tmp)
    serve = ServeConfig(
        run_dir=run_dir,
        tokenizer_addrs=[f"ipc://{run_dir}/bench-in"],
        engine_addrs=[f"ipc://{run_dir}/engine-0"],
        log_level="WARNING",
    )
    ctx = zmq.Context()
    inbox = pull_socket(ctx, serve.tokenizer_addrs[0])
    outbox = push_socket(ctx, serve.engine_addrs[0])
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.engine_core", *config_to_args(Config(engine=cfg, serve=serve))], cwd=ROOT
    )
    dec = decoder(EngineOutputs)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    step_times: list[float] = []

    def submit(rid: str, prompt: list[int]) -> None:
        outbox.send(encode(EngineRequest(request_id=rid, prompt_token_ids=prompt, sampling_params=params, worker=0)))

    def poll() -> list[tuple[str, int, bool]]:
        msg = dec.decode(inbox.recv())
        if msg.outputs and msg.stats is not None:  # one message per step: we are the only worker
            step_times.append(msg.stats.last_step_time_s)
        return [(o.request_id, len(o.new_token_ids), o.finish_reason is not None) for o in msg.outputs]

    def measure(prompts: Workload, tag: str) -> dict[str, Any]:
        step_times.clear()
        before = cpu_by_process(os.getpid())
        secs, tokens = closed_loop(prompts, args.concurrency, submit, poll, tag)
        # Time inside engine.step() vs wall time: the rest is the server loop and ZMQ.
        return {
            "seconds": secs,
            "output_tokens": tokens,
            "steps": len(step_times),
            "engine_step_s": round(sum(step_times), 3),
            "cpu_s": cpu_delta(before, cpu_by_process(os.getpid())),
        }

    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not inbox.poll(500):  # the first heartbeat: the model is loaded and the loop runs
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the engine core did not start")
        inbox.recv()
        yield measure
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        ctx.destroy(linger=0)


async def http_loop(base: str, prompts: Workload, concurrency: int, output_len: int) -> tuple[float, int, int]:
    """Closed loop of streaming completions; (seconds, output tokens, SSE content chunks)."""
    import aiohttp

    queue = list(prompts)[::-1]
    tokens = chunks = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal tokens, chunks
        while queue:
            body = {
                "prompt": queue.pop(),
                "max_tokens": output_len,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            usage = None
            async with session.post(base + "/v1/completions", json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
                async for line in resp.content:
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    elif chunk["choices"] and chunk["choices"][0].get("text"):
                        chunks += 1
            got = usage["completion_tokens"] if usage else 0
            if got != output_len:
                raise RuntimeError(f"a request got {got} output tokens, not {output_len}")
            tokens += got

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        return time.perf_counter() - t0, tokens, chunks


def engine_steps(base: str) -> int:
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("novainfer_engine_steps_total"):
                return int(float(line.rsplit(" ", 1)[1]))
    return 0


@contextlib.contextmanager
def full_stage(cfg: EngineConfig, args: argparse.Namespace, tmp: str) -> Iterator[Measure]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve = ServeConfig(
        port=port,
        run_dir=tempfile.mkdtemp(prefix="serve-", dir=tmp),
        log_level="WARNING",
        num_tokenizer_workers=args.tokenizer_workers,
    )
    cmd = [sys.executable, "-m", "novainfer.cli", "serve", *config_to_args(Config(engine=cfg, serve=serve))]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def measure(prompts: Workload, tag: str) -> dict[str, Any]:  # tag unused: the gateway names requests
        steps0 = engine_steps(base)
        before = {**cpu_by_process(proc.pid), "bench client": time.process_time()}
        secs, tokens, chunks = asyncio.run(http_loop(base, prompts, args.concurrency, args.output_len))
        after = {**cpu_by_process(proc.pid), "bench client": time.process_time()}
        return {
            "seconds": secs,
            "output_tokens": tokens,
            "steps": engine_steps(base) - steps0,
            "sse_content_chunks": chunks,
            "cpu_s": cpu_delta(before, after),
        }

    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("novainfer serve did not start")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield measure
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def quiet_measure(measure: Measure, prompts: Workload, tag: str, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement, taken again (up to --retries times) while other tenants of the machine
    used more than --max-foreign-cores during it; the least disturbed attempt is returned."""
    attempts = []
    for attempt in range(1 + args.retries):
        load_before = wait_for_quiet(args.quiet_wait)
        busy0 = machine_busy_s()
        res = measure(prompts, f"{tag}{attempt}-")
        # Busy CPU on the machine that none of our processes used: other tenants.
        res["foreign_cpu_s"] = round(machine_busy_s() - busy0 - sum(res["cpu_s"].values()), 2)
        res["foreign_cores_before"] = load_before
        attempts.append(res)
        if res["foreign_cpu_s"] / res["seconds"] <= args.max_foreign_cores:
            break
        print(f"  disturbed ({res['foreign_cpu_s']} CPU s used by other processes): measuring again", flush=True)
    best = min(attempts, key=lambda a: a["foreign_cpu_s"] / a["seconds"])
    best["attempts"] = len(attempts)
    return best


# --- the run ------------------------------------------------------------------------------------


def workload(n: int, length: int, vocab: int, seed: int) -> Workload:
    # Distinct random prompts: no prefix-cache hits, so every stage does the same prefill work.
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=8, help="requests run before each stage's measurement")
    ap.add_argument(
        "--threads",
        default=str(available_cores()),
        help="comma-separated torch thread counts; every stage runs once per value",
    )
    ap.add_argument("--tokenizer-workers", type=int, default=0, help="0: the service's default")
    ap.add_argument("--kv-cache-bytes", type=int, default=256 << 20)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument(
        "--omp-wait-policy",
        choices=["passive", "active"],
        default=None,
        help="OMP_WAIT_POLICY for every engine (this process and the services); default: unset",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="seconds to wait at most, before each measurement, for other processes to go idle",
    )
    ap.add_argument("--retries", type=int, default=3, help="extra attempts for a disturbed measurement")
    ap.add_argument(
        "--max-foreign-cores",
        type=float,
        default=0.1,
        help="other processes' average CPU use (cores) above which a measurement is disturbed",
    )
    ap.add_argument("--repeats", type=int, default=1, help="measurements per stage; the best one counts")
    ap.add_argument("--stages", default="engine,zmq,full")
    ap.add_argument("--quick", action="store_true", help="8 requests of 8 tokens: a smoke run")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.requests, args.concurrency, args.output_len, args.warmup, args.quiet_wait, args.retries = 8, 4, 8, 2, 0, 0
    if args.omp_wait_policy:
        # Must be in the environment before libgomp starts, i.e. before torch is imported here;
        # the services inherit it.
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    # SIGTERM unwinds like Ctrl-C, so the services started here are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    thread_counts = [int(t) for t in args.threads.split(",")]
    stages = args.stages.split(",")

    expected = args.requests * args.output_len
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="novainfer-bench-") as tmp:
        for k, threads in enumerate(thread_counts):
            cfg = EngineConfig(
                exact=True,  # fp32, no int4: the mode of the published results
                device="cpu",
                kv_cache_bytes=args.kv_cache_bytes,
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                num_threads=threads,
            )
            # Fresh prompts for every measurement: stage 1's engine is reused and would hit its prefix cache.
            warm = workload(args.warmup, args.prompt_len, VOCAB, seed=1000 * k + 999)
            reps = [workload(args.requests, args.prompt_len, VOCAB, seed=1000 * k + r) for r in range(args.repeats)]
            run: dict[str, Any] = {"threads": threads}
            for stage in stages:
                if stage == "engine":
                    ctx = engine_stage(cfg, args)
                elif stage == "zmq":
                    ctx = zmq_stage(cfg, args, tmp)
                else:
                    ctx = full_stage(cfg, args, tmp)
                with ctx as measure:
                    measure(warm, f"w{k}-")
                    results = [quiet_measure(measure, prompts, f"r{k}.{r}-", args) for r, prompts in enumerate(reps)]
                for r in results:
                    if r["output_tokens"] != expected:
                        raise RuntimeError(f"{stage}: {r['output_tokens']} output tokens, expected {expected}")
                    r["tokens_per_s"] = round(r["output_tokens"] / r["seconds"], 2)
                    r["seconds"] = round(r["seconds"], 3)
                    print(
                        f"threads={threads} {stage}: {r['tokens_per_s']:.1f} tok/s, {r['steps']} steps, "
                        f"cpu s {r['cpu_s']}, foreign cpu s {r['foreign_cpu_s']}",
                        flush=True,
                    )
                # Best of the repeats: the machine is shared, and load only ever slows a run down.
                rates = sorted(r["tokens_per_s"] for r in results)
                run[stage] = {
                    "tokens_per_s": rates[-1],
                    "median_tokens_per_s": rates[len(rates) // 2],
                    "repeats": results,
                }
            for stage in ("zmq", "full"):
                if "engine" in run and stage in run:
                    run[f"{stage}_over_engine"] = round(run[stage]["tokens_per_s"] / run["engine"]["tokens_per_s"], 3)
            runs.append(run)

    head = runs[0]
    result = {
        "benchmark": "stack_overhead",
        "model": "SmolLM2-135M-Instruct (bundled GGUF, dequantized), float32",
        "device": f"cpu: {platform.processor() or platform.machine()}, {available_cores()} cores",
        "machine": machine_info(),
        "workload": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "prompt_len": args.prompt_len,
            "output_len": args.output_len,
            "ignore_eos": True,
            "temperature": 0.0,
            "warmup_requests": args.warmup,
            "repeats": args.repeats,
        },
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "engine_config": {
            "kv_cache_bytes": args.kv_cache_bytes,
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "dtype": "float32",
        },
        # The headline figures are those of the first --threads value (the default config).
        "threads": head["threads"],
        **{f"{s}_tokens_per_s": head[s]["tokens_per_s"] for s in stages},
        **{k: head[k] for k in ("zmq_over_engine", "full_over_engine") if k in head},
        "runs": runs,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("\n| torch threads | stage | output tok/s | vs engine |\n|---|---|---|---|")
    for run in runs:
        for stage in stages:
            ratio = run.get(f"{stage}_over_engine", 1.0 if stage == "engine" else "-")
            print(f"| {run['threads']} | {stage} | {run[stage]['tokens_per_s']:.1f} | {ratio} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
