"""Soak test: a long mixed load with faults, against a NovaInfer this script starts itself.

N requests at concurrency C through the real stack, each one of:
  normal      a short completion or chat, streamed or not (must succeed);
  cancel      a stream cancelled through POST /v1/requests/{id}/cancel after its first chunk;
  disconnect  a stream whose client drops the connection after its first chunk;
  bad         a hostile body (huge numbers, deep nesting, wrong types, bad encoding): must be a 4xx;
and in the middle (after half the requests started) one engine core is killed with SIGKILL.

Every request has a deadline (--hang-s). It reports, into benchmarks/results/soak.json:
  lost     accepted (200) but neither completed nor ended with an error (e.g. a stream cut without one);
  hung     no end within the deadline;
  5xx      server errors, split into the killed engine's in-flight requests (a 503, or an in-band
           error, saying that the request was lost because the engine crashed) and all others
           (the target is 0): a request that arrived during the restart and was refused rather
           than held (--restart-wait-s) is one of the others, counted apart as well;
  p50/p99  latency of the successful normal requests;
  RSS      of the whole process tree before (after a warm-up) and after, and its growth;
  KV       the engines' KV-cache usage once idle (the target is 0).
Targets: 0 lost, 0 hung, 0 other 5xx, KV back to 0, RSS growth under 5%.

    .venv/bin/python benchmarks/soak.py                        # 2,000 requests at concurrency 128
    .venv/bin/python benchmarks/soak.py --requests 16 --concurrency 4 --warmup 2 --out /tmp/soak-smoke.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "soak.json"

BAD_BODIES: list[tuple[bytes, dict[str, str]]] = [
    (b'{"prompt": "Hi", "max_tokens": 18446744073709551616}', {}),
    (b'{"prompt": "Hi", "max_tokens": 5, "stop_token_ids": [1000000000], "min_tokens": 2}', {}),
    (b'{"prompt": [18446744073709551616]}', {}),
    (b'{"prompt": "Hi", "seed": 18446744073709551615, "n": 2}', {}),
    (b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}", {}),
    (b'{"prompt": "Hi", "temperature": "hot"}', {}),
    (b'{"prompt": "Hi", "stream": false, "stream_options": {"include_usage": true}}', {}),
    (b'{"prompt": "Hi"', {}),
    (b'{"prompt": "Hi", "max_tokens": 2}', {"Content-Encoding": "gzip"}),
    (b'{"messages": [{"role": "tool", "content": "x"}]}', {}),
]


@dataclass
class Stats:
    outcomes: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    server_errors_kill: int = 0
    server_errors_restart: int = 0
    """Of the others: refused or failed because a component was restarting or down."""
    server_errors_other: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    hung: int = 0

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def server_error(self, message: str) -> None:
        # The gateway's words for the requests a dead engine had started (pool_client.py).
        if "the request was lost" in message and "crashed" in message:
            self.server_errors_kill += 1
            return
        if "unavailable" in message or "restarting" in message:
            self.server_errors_restart += 1
        self.server_errors_other.append(message[:200])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
    return out


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


async def wait_healthy(session: aiohttp.ClientSession, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with session.get(url + "/health") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError("the server did not become healthy in time")


async def kv_usage(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    values = [
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("novainfer_kv_cache_usage_ratio")
    ]
    return max(values, default=0.0)


def body_for(rng: random.Random, model: str, stream: bool) -> tuple[str, dict[str, Any]]:
    max_tokens = rng.randint(4, 48)
    if rng.random() < 0.5:
        prompt = f"Write about the number {rng.randint(0, 10**6)}:"
        return "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": stream}
    messages = [{"role": "user", "content": f"Say something about {rng.randint(0, 10**6)}."}]
    return "/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": stream}


async def read_stream(resp: aiohttp.ClientResponse) -> tuple[bool, str | None]:
    """(ended with [DONE], the in-band error message if any)."""
    error = None
    async for line in resp.content:
        if line.startswith(b"data: [DONE]"):
            return True, error
        if line.startswith(b'data: {"error"'):
            error = json.loads(line[6:])["error"]["message"]
    return False, error


async def one(
    i: int, kind: str, session: aiohttp.ClientSession, url: str, model: str, stats: Stats, rng: random.Random
) -> None:
    if kind == "bad":
        data, headers = BAD_BODIES[i % len(BAD_BODIES)]
        async with session.post(
            url + "/v1/completions", data=data, headers={"Content-Type": "application/json", **headers}
        ) as r:
            body = await r.read()
            if r.status >= 500:
                stats.server_error(body.decode(errors="replace"))
                stats.count("bad_5xx")
            else:
                stats.count("bad_4xx" if 400 <= r.status < 500 else f"bad_{r.status}")
        return
    stream = kind in ("cancel", "disconnect") or rng.random() < 0.5
    path, body = body_for(rng, model, stream)
    if kind != "normal":
        body["max_tokens"] = 400
        body["ignore_eos"] = True
    t0 = time.monotonic()
    async with session.post(url + path, json=body) as r:
        if r.status != 200:
            text = await r.text()
            if r.status >= 500:
                stats.server_error(text)
                stats.count(f"{kind}_5xx")
            else:
                stats.count(f"{kind}_{r.status}")
            return
        if not stream:
            payload = await r.json()
            stats.count("normal_ok" if payload.get("choices") else "normal_lost")
            if payload.get("choices"):
                stats.latencies.append(time.monotonic() - t0)
            else:
                stats.lost.append(f"{i}: {payload}")
            return
        if kind == "normal":
            done, error = await read_stream(r)
            if error is not None:
                stats.server_error(error)
                stats.count("normal_stream_error")
            elif done:
                stats.count("normal_ok")
                stats.latencies.append(time.monotonic() - t0)
            else:
                stats.count("normal_lost")
                stats.lost.append(f"{i}: stream cut without an error")
            return
        await r.content.readline()  # the first chunk
        if kind == "disconnect":
            r.close()
            stats.count("disconnect_ok")
            return
        async with session.post(url + f"/v1/requests/{r.headers['X-Request-Id']}/cancel") as c:
            cancelled = c.status == 200
        done, error = await read_stream(r)
        if error is not None:
            stats.server_error(error)
            stats.count("cancel_error")
        elif done:
            stats.count("cancel_ok" if cancelled else "cancel_finished_first")
        else:
            stats.count("cancel_lost")
            stats.lost.append(f"{i}: cancelled stream cut without [DONE]")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    run_dir = tempfile.mkdtemp(prefix="nsoak-", dir="/tmp")
    cmd = [sys.executable, "-m", "novainfer.cli", "serve", "--port", str(port), "--run-dir", run_dir, *args.server_args]
    server = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(args.seed)
    stats = Stats()
    kinds = rng.choices(
        ["normal", "cancel", "disconnect", "bad"],
        weights=[
            1 - args.cancel_frac - args.disconnect_frac - args.bad_frac,
            args.cancel_frac,
            args.disconnect_frac,
            args.bad_frac,
        ],
        k=args.requests,
    )
    timeout = aiohttp.ClientTimeout(total=None)
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            await wait_healthy(session, url, args.start_timeout_s)
            model = (await (await session.get(url + "/v1/models")).json())["data"][0]["id"]
            for w in range(args.warmup):  # so that RSS "before" is the steady state
                await one(w, "normal", session, url, model, Stats(), rng)
            rss_before = rss_bytes(tree(server.pid))
            sem = asyncio.Semaphore(args.concurrency)
            started = 0
            killed: dict[str, Any] = {}
            kill_at = args.requests // 2 if args.kill_engine else -1

            async def guarded(i: int, kind: str) -> None:
                nonlocal started
                async with sem:
                    started += 1
                    if started - 1 == kill_at:
                        engines = [p for p in tree(server.pid) if "services.engine_core" in cmdline(p)]
                        if engines:
                            os.kill(engines[0], signal.SIGKILL)
                            killed.update(pid=engines[0], at_request=i, time=time.time())
                    try:
                        await asyncio.wait_for(one(i, kind, session, url, model, stats, rng), args.hang_s)
                    except asyncio.TimeoutError:
                        stats.hung += 1
                        stats.count(f"{kind}_hung")
                    except aiohttp.ClientError as e:
                        stats.count(f"{kind}_client_error")
                        stats.lost.append(f"{i} ({kind}): {e!r}")

            t0 = time.monotonic()
            await asyncio.gather(*(guarded(i, k) for i, k in enumerate(kinds)))
            elapsed = time.monotonic() - t0
            await wait_healthy(session, url, args.start_timeout_s)
            await asyncio.sleep(3)  # stats are periodic: let the engines report an idle cache
            kv_after = await kv_usage(session, url)
            rss_after = rss_bytes(tree(server.pid))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    lat = sorted(stats.latencies)

    def pct(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None

    return {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "server_args": args.server_args,
        "elapsed_s": round(elapsed, 1),
        "outcomes": dict(sorted(stats.outcomes.items())),
        "lost": len(stats.lost),
        "lost_examples": stats.lost[:10],
        "hung": stats.hung,
        "server_errors_killed_engine_in_flight": stats.server_errors_kill,
        "server_errors_other": len(stats.server_errors_other),
        "server_errors_other_during_restart": stats.server_errors_restart,
        "server_error_examples": stats.server_errors_other[:10],
        "latency_p50_s": pct(0.5),
        "latency_p99_s": pct(0.99),
        "kv_usage_after": kv_after,
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "rss_growth": round(rss_after / rss_before - 1, 4) if rss_before else None,
        "engine_kill": killed or None,
        "server_exit_code": server.returncode,
        "targets_met": not stats.lost
        and not stats.hung
        and not stats.server_errors_other
        and kv_after == 0
        and rss_before > 0
        and rss_after / rss_before - 1 < 0.05,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--cancel-frac", type=float, default=0.1)
    parser.add_argument("--disconnect-frac", type=float, default=0.1)
    parser.add_argument("--bad-frac", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=16, help="requests before RSS is measured")
    parser.add_argument("--no-kill-engine", dest="kill_engine", action="store_false")
    parser.add_argument("--hang-s", type=float, default=300.0, help="a request not ended by then is hung")
    parser.add_argument("--start-timeout-s", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "server_args", nargs="*", help="extra `novainfer serve` flags (after --), e.g. -- --max-num-seqs 64"
    )
    args = parser.parse_args()
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the server this script started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
