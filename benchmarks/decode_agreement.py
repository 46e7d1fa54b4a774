"""Greedy agreement of the fast CPU modes with the exact mode, and their batch invariance.

The exact mode (--exact: fp32, no int4, eager) is token-for-token with transformers and
batch-invariant (the parity tests assert it). The faster modes (`default`, the CPU default;
bf16, int4, --compile-decode) round differently, so their greedy output may drift from it
after some tokens, and may depend on which other requests share a step (int4 takes a
different kernel above int4.max_rows rows; compiled steps are padded to a batch-size bucket).
This reports, not asserts, both:
- agreement: per prompt, how many leading tokens equal the exact mode's (alone, batch 1);
- batch invariance: whether each prompt's output alone equals its output in a batch of all
  the prompts, decoded together.
Prompts are windows of benchmarks/data/kjv_genesis_1-11.txt (public domain); greedy,
ignore_eos. Writes benchmarks/results/decode_agreement.json.

    .venv/bin/python benchmarks/decode_agreement.py                       # every mode
    .venv/bin/python benchmarks/decode_agreement.py --modes default bf16 int4 int4-bf16   # no compiling
    .venv/bin/python benchmarks/decode_agreement.py --modes fp32-compiled --prompts 4 --tokens 16
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from machine_info import machine_info, write_results  # noqa: E402
from perplexity import TEXT  # noqa: E402
from roofline import MODES  # noqa: E402

from novainfer.llm import LLM  # noqa: E402
from shared.config import EngineConfig  # noqa: E402
from shared.protocol import SamplingParams  # noqa: E402

RESULTS = os.path.join(HERE, "results", "decode_agreement.json")
EXACT = "fp32"


def generate(llm: LLM, prompts: list[list[int]], tokens: int, together: bool) -> list[list[int]]:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    if together:
        return [r.outputs[0].token_ids for r in llm.generate(prompts, params, use_tqdm=False)]
    return [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=RESULTS)
    args = p.parse_args()
    modes = [EXACT] + [m for m in args.modes if m != EXACT]

    with open(TEXT) as f:
        text = f.read()
    outputs: dict[str, dict[str, list[list[int]]]] = {}
    run_modes: dict[str, str] = {}
    prompts: list[list[int]] = []
    for mode in modes:
        # The reference is --exact itself (MODES' fp32 pins the same: float32, no int4, eager).
        overrides = {"exact": True} if mode == EXACT else MODES[mode][0]
        llm = LLM(config=EngineConfig(num_threads=args.threads, max_num_seqs=max(args.prompts, 1), **overrides))
        if not prompts:
            ids = llm.tokenizer.encode(text)
            stride = len(ids) // args.prompts
            prompts = [ids[i * stride : i * stride + args.prompt_tokens] for i in range(args.prompts)]
        run_modes[mode] = llm.engine.runner.mode
        t0 = time.perf_counter()
        outputs[mode] = {
            "alone": generate(llm, prompts, args.tokens, together=False),
            "together": generate(llm, prompts, args.tokens, together=True),
        }
        print(f"{mode}: generated in {time.perf_counter() - t0:.1f}s", flush=True)
        del llm
        gc.collect()

    exact = outputs[EXACT]["alone"]
    results: dict[str, Any] = {}
    for mode in modes:
        alone, together = outputs[mode]["alone"], outputs[mode]["together"]
        prefixes = [common_prefix(a, e) for a, e in zip(alone, exact, strict=True)]
        results[mode] = {
            "config": {"exact": True} if mode == EXACT else MODES[mode][0],
            "run_mode": run_modes[mode],
            "prompts_identical_to_exact": sum(a == e for a, e in zip(alone, exact, strict=True)),
            "mean_tokens_agreeing_before_first_difference": sum(prefixes) / len(prefixes),
            "tokens_agreeing_per_prompt": prefixes,
            "batch_invariant_prompts": sum(a == t for a, t in zip(alone, together, strict=True)),
        }
        r = results[mode]
        print(
            f"{mode:<14} identical to exact: {r['prompts_identical_to_exact']}/{len(prompts)} prompts, "
            f"first difference after {r['mean_tokens_agreeing_before_first_difference']:.1f}/{args.tokens} tokens "
            f"on average; batch-invariant: {r['batch_invariant_prompts']}/{len(prompts)}",
            flush=True,
        )
    out = {
        "benchmark": "decode_agreement",
        "machine": machine_info(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "exact_mode": EXACT,
        "prompts": len(prompts),
        "prompt_tokens": args.prompt_tokens,
        "tokens": args.tokens,
        "results": results,
    }
    write_results(args.output, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
