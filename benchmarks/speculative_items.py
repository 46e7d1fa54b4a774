"""Speculative decoding item by item, offline: what the model writes for each grounded
request, how much of it is copied from the request's source text, and what speculation
makes of it.

benchmarks/speculative.py measures the served workload as a whole; this shows where its
figure comes from. For each item of speculative.grounded_items() (the same requests, seed
and order as its single-stream point), one at a time: run the engine in this process
with speculation off and with each method, record the output, its overlap with the source
(the share of the output's word 4-grams found in the source), drafted and accepted tokens,
engine steps, and the decode time (first token to last, prefill excluded), and check that
every method's greedy output equals off's.

Writes benchmarks/results/speculative_items.json (with machine_info).

    .venv/bin/python benchmarks/speculative_items.py                       # 12 items, exact mode
    .venv/bin/python benchmarks/speculative_items.py --items 3 --output-len 16 --output /tmp/items.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import compare_peers as cp  # noqa: E402
import speculative as spec  # noqa: E402
from machine_info import machine_info  # noqa: E402

from novainfer.llm import LLM  # noqa: E402
from shared.config import EngineConfig  # noqa: E402
from shared.protocol import SamplingParams  # noqa: E402

RESULTS = os.path.join(HERE, "results", "speculative_items.json")
MODES: dict[str, dict[str, Any]] = {
    "exact": {"exact": True},
    "default": {},
}
"""NovaInfer's modes as EngineConfig fields: --exact, and the defaults (bf16 + int4 where the CPU has them)."""


def word_grams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def copied_share(output: str, source: str) -> float:
    """The share of the output's word 4-grams that occur in the source (0 for an output under 4 words)."""
    grams = word_grams(output)
    return len(grams & word_grams(source)) / len(grams) if grams else 0.0


def prompt_ids(llm: LLM, item: spec.GroundedItem) -> list[int]:
    """The tokens the server would run: the chat template for chat items, the text for completions."""
    if item.path == "/v1/completions":
        return llm.tokenizer.encode(item.prompt)
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": item.prompt}], True)


def counters(llm: LLM) -> tuple[int, int, int, int]:
    """Engine steps, drafts, draft tokens and accepted tokens so far (the engine's /metrics counters)."""
    s = llm.engine.stats()
    return s.steps_total, s.spec_num_drafts, s.spec_num_draft_tokens, s.spec_num_accepted_tokens


def run_item(llm: LLM, request_id: str, ids: list[int], output_len: int) -> dict[str, Any]:
    """One request alone in the engine: its tokens, decode time and the engine's counters."""
    engine = llm.engine
    before = counters(llm)
    params = SamplingParams(max_tokens=output_len, temperature=0.0)
    engine.add_request(request_id, ids, params, llm.tokenizer.eos_token_ids, time.time())
    tokens: list[int] = []
    first = last = time.perf_counter()
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            if out.new_token_ids and not tokens:
                first = now
            tokens += out.new_token_ids
        last = now
    steps, drafts, drafted, accepted = (after - b for after, b in zip(counters(llm), before, strict=True))
    return {
        "tokens": tokens,
        "decode_s": last - first,
        "steps": steps,
        "drafts": drafts,
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
    }


def summarize(item: spec.GroundedItem, off: dict[str, Any], on: dict[str, Any], text: str) -> dict[str, Any]:
    # The first token comes from the prefill step: decode steps and time are those after it.
    decode_tokens = len(on["tokens"]) - 1
    decode_steps = on["steps"] - 1
    return {
        "output_same_as_off": on["tokens"] == off["tokens"],
        "decode_s": on["decode_s"],
        "speedup": off["decode_s"] / on["decode_s"] if on["decode_s"] > 0 else None,
        "steps": on["steps"],
        "tokens_per_step": decode_tokens / decode_steps if decode_steps > 0 else None,
        "drafts": on["drafts"],
        "draft_tokens": on["draft_tokens"],
        "accepted_tokens": on["accepted_tokens"],
        "acceptance_rate": on["accepted_tokens"] / on["draft_tokens"] if on["draft_tokens"] else None,
        "copied": copied_share(text, item.source),
    }


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=spec.METHODS[1:], default=list(spec.METHODS[1:]))
    p.add_argument("--items", type=int, default=12, help="grounded items, the first of speculative.py's list")
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--k", type=int, default=4, help="--num-speculative-tokens")
    p.add_argument("--fixed-k", action="store_true", help="always k drafts (no adaptive draft length)")
    p.add_argument("--mode", choices=list(MODES), default="exact")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--seed",
        type=int,
        default=1001,
        help="the items' seed: speculative.py's single-stream point uses seed * 1000 + 1, 1001 at its default",
    )
    p.add_argument("--output", default=RESULTS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    items = spec.grounded_items(args.items, args.seed)
    base = EngineConfig(num_threads=args.threads, **MODES[args.mode])
    engines = {"off": LLM(config=base)}
    for method in args.methods:
        engines[method] = LLM(
            config=base,
            speculative_method=method,
            num_speculative_tokens=args.k,
            speculative_adaptive_draft_length=not args.fixed_k,
        )
    for name, llm in engines.items():  # first calls (allocation, kernels) out of the first item's time
        run_item(llm, f"warm-up-{name}", llm.tokenizer.encode("Warm up: one two three four"), 8)
    out: dict[str, Any] = {
        "benchmark": "speculative_items",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine_info": machine_info(),
        "config": vars(args),
        "items": [],
    }
    for i, item in enumerate(items):
        ids = prompt_ids(engines["off"], item)
        off = run_item(engines["off"], f"off-{i}", ids, args.output_len)
        text = engines["off"].tokenizer.decode(off["tokens"])
        row: dict[str, Any] = {
            "item": i,
            "task": item.task,
            "prompt_tokens": len(ids),
            "output_tokens": len(off["tokens"]),
            "off_decode_s": off["decode_s"],
            "copied": copied_share(text, item.source),
            "output_start": text[:120],
            "methods": {},
        }
        for method in args.methods:
            on = run_item(engines[method], f"{method}-{i}", ids, args.output_len)
            row["methods"][method] = summarize(item, off, on, text)
        out["items"].append(row)
        cp.save(out, args.output)
        print(
            f"{i:2d} {item.task:<18} copied {row['copied']:4.0%} "
            + "  ".join(
                f"{m} acc {r['acceptance_rate'] or 0:4.0%} tok/step {r['tokens_per_step'] or 0:.2f} "
                f"x{r['speedup'] or 0:.2f}{'' if r['output_same_as_off'] else ' DIFFERS'}"
                for m, r in row["methods"].items()
            ),
            flush=True,
        )
    totals: dict[str, Any] = {}
    off_s = sum(r["off_decode_s"] for r in out["items"])
    for method in args.methods:
        rows = [r["methods"][method] for r in out["items"]]
        on_s = sum(r["decode_s"] for r in rows)
        drafted = sum(r["draft_tokens"] for r in rows)
        totals[method] = {
            "speedup": off_s / on_s if on_s else None,
            "acceptance_rate": sum(r["accepted_tokens"] for r in rows) / drafted if drafted else None,
            "outputs_same_as_off": sum(r["output_same_as_off"] for r in rows) / len(rows) if rows else None,
        }
        print(f"{method}: decode {off_s:.1f}s off vs {on_s:.1f}s: x{totals[method]['speedup'] or 0:.2f}")
    out["totals"] = totals
    cp.save(out, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
