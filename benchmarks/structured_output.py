"""Structured-output throughput: does constrained decoding slow the batch down?

Against a running server (--base-url), or one it starts itself (`novainfer serve` with
--serve-args, stopped at the end), at a fixed concurrency on chat completions:
  (a) free       every request free text
  (b) json       every request under its own JSON schema (corpus schemas made distinct per
                 request, so the compile cache cannot hide compilation)
  (c) mixed      half free, half JSON schema
and reports output tok/s of each (completion tokens / wall time of the phase) and the
ratios (b)/(a), (c)/(a) (target: >= 0.90). Free requests use ignore_eos with the same
max_tokens, so the batch stays full; constrained requests end when their JSON is done,
which is why the ratio is of tok/s, not of requests/s.

Those ratios also charge the JSON phases for their shorter outputs (every request's
prefill and tail is spread over ~25 tokens instead of 128), which is not the grammar's
cost. So a fourth phase, (a') free-matched, replays (b) as free text with each request's
max_tokens set to the length its JSON answer had (ignore_eos), and (b)/(a') isolates
what constraining costs at equal output lengths.

It also compiles every corpus schema in this process with the engine's compiler (cache
off) and reports compile time p50/p99.

    .venv/bin/python benchmarks/structured_output.py --concurrency 32 --num-requests 128 --max-tokens 128
    .venv/bin/python benchmarks/structured_output.py --base-url http://127.0.0.1:8000 --model SmolLM2-135M-Instruct

Writes benchmarks/results/structured_output.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator
from typing import Any

import aiohttp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare_peers import Server  # noqa: E402
from machine_info import machine_info  # noqa: E402

from tests.engine_core.schema_corpus import SCHEMAS  # noqa: E402

PROMPT = "Write a short description of a person, a place or a thing."
START_TIMEOUT_S = 300


@contextlib.contextmanager
def own_server(serve_args: list[str]) -> Iterator[str]:
    """`novainfer serve --exact` (compare_peers' server, all cores; the mode of the published
    results) with serve_args; its base URL once /health answers 200; stopped at the end."""
    server = Server("novainfer-exact", threads=os.cpu_count() or 1, dtype="float32", extra_args=serve_args)
    try:
        server.wait_ready(START_TIMEOUT_S)
        yield server.url
    finally:
        server.stop()


def distinct_schema(i: int) -> dict[str, Any]:
    """Corpus schema i % len, with a property only this request has (a new compile each)."""
    schema = copy.deepcopy(SCHEMAS[i % len(SCHEMAS)])
    if schema.get("type") == "object" and "properties" in schema:
        schema["properties"][f"id{i}"] = {"type": "integer", "minimum": 0, "maximum": 9}
    else:
        # $defs stay at the root, where the schema's "#/$defs/..." references point.
        defs = {key: schema.pop(key) for key in ("$defs", "definitions") if key in schema}
        schema = {"type": "object", "properties": {f"v{i}": schema}, "required": [f"v{i}"], **defs}
    return schema


def body(model: str, max_tokens: int, schema: dict[str, Any] | None) -> dict[str, Any]:
    b: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
    }
    if schema is None:
        b["ignore_eos"] = True
    else:
        b["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    return b


async def run_phase(base_url: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    queue: asyncio.Queue[tuple[int, dict[str, Any]]] = asyncio.Queue()
    for i, b in enumerate(bodies):
        queue.put_nowait((i, b))
    tokens = [0, 0]  # free, constrained
    lengths = [0] * len(bodies)
    errors: list[str] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i, b = queue.get_nowait()
            async with session.post(base_url + "/v1/chat/completions", json=b) as r:
                data = await r.json()
            if r.status != 200:
                errors.append(str(data)[:200])
                continue
            lengths[i] = data["usage"]["completion_tokens"]
            tokens["response_format" in b] += lengths[i]

    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        duration = time.perf_counter() - t0
    total = sum(tokens)
    return {
        "requests": len(bodies),
        "duration_s": round(duration, 3),
        "output_tokens": total,
        "output_tok_s": round(total / duration, 2),
        "free_tokens": tokens[0],
        "constrained_tokens": tokens[1],
        "lengths": lengths,
        "errors": errors,
    }


def compile_times(model: str) -> dict[str, float]:
    """Every corpus schema compiled once with the engine's settings, cache off."""
    import xgrammar as xgr

    from services.engine_core.structured_output import _JSON_SEPARATORS
    from services.tokenizer_pool.tokenizer import load_tokenizer
    from shared.config import EngineConfig

    tok = load_tokenizer(EngineConfig(model=model))
    backend = tok.backend
    vocab = [""] * tok.vocab_size
    for token, idx in backend.get_vocab(with_added_tokens=True).items():
        if idx < tok.vocab_size:
            vocab[idx] = token
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    info = xgr.TokenizerInfo(vocab, vocab_type=meta["vocab_type"], vocab_size=tok.vocab_size)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    times = []
    for schema in SCHEMAS:
        t0 = time.perf_counter()
        compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=_JSON_SEPARATORS)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {
        "schemas": len(times),
        "p50_ms": round(times[len(times) // 2], 3),
        "p99_ms": round(times[min(len(times) - 1, int(0.99 * len(times)))], 3),
        "max_ms": round(times[-1], 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None, help="a running server; default: start one with --serve-args")
    p.add_argument("--serve-args", default="", help="extra `novainfer serve` flags for the server it starts")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--tokenizer-model", default="smollm2", help="--model as the server got it (for compile times)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "structured_output.json"))
    args = p.parse_args(argv)

    n, mt = args.num_requests, args.max_tokens
    phases = {
        "free": [body(args.model, mt, None) for _ in range(n)],
        "json": [body(args.model, mt, distinct_schema(i)) for i in range(n)],
        "mixed": [body(args.model, mt, distinct_schema(n + i) if i % 2 else None) for i in range(n)],
    }
    results: dict[str, Any] = {"config": vars(args), "phases": {}}
    with contextlib.ExitStack() as stack:
        base_url = args.base_url or stack.enter_context(own_server(shlex.split(args.serve_args)))
        for name, bodies in phases.items():
            results["phases"][name] = r = asyncio.run(run_phase(base_url, bodies, args.concurrency))
            print(f"{name:12s} {r['output_tok_s']:9.1f} tok/s  ({r['output_tokens']} tokens, {r['duration_s']} s)")
        matched = [body(args.model, max(1, k), None) for k in results["phases"]["json"]["lengths"]]
        results["phases"]["free_matched"] = r = asyncio.run(run_phase(base_url, matched, args.concurrency))
        print(
            f"{'free_matched':12s} {r['output_tok_s']:9.1f} tok/s  ({r['output_tokens']} tokens, {r['duration_s']} s)"
        )
    phase_tok_s = {name: r["output_tok_s"] for name, r in results["phases"].items()}
    results["ratio_json"] = round(phase_tok_s["json"] / phase_tok_s["free"], 3)
    results["ratio_mixed"] = round(phase_tok_s["mixed"] / phase_tok_s["free"], 3)
    results["ratio_json_matched"] = round(phase_tok_s["json"] / phase_tok_s["free_matched"], 3)
    results["machine_info"] = machine_info()
    results["compile"] = compile_times(args.tokenizer_model)
    print(
        f"json/free {results['ratio_json']}, mixed/free {results['ratio_mixed']}, "
        f"json/free_matched {results['ratio_json_matched']}; compile {results['compile']}"
    )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
