"""NovaInfer vs llama.cpp's llama-server vs transformers, served, on the same GGUF file.

For each server in turn: start it on a free loopback port, wait for /health, warm it up,
run each workload at each concurrency with benchmarks/serve_bench.py's client, stop it.
Every server gets the same requests (seeded per workload and concurrency, so that no
point reuses an earlier point's prompts from a prefix cache). A point is capped in
time; what finished by then is recorded and the point is flagged `truncated`.

The machine may be shared: each point records the CPU time used by processes other
than the server under test and this client (`foreign_cpu_cores`), so contaminated
points can be told apart.

Writes benchmarks/results/peers.json and docs/img/peers_*.png. Needs
benchmarks/peers/setup_llamacpp.sh to have run, and matplotlib.

    .venv/bin/python benchmarks/compare_peers.py                 # the full comparison
    .venv/bin/python benchmarks/compare_peers.py --table-only    # markdown tables from the JSON
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import serve_bench as sb  # noqa: E402
from machine_info import machine_info  # noqa: E402

from shared.model_files import bundled_model_path  # noqa: E402

RESULTS = os.path.join(HERE, "results", "peers.json")
IMG = os.path.join(ROOT, "docs", "img")
# benchmarks/peers/setup_llamacpp.sh builds "native" (GGML_NATIVE=ON, as a user would); "noamx"
# (--no-amx) is the same ISA without AMX, used only where the native build's AMX path crashes.
LLAMA_BUILDS = {
    "native": os.path.join(ROOT, ".peers", "bin", "llama-server"),
    "noamx": os.path.join(ROOT, ".peers", "bin-noamx", "llama-server"),
}
SETUP_LLAMACPP = os.path.join(HERE, "peers", "setup_llamacpp.sh")
MODEL_NAME = "SmolLM2-135M-Instruct"
MAX_CONCURRENCY = 64
# NovaInfer's modes by their flags. `novainfer` is what `novainfer serve` runs out of the box (on
# a CPU with native bf16 and this Q4_1 file: bf16 + int4 copies, see run_mode.py); the others pin
# one mode whatever the default is.
NOVAINFER_MODES: dict[str, list[str]] = {
    "novainfer": [],
    "novainfer-exact": ["--exact"],
    "novainfer-bf16": ["--dtype", "bfloat16", "--quantization", "none"],
    "novainfer-int4": ["--dtype", "float32", "--quantization", "int4"],
    "novainfer-int4-bf16": ["--dtype", "bfloat16", "--quantization", "int4"],
}
SERVERS = (*NOVAINFER_MODES, "llamacpp", "transformers")


def server_command(
    name: str,
    port: int,
    run_dir: str,
    threads: int,
    dtype: str = "float32",
    llama_server: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """dtype: what transformers computes in (llama.cpp always runs the file's Q4_1; NovaInfer
    runs its mode, NOVAINFER_MODES). extra_args: more NovaInfer flags (e.g.
    benchmarks/speculative.py's speculation modes)."""
    model = bundled_model_path()
    if name in NOVAINFER_MODES:
        # Defaults on purpose (what `novainfer serve` does out of the box), but threads and the mode.
        return [
            sys.executable,
            "-m",
            "novainfer.cli",
            "serve",
            "--port",
            str(port),
            "--run-dir",
            run_dir,
            "--num-threads",
            str(threads),
            *NOVAINFER_MODES[name],
            *extra_args,
        ]
    if name == "llamacpp":
        # Default flags but the slots: -np 64 slots (one per concurrent stream; each gets
        # -c / 64 = 1024 tokens, enough for our longest conversation), threads as every server.
        # Not -kvu: llama-server only unifies the KV cache by default when -np is automatic, and
        # a unified cache makes every sequence's attention span all 64 slots' cells. Not -nr:
        # that turns off the repacked (AMX, AVX-512, AVX2) weight layouts, the peer's fast path.
        return [
            llama_server or LLAMA_BUILDS["native"],
            "-m",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "-np",
            str(MAX_CONCURRENCY),
            "-c",
            str(1024 * MAX_CONCURRENCY),
            "--no-webui",
            "-a",
            MODEL_NAME,
        ]
    if name == "transformers":
        return [
            sys.executable,
            os.path.join(HERE, "peers", "hf_server.py"),
            "--port",
            str(port),
            "--threads",
            str(threads),
            "--max-batch",
            str(MAX_CONCURRENCY),
            "--dtype",
            dtype,
        ]
    raise ValueError(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- CPU accounting


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4]  # all but idle and iowait


def _own_jiffies() -> int:
    # This process alone: the server is our child, so our tree would count it twice.
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _tree_jiffies(root_pid: int) -> int:
    """utime+stime of root_pid and its descendants (NovaInfer is several processes)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(d))
        stats[int(d)] = int(fields[11]) + int(fields[12])
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, 0)
        todo += children.get(pid, [])
    return total


class CpuMeter:
    def __init__(self, server_pid: int) -> None:
        self.pid = server_pid
        self.hz = os.sysconf("SC_CLK_TCK")
        self.t0 = time.monotonic()
        self.start = (_busy_jiffies(), _tree_jiffies(server_pid), _own_jiffies())

    def cores(self) -> tuple[float, float]:
        """(server cores, foreign cores) averaged since start."""
        busy, server, me = _busy_jiffies(), _tree_jiffies(self.pid), _own_jiffies()
        dt = max(time.monotonic() - self.t0, 1e-6) * self.hz
        s = (server - self.start[1]) / dt
        foreign = ((busy - self.start[0]) - (server - self.start[1]) - (me - self.start[2])) / dt
        return s, max(foreign, 0.0)


# ---------------------------------------------------------------- servers


class Server:
    def __init__(
        self,
        name: str,
        threads: int,
        dtype: str,
        llama_server: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.port = free_port()
        self.run_dir = tempfile.mkdtemp(prefix=f"peers-{name}-")
        self.cmd = server_command(name, self.port, self.run_dir, threads, dtype, llama_server, extra_args)
        # Closed in stop(): the server writes to it for as long as it runs.
        self.log = open(os.path.join(self.run_dir, "server.log"), "w")  # noqa: SIM115
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        # Own process group: the whole server (NovaInfer's children included) can be stopped by its id.
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_s: float | None = None

    def wait_ready(self, timeout: float = 600.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.ready_s = time.monotonic() - t0
                        return self.ready_s
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready in {timeout:.0f}s")

    def settle(self, timeout: float = 120.0) -> None:
        """Wait until the server is idle: a cancelled request may still be computing."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = CpuMeter(self.proc.pid)
            time.sleep(2.0)
            if m.cores()[0] < 0.3:
                return

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of its group is left
        self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------- runs


def jobs_for(workload: str, concurrency: int, args: argparse.Namespace) -> list[sb.Job]:
    seed = args.seed * 1000 + concurrency  # fresh prompts for every point, the same for every server
    extra = {"ignore_eos": True}
    n = max(args.requests_per_conc * concurrency, args.min_requests)
    if workload == "random":
        return sb.random_workload(n, (32, 256), (args.output_len, args.output_len), seed, extra)
    if workload == "shared-prefix":
        # Enough conversations to keep `concurrency` of them in flight.
        n = max(n, args.turns * concurrency)
        return sb.shared_prefix_workload(
            n, args.turns, 4, 300, (16, 64), (args.output_len, args.output_len), seed, extra
        )
    if workload == "seed":
        return sb.random_workload(40, (32, 32), (50, 50), seed, extra)
    raise ValueError(workload)


def run_point(server: Server, workload: str, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    jobs = jobs_for(workload, concurrency, args)
    meter = CpuMeter(server.proc.pid)
    load0 = os.getloadavg()[0]
    s = asyncio.run(
        sb.run_jobs(
            server.url, MODEL_NAME, jobs, concurrency, None, args.point_timeout_s, args.point_timeout_s, args.seed
        )
    )
    server_cores, foreign = meter.cores()
    if s["truncated"]:
        server.settle()
    run = {
        "server": server.name,
        "workload": workload,
        "concurrency": concurrency,
        "requests": s["completed"] + s["errors"],
        "completed": s["completed"],
        "errors": s["errors"],
        "unfinished": s["unfinished"],
        "truncated": s["truncated"],
        "duration_s": s["duration_s"],
        "output_tok_per_s": s["output_tok_per_s"],
        "total_tok_per_s": s["total_tok_per_s"],
        "request_throughput": s["request_throughput"],
        "ttft_p50_s": s["ttft_s"]["p50"],
        "ttft_p99_s": s["ttft_s"]["p99"],
        "tpot_p50_s": s["tpot_s"]["p50"],
        "tpot_p99_s": s["tpot_s"]["p99"],
        "itl_p50_s": s["itl_s"]["p50"],
        "itl_p99_s": s["itl_s"]["p99"],
        "e2e_p50_s": s["e2e_s"]["p50"],
        "e2e_p99_s": s["e2e_s"]["p99"],
        "output_len_mismatches": s["output_len_mismatches"],
        "partial_output_tokens": s["partial_output_tokens"],
        "prefix_cache_hit_rate": s.get("prefix_cache_hit_rate"),
        "usage_cached_prompt_fraction": s["usage_cached_prompt_fraction"],
        "server_cpu_cores": server_cores,
        "foreign_cpu_cores": foreign,
        "loadavg_1m_before": load0,
        "error_samples": s["error_samples"],
        "full": s,
    }
    print(
        f"  {workload:<13} c={concurrency:<3} {s['output_tok_per_s']:7.1f} out tok/s  "
        f"TTFT p50 {s['ttft_s']['p50']:.2f}s p99 {s['ttft_s']['p99']:.2f}s  "
        f"TPOT p50 {s['tpot_s']['p50'] * 1000:.0f}ms  "
        f"done {s['completed']} err {s['errors']} unfinished {s['unfinished']}  "
        f"foreign CPU {foreign:.2f} cores",
        flush=True,
    )
    return run


def _warm_up(server: Server, burst: bool) -> None:
    """A few short requests; with `burst`, also a full batch of 32 concurrent streams, so that
    every batched kernel a point will use has run once (llama.cpp's AMX path is only taken
    for batches)."""
    warm = sb.random_workload(4, (32, 64), (8, 8), seed=999_999, extra={"ignore_eos": True})
    asyncio.run(sb.run_jobs(server.url, MODEL_NAME, warm, 2, None, 300, 300, 0))
    if burst:
        jobs = sb.random_workload(32, (32, 256), (32, 32), seed=999_998, extra={"ignore_eos": True})
        asyncio.run(sb.run_jobs(server.url, MODEL_NAME, jobs, 32, None, 300, 300, 0))


def _log_tail(server: Server, n: int = 15) -> list[str]:
    with open(server.log.name, errors="replace") as f:
        return f.read().splitlines()[-n:]


def _llamacpp_build_info(binary: str, server: Server) -> dict[str, Any]:
    """The build options and what llama.cpp says it runs with (ISA, extra buffer types)."""
    options: dict[str, str] = {}
    try:  # written by setup_llamacpp.sh next to the binary
        with open(os.path.join(os.path.dirname(binary), "build-options.txt")) as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                options[key.split(":")[0]] = value
    except OSError:
        pass
    with open(server.log.name, errors="replace") as f:
        said = [ln.strip() for ln in f if "system_info" in ln or "model buffer size" in ln or "AMX" in ln]
    return {"binary": binary, "cmake_options": options, "log": said[:12]}


def start_llamacpp(args: argparse.Namespace, out: dict[str, Any]) -> Server:
    """The native build, default flags; only if it crashes under a batch, the same ISA minus
    AMX (built on demand). What ran and why goes into the results."""
    record: dict[str, Any] = {"tried": []}
    out["llamacpp"] = record
    for variant in ("native", "noamx"):
        binary = LLAMA_BUILDS[variant]
        if not os.access(binary, os.X_OK):
            subprocess.run(["bash", SETUP_LLAMACPP, "--no-amx"], check=True)
        server = Server("llamacpp", args.threads, args.dtype, binary)
        try:
            server.wait_ready()
            _warm_up(server, burst=True)
            if server.proc.poll() is not None:
                raise RuntimeError(f"exited with {server.proc.returncode} during the warm-up burst")
        except Exception as e:
            record["tried"].append({"variant": variant, "error": str(e), "log_tail": _log_tail(server)})
            print(f"llamacpp ({variant}) failed its warm-up: {e}; log tail:\n  " + "\n  ".join(_log_tail(server, 5)))
            server.stop()
            continue
        record.update(variant=variant, **_llamacpp_build_info(binary, server))
        record["tried"].append({"variant": variant, "error": None})
        return server
    raise RuntimeError("no llama.cpp build survives its warm-up; see results' llamacpp.tried")


def bench_server(name: str, args: argparse.Namespace, out: dict[str, Any]) -> None:
    server = start_llamacpp(args, out) if name == "llamacpp" else Server(name, args.threads, args.dtype)
    try:
        ready_s = server.ready_s if server.ready_s is not None else server.wait_ready()
        print(f"{name}: ready in {ready_s:.1f}s ({' '.join(server.cmd)})", flush=True)
        out["servers"][name] = {"command": server.cmd, "ready_s": ready_s}
        if name in NOVAINFER_MODES:
            # What the defaults resolved to on this machine (plain `novainfer` pins nothing).
            out["servers"][name]["run_mode"] = run_mode(server.url)
            print(f"{name}: run mode {out['servers'][name]['run_mode']}", flush=True)
        if name != "llamacpp":
            _warm_up(server, burst=False)
        for workload in args.workloads:
            for c in [8] if workload == "seed" else args.concurrency:
                out["runs"].append(run_point(server, workload, c, args))
                save(out, args.output)
                if server.proc.poll() is not None:
                    raise RuntimeError(f"{name} died during {workload} c={c}: {_log_tail(server, 5)}")
    finally:
        server.stop()


def run_mode(base_url: str) -> str | None:
    """The mode a NovaInfer server runs in, as its /v1/models reports it."""
    with urllib.request.urlopen(base_url + "/v1/models", timeout=10) as r:
        return json.load(r)["data"][0].get("run_mode")


def _no_nan(x: Any) -> Any:
    # NaN (no finished request: no latency) is not JSON; null is.
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return x


def save(out: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_no_nan(out), f, indent=1)


# ---------------------------------------------------------------- report


def plot(runs: list[dict[str, Any]], prefix: str = "peers") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(IMG, exist_ok=True)
    workloads = [w for w in ("random", "shared-prefix") if any(r["workload"] == w for r in runs)]
    servers = [s for s in SERVERS if any(r["server"] == s for r in runs)]
    figures = [
        ("throughput", [("output_tok_per_s", "-")], "output tokens/s"),
        ("ttft", [("ttft_p50_s", "-"), ("ttft_p99_s", "--")], "TTFT (s), p50 solid, p99 dashed"),
        ("tpot", [("tpot_p50_s", "-"), ("tpot_p99_s", "--")], "TPOT (s), p50 solid, p99 dashed"),
    ]
    paths = []
    for fname, series, ylabel in figures:
        fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4), squeeze=False)
        for ax, w in zip(axes[0], workloads, strict=True):
            for i, srv in enumerate(servers):
                # A capped point with nothing finished still has a throughput, but no latencies.
                pts = sorted(
                    (
                        (r["concurrency"], r)
                        for r in runs
                        if r["server"] == srv and r["workload"] == w and (r["completed"] > 0 or fname == "throughput")
                    ),
                    key=lambda x: x[0],
                )
                for key, style in series:
                    ax.plot(
                        [c for c, _ in pts],
                        [r[key] for _, r in pts],
                        style,
                        marker="o",
                        color=f"C{i}",
                        label=srv if style == "-" else None,
                    )
                for c, r in pts:  # a hollow ring marks a point cut short by its time cap
                    if r["truncated"]:
                        ax.plot([c], [r[series[0][0]]], "o", ms=12, mfc="none", color=f"C{i}")
            ax.set_xscale("log", base=2)
            ax.set_xticks([1, 8, 32, 64], ["1", "8", "32", "64"])
            if fname != "throughput":
                ax.set_yscale("log")
            ax.set_title(f"{w} workload")
            ax.set_xlabel("concurrency")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.tight_layout()
        path = os.path.join(IMG, f"{prefix}_{fname}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _fmt(x: float | None, scale: float = 1.0, unit: str = " s", digits: int = 2) -> str:
    return "–" if x is None or math.isnan(x) else f"{x * scale:.{digits}f}{unit}"


def markdown(runs: list[dict[str, Any]]) -> str:
    lines = []
    for w in dict.fromkeys(r["workload"] for r in runs):
        lines += [
            f"\n### `{w}`\n",
            "| server | conc. | out tok/s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 "
            "| done/err/unfinished | cache hit | server CPU | foreign CPU |",
            "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
        ]
        for r in sorted((r for r in runs if r["workload"] == w), key=lambda r: (r["concurrency"], r["server"])):
            hit = (
                r["prefix_cache_hit_rate"]
                if r["prefix_cache_hit_rate"] is not None
                else r["usage_cached_prompt_fraction"]
            )
            lines.append(
                f"| {r['server']} | {r['concurrency']} | {r['output_tok_per_s']:.1f} | {_fmt(r['ttft_p50_s'])} "
                f"| {_fmt(r['ttft_p99_s'])} | {_fmt(r['tpot_p50_s'], 1000, ' ms', 0)} "
                f"| {_fmt(r['tpot_p99_s'], 1000, ' ms', 0)} "
                f"| {r['completed']}/{r['errors']}/{r['unfinished']}{' (capped)' if r['truncated'] else ''} "
                f"| {'' if hit is None else f'{hit:.0%}'} "
                f"| {r['server_cpu_cores']:.2f} | {r['foreign_cpu_cores']:.2f} |"
            )
    return "\n".join(lines)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # so that `finally` stops the server under test


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=["novainfer", "llamacpp", "transformers"])
    p.add_argument("--workloads", nargs="+", default=["random", "shared-prefix", "seed"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    p.add_argument(
        "--requests-per-conc", type=int, default=2, help="requests per point = max(this x concurrency, --min-requests)"
    )
    p.add_argument("--min-requests", type=int, default=16)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--turns", type=int, default=2, help="shared-prefix turns per conversation")
    p.add_argument("--point-timeout-s", type=float, default=150.0)
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="compute threads for every server (NovaInfer --num-threads, llama.cpp -t/-tb, torch threads)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="what transformers computes in (llama.cpp runs the file's Q4_1, NovaInfer the mode its name says)",
    )
    p.add_argument("--output", default=RESULTS)
    p.add_argument("--img-prefix", default="peers", help="plots go to docs/img/PREFIX_{throughput,ttft,tpot}.png")
    p.add_argument("--table-only", action="store_true", help="print markdown tables from --output and replot")
    args = p.parse_args()
    if args.table_only:
        with open(args.output) as f:
            runs = json.load(f)["runs"]
        plot(runs, args.img_prefix)
        print(markdown(runs))
        return 0
    if importlib.util.find_spec("matplotlib") is None:  # before the run, not after its 20 minutes
        sys.exit("matplotlib missing (the plots need it): .venv/bin/pip install -e '.[bench]'")
    if "llamacpp" in args.servers and not os.access(LLAMA_BUILDS["native"], os.X_OK):
        sys.exit(f"{LLAMA_BUILDS['native']} missing: run benchmarks/peers/setup_llamacpp.sh first")
    out: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "model_file": os.path.basename(bundled_model_path()),
        "config": {k: v for k, v in vars(args).items() if k not in ("output", "table_only", "img_prefix")},
        "servers": {},
        "runs": [],
    }
    t0 = time.monotonic()
    for name in args.servers:
        bench_server(name, args, out)
    out["total_s"] = time.monotonic() - t0
    save(out, args.output)
    plot(out["runs"], args.img_prefix)
    print(markdown(out["runs"]))
    print(f"\ntotal {out['total_s'] / 60:.1f} min; wrote {args.output} and {IMG}/{args.img_prefix}_*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
