"""Online serving benchmark for any OpenAI-compatible server (NovaInfer, llama.cpp, ...).

Streams every request and measures, per request: TTFT (time to the first chunk with
non-empty text), ITL (gaps between content chunks: a chunk carrying several tokens
counts as one gap), TPOT = (e2e - ttft) / (output_tokens - 1) and e2e latency. Output
tokens come from the server's `usage` when it sends one, else from the number of
content chunks. Requests are issued at a fixed concurrency or with Poisson arrivals,
from a seeded workload, bounded in count and in time (in-flight requests at the
deadline are cancelled and reported as `unfinished`, not as errors).

Workloads:
  random         prompts of random words (lengths from ranges) via /v1/completions, ignore_eos
  shared-prefix  multi-turn chats over a few shared system prompts via /v1/chat/completions;
                 turn k is sent after turn k-1 answered, with the real answer in the history
  seed           40 requests, concurrency 8, 32 prompt words, 50 output tokens

    .venv/bin/python benchmarks/serve_bench.py --base-url http://127.0.0.1:8000 \
        --model SmolLM2-135M-Instruct --workload random --num-requests 64 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

# Words that are one token each (with their leading space) in GPT-2-style BPE vocabularies
# such as SmolLM2's, so that a prompt of N words is close to N tokens on every server.
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when if "
    "will more no out so said what up its about into than them can only other new some time "
    "could these two may then do first any my now such like our over man me even most made "
    "after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see "
    "men work long get here between both life being under never day same another know while "
    "last might us great old year off come since against go came right used take three"
).split()


@dataclass
class RequestSpec:
    """One HTTP request: endpoint path and JSON body (stream fields are added later)."""

    path: str
    body: dict[str, Any]
    max_tokens: int


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    ttft: float = math.nan
    e2e: float = math.nan
    itls: list[float] = field(default_factory=list)
    text: str = ""
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    expected_tokens: int = 0
    chunks: int = 0  # content chunks so far: what a request cut off at the deadline had produced


# A job is one request (random, seed) or one conversation (shared-prefix): a function of the
# previous answers that returns the next request, or None when the job is done.
Job = Callable[[list[str]], "RequestSpec | None"]


# ---------------------------------------------------------------- workloads


def random_words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def random_workload(
    n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], seed: int, extra: dict[str, Any]
) -> list[Job]:
    rng = random.Random(seed)
    jobs: list[Job] = []
    for _ in range(n):
        prompt = random_words(rng, rng.randint(*prompt_range))
        max_tokens = rng.randint(*output_range)
        spec = RequestSpec(
            "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **extra}, max_tokens
        )
        jobs.append(lambda answers, spec=spec: spec if not answers else None)
    return jobs


def shared_prefix_workload(
    n_requests: int,
    turns: int,
    n_system: int,
    system_words: int,
    user_range: tuple[int, int],
    output_range: tuple[int, int],
    seed: int,
    extra: dict[str, Any],
) -> list[Job]:
    """ceil(n_requests / turns) conversations over n_system system prompts: every turn
    repeats the system prompt and the whole history, which a prefix cache can reuse."""
    rng = random.Random(seed)
    systems = [f"You are assistant number {i}. " + random_words(rng, system_words) for i in range(n_system)]
    jobs: list[Job] = []
    remaining = n_requests
    conv = 0
    while remaining > 0:
        k = min(turns, remaining)
        remaining -= k
        system = systems[conv % n_system]
        users = [random_words(rng, rng.randint(*user_range)) for _ in range(k)]
        outs = [rng.randint(*output_range) for _ in range(k)]

        def job(
            answers: list[str], system: str = system, users: list[str] = users, outs: list[int] = outs
        ) -> RequestSpec | None:
            t = len(answers)
            if t >= len(users):
                return None
            messages = [{"role": "system", "content": system}]
            for u, a in zip(users[:t], answers, strict=False):
                messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
            messages.append({"role": "user", "content": users[t]})
            body = {"messages": messages, "max_tokens": outs[t], "temperature": 0.0, **extra}
            return RequestSpec("/v1/chat/completions", body, outs[t])

        jobs.append(job)
        conv += 1
    return jobs


# ---------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), NaN when empty."""
    xs = sorted(v for v in values if not math.isnan(v))
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def dist(values: Sequence[float]) -> dict[str, float]:
    xs = [v for v in values if not math.isnan(v)]
    return {
        "mean": sum(xs) / len(xs) if xs else math.nan,
        "p50": percentile(xs, 50),
        "p90": percentile(xs, 90),
        "p99": percentile(xs, 99),
    }


def tpot(r: Result) -> float:
    # A one-token answer has no decode phase: it has no TPOT.
    if r.output_tokens < 2:
        return math.nan
    return (r.e2e - r.ttft) / (r.output_tokens - 1)


def summarize(results: list[Result], duration: float, unfinished: int, partial_tokens: int = 0) -> dict[str, Any]:
    """partial_tokens: streamed by requests still running at the deadline. They count in the
    token throughput (the server did produce them in the window), not in latencies."""
    ok = [r for r in results if r.ok]
    out_tok = sum(r.output_tokens for r in ok)
    in_tok = sum(r.prompt_tokens for r in ok)
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    dur = max(duration, 1e-9)
    return {
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "unfinished": unfinished,
        "duration_s": duration,
        "request_throughput": len(ok) / dur,
        "output_tok_per_s": (out_tok + partial_tokens) / dur,
        "total_tok_per_s": (out_tok + partial_tokens + in_tok) / dur,
        "output_tokens": out_tok,
        "partial_output_tokens": partial_tokens,
        "prompt_tokens": in_tok,
        # ignore_eos not honoured, or a server that cannot stop where asked, shows up here.
        "output_len_mismatches": sum(r.output_tokens != r.expected_tokens for r in ok),
        "usage_cached_prompt_fraction": (sum(cached) / in_tok) if cached and in_tok else None,
        "ttft_s": dist([r.ttft for r in ok]),
        "tpot_s": dist([tpot(r) for r in ok]),
        "itl_s": dist([x for r in ok for x in r.itls]),
        "e2e_s": dist([r.e2e for r in ok]),
        "error_samples": sorted({r.error for r in results if not r.ok})[:5],
    }


# ---------------------------------------------------------------- client


def chunk_text(event: dict[str, Any]) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if "text" in c:
        return c.get("text") or ""
    return (c.get("delta") or {}).get("content") or ""


async def send(
    session: aiohttp.ClientSession, base_url: str, spec: RequestSpec, model: str, timeout_s: float, res: Result
) -> Result:
    body = {**spec.body, "model": model, "stream": True, "stream_options": {"include_usage": True}}
    res.expected_tokens = spec.max_tokens
    usage: dict[str, Any] | None = None
    t0 = time.perf_counter()
    last = t0
    try:
        async with session.post(
            base_url + spec.path, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = f"stream error: {str(event['error'])[:200]}"
                    return res
                usage = event.get("usage") or usage
                if "timings" in event:  # llama.cpp: prompt tokens reused from its slot cache
                    res.cached_tokens = int(event["timings"].get("cache_n", 0))
                text = chunk_text(event)
                if text:
                    now = time.perf_counter()
                    if res.chunks == 0:
                        res.ttft = now - t0
                    else:
                        res.itls.append(now - last)
                    last = now
                    res.chunks += 1
                    res.text += text
    except asyncio.TimeoutError:
        res.error = f"timeout after {timeout_s:.0f}s"
        return res
    except (aiohttp.ClientError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"[:200]
        return res
    res.e2e = time.perf_counter() - t0
    if res.chunks == 0:
        res.error = "no content in the stream"
        return res
    res.ok = True
    res.output_tokens = int(usage["completion_tokens"]) if usage else res.chunks
    res.prompt_tokens = int(usage.get("prompt_tokens", 0)) if usage else 0
    details = (usage or {}).get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None:
        res.cached_tokens = int(details["cached_tokens"])
    return res


async def fetch_metrics(session: aiohttp.ClientSession, base_url: str) -> dict[str, float] | None:
    """NovaInfer's prefix-cache counters summed over engines, or None for other servers."""
    try:
        async with session.get(base_url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
            if r.status != 200:
                return None
            text = await r.text()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
    sums = {"queries": 0.0, "hits": 0.0}
    found = False
    for m in re.finditer(r"^novainfer_prefix_cache_(queries|hits)_total(?:\{[^}]*\})? (\S+)$", text, re.M):
        sums[m.group(1)] += float(m.group(2))
        found = True
    return sums if found else None


async def run_jobs(
    base_url: str,
    model: str,
    jobs: list[Job],
    concurrency: int,
    request_rate: float | None,
    max_duration_s: float,
    timeout_s: float,
    seed: int,
    on_result: Callable[[RequestSpec, Result], None] | None = None,
) -> dict[str, Any]:
    """on_result: called with every finished request and its result (e.g. to compare outputs)."""
    base_url = base_url.rstrip("/").removesuffix("/v1")
    results: list[Result] = []
    running: set[int] = set()  # ids of Results whose request is in flight
    live: list[Result] = []
    rng = random.Random(seed + 1)
    sem = asyncio.Semaphore(concurrency)
    # The semaphore, not the pool, sets concurrency. A fresh connection per request: llama-server
    # closes streamed connections, and a reused one then fails as "Can not write request body".
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        before = await fetch_metrics(session, base_url)

        async def run_job(job: Job) -> None:
            async with sem:
                answers: list[str] = []
                while (spec := job(answers)) is not None:
                    r = Result()
                    live.append(r)
                    running.add(id(r))
                    await send(session, base_url, spec, model, timeout_s, r)
                    running.discard(id(r))
                    results.append(r)
                    if on_result is not None:
                        on_result(spec, r)
                    if not r.ok:
                        return  # a conversation cannot go on without its answer
                    answers.append(r.text)

        t0 = time.perf_counter()
        tasks: list[asyncio.Task[None]] = []

        async def issue() -> None:
            for job in jobs:
                tasks.append(asyncio.create_task(run_job(job)))
                if request_rate:
                    await asyncio.sleep(rng.expovariate(request_rate))

        issuer = asyncio.create_task(issue())
        deadline = t0 + max_duration_s
        while (left := deadline - time.perf_counter()) > 0:
            busy = [t for t in tasks if not t.done()]
            if issuer.done() and not busy:
                break
            # Only unfinished tasks: a finished one (the issuer, once every job is started) would
            # make wait() return at once, and this loop would spin a core the servers need.
            waiting = [t for t in (issuer, *busy) if not t.done()]
            await asyncio.wait(waiting, timeout=min(left, 1.0), return_when=asyncio.FIRST_COMPLETED)
        duration = time.perf_counter() - t0
        issuer.cancel()
        pending = [t for t in tasks if not t.done()]
        for t in pending:
            t.cancel()
        await asyncio.gather(issuer, *pending, return_exceptions=True)
        for t in tasks:  # a bug in the client must fail the run, not read as an empty result
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        after = await fetch_metrics(session, base_url)
    partial = sum(r.chunks for r in live if id(r) in running)
    summary = summarize(results, duration, unfinished=len(pending) + (len(jobs) - len(tasks)), partial_tokens=partial)
    summary["truncated"] = bool(pending) or len(tasks) < len(jobs)
    if before is not None and after is not None:
        q = after["queries"] - before["queries"]
        summary["prefix_cache_hit_rate"] = (after["hits"] - before["hits"]) / q if q > 0 else None
    return summary


# ---------------------------------------------------------------- CLI


def parse_range(s: str) -> tuple[int, int]:
    lo, _, hi = s.partition(":")
    return int(lo), int(hi or lo)


def build_jobs(args: argparse.Namespace) -> list[Job]:
    # Every server here honours `ignore_eos` (NovaInfer, llama.cpp's llama-server and
    # benchmarks/peers/hf_server.py): without it the model may stop early and make
    # throughput figures incomparable.
    extra: dict[str, Any] = {"ignore_eos": True}
    if args.workload == "seed":
        return random_workload(40, (32, 32), (50, 50), args.seed, extra)
    if args.workload == "random":
        return random_workload(args.num_requests, args.prompt_len, args.output_len, args.seed, extra)
    return shared_prefix_workload(
        args.num_requests,
        args.turns,
        args.num_system_prompts,
        args.system_prompt_len,
        args.prompt_len,
        args.output_len,
        args.seed,
        extra,
    )


def print_table(s: dict[str, Any]) -> None:
    print(
        f"completed {s['completed']}  errors {s['errors']}  unfinished {s['unfinished']}  "
        f"in {s['duration_s']:.1f}s{'  (TRUNCATED)' if s['truncated'] else ''}"
    )
    print(
        f"requests/s {s['request_throughput']:.2f}  output tok/s {s['output_tok_per_s']:.1f}  "
        f"total tok/s {s['total_tok_per_s']:.1f}"
    )
    if s.get("prefix_cache_hit_rate") is not None:
        print(f"prefix cache hit rate (server /metrics) {s['prefix_cache_hit_rate']:.1%}")
    print(f"{'ms':<6}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for k in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        d = s[k]
        print(f"{k[:-2].upper():<6}" + "".join(f"{d[p] * 1000:>10.1f}" for p in ("mean", "p50", "p90", "p99")))
    for e in s["error_samples"]:
        print("error:", e)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--workload", choices=("random", "shared-prefix", "seed"), default="random")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8, help="requests (conversations) in flight at most")
    p.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="Poisson arrivals per second (of requests or conversations); still capped by --concurrency",
    )
    p.add_argument(
        "--prompt-len", type=parse_range, default=(32, 256), help="words, LO:HI (user turns for shared-prefix)"
    )
    p.add_argument("--output-len", type=parse_range, default=(64, 64), help="tokens, LO:HI")
    p.add_argument("--turns", type=int, default=4, help="shared-prefix: turns per conversation")
    p.add_argument("--num-system-prompts", type=int, default=4)
    p.add_argument("--system-prompt-len", type=int, default=300, help="words")
    p.add_argument("--max-duration-s", type=float, default=600.0)
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    concurrency = 8 if args.workload == "seed" else args.concurrency
    summary = asyncio.run(
        run_jobs(
            args.base_url,
            args.model,
            build_jobs(args),
            concurrency,
            args.request_rate,
            args.max_duration_s,
            args.request_timeout_s,
            args.seed,
        )
    )
    summary["config"] = {k: v for k, v in vars(args).items() if k != "output_json"} | {"concurrency": concurrency}
    print_table(summary)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
