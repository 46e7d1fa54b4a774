"""Scale-out benchmark: prefix-cache hit rate and throughput at 2 engines on the
shared-prefix multi-turn workload (serve_bench.py), by routing policy.

- internal: one gateway with `--num-engines 2`, `--engine-routing prefix-affinity` vs
  `round-robin`;
- router: two `novainfer serve` instances behind vllm-router (PyPI), `cache_aware` vs
  `round_robin` (skipped when vllm-router is not installed, or with --no-router).

Hit rates are read from the servers' own /metrics (novainfer_prefix_cache_{hits,queries}_total,
summed over engines and instances) before and after each run. Every run gets a fresh server
(or pair), so no policy starts with a cache the previous one warmed. Writes
benchmarks/results/scale_out.json.

    .venv/bin/python benchmarks/scale_out.py --concurrency 8 --num-requests 32 --turns 4

On a CPU, give each engine its own cores (--threads-per-engine; the default splits the
machine's cores in two): engines whose torch threads share cores starve each other.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.config import available_cores  # noqa: E402 - needs ROOT on sys.path
from tests.e2e.conftest import Server, start_server  # noqa: E402 - needs ROOT on sys.path
from tests.e2e.conversations import prefix_counters  # noqa: E402 - needs ROOT on sys.path
from tests.e2e.vllm_router import ROUTER, run_router  # noqa: E402 - needs ROOT on sys.path

KEEP = ("completed", "errors", "request_throughput", "output_tok_per_s", "total_tok_per_s", "ttft_s", "e2e_s")


def bench(args: argparse.Namespace, base_url: str, instances: list[str], seed: int, tmp: str) -> dict[str, Any]:
    out = os.path.join(tmp, f"bench-{time.monotonic_ns()}.json")
    hits0, queries0 = prefix_counters(instances)
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "serve_bench.py"),
            f"--base-url={base_url}",
            "--workload=shared-prefix",
            f"--num-requests={args.num_requests}",
            f"--concurrency={args.concurrency}",
            f"--turns={args.turns}",
            f"--num-system-prompts={args.num_system_prompts}",
            f"--system-prompt-len={args.system_prompt_len}",
            f"--output-len={args.output_len}",
            f"--max-duration-s={args.max_duration_s}",
            f"--seed={seed}",
            f"--output-json={out}",
        ],
        check=True,
    )
    hits1, queries1 = prefix_counters(instances)
    with open(out) as f:
        summary = json.load(f)
    result = {k: summary[k] for k in KEEP if k in summary}
    result["prefix_cache_hit_rate"] = (hits1 - hits0) / (queries1 - queries0) if queries1 > queries0 else None
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--num-requests", type=int, default=32, help="conversations")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--num-system-prompts", type=int, default=4)
    p.add_argument("--system-prompt-len", type=int, default=300)
    p.add_argument("--output-len", default="64:64")
    p.add_argument("--max-duration-s", type=float, default=600.0)
    p.add_argument("--threads-per-engine", type=int, default=max(1, available_cores() // 2))
    p.add_argument("--serve-args", default="", help="extra flags for every novainfer serve")
    p.add_argument("--no-router", action="store_true", help="skip the vllm-router runs")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "scale_out.json"))
    args = p.parse_args()
    serve = ["--num-threads", str(args.threads_per_engine), *args.serve_args.split()]

    results: dict[str, Any] = {
        "config": vars(args) | {"cores": available_cores(), "machine": platform.processor() or platform.machine()},
        "internal": {},
        "router": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for i, routing in enumerate(("prefix-affinity", "round-robin")):
            server = start_server(tmp, "--num-engines", "2", "--engine-routing", routing, *serve)
            try:
                results["internal"][routing] = bench(args, server.base_url, [server.base_url], seed=i, tmp=tmp)
            finally:
                server.stop()
            print(routing, json.dumps(results["internal"][routing]))
        if ROUTER is None or args.no_router:
            results["router"] = {"skipped": "vllm-router not installed" if ROUTER is None else "--no-router"}
        else:
            for i, policy in enumerate(("cache_aware", "round_robin")):
                with ExitStack() as stack:
                    pair: list[Server] = []
                    for _ in range(2):
                        pair.append(start_server(tmp, *serve))
                        stack.callback(pair[-1].stop)
                    urls = [s.base_url for s in pair]
                    url = stack.enter_context(run_router(urls, policy, Path(tmp)))
                    results["router"][policy] = bench(args, url, urls, seed=10 + i, tmp=tmp)
                print(policy, json.dumps(results["router"][policy]))
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    print("wrote", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
