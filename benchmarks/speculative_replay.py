"""Speculative decoding replayed: acceptance and verification steps of each proposer and
draft length on the grounded workload's greedy outputs, without running the model again.

Greedy speculation never changes the output (docs/speculative_decoding.md), so once the
outputs of the grounded items are known, what any proposer would have drafted and had
accepted at every step follows from them exactly: propose from prompt + output so far,
accept the drafts up to the first that differs from the output, move on by the accepted
drafts and the target's token. This replays that for each proposer configuration asked for,
with a fixed draft length or the engine's adaptive one (speculative/acceptance.py, with
the step cost taken from `--cost`), and reports per item and in total: verification steps,
drafted and accepted tokens, the mean accepted length per step, the speed-up those steps
imply at the given cost of a row of 1 + k tokens (in decode steps), and the proposer's own
time per call. It is how proposers and k are compared here; the served benchmarks
(speculative.py, speculative_items.py) measure the real thing.

The outputs come from one batched greedy run of the exact mode (`--outputs FILE` reuses
the tokens a previous run saved next to its results).

    .venv/bin/python benchmarks/speculative_replay.py                         # 12 items, 256 tokens
    .venv/bin/python benchmarks/speculative_replay.py --configs ngram:k=8:max_n=16 suffix:k=8
    .venv/bin/python benchmarks/speculative_replay.py --items 3 --output-len 16 --output /tmp/replay.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import compare_peers as cp  # noqa: E402
import speculative as spec  # noqa: E402
import speculative_items as si  # noqa: E402
from machine_info import machine_info  # noqa: E402

from novainfer.llm import LLM  # noqa: E402
from services.engine_core.speculative.acceptance import AcceptanceTracker  # noqa: E402
from services.engine_core.speculative.proposer import Proposer, make_proposer  # noqa: E402
from shared.config import EngineConfig  # noqa: E402
from shared.protocol import SamplingParams  # noqa: E402

RESULTS = os.path.join(HERE, "results", "speculative_replay.json")
DEFAULT_COST = "1:1.11,2:1.22,3:1.77,4:1.79,6:2.37,8:2.38"
"""A row of 1 + k tokens in decode steps: fp32 on this repo's 2-core CPU, the midpoints of the
A/B measurements in docs/benchmarks.md; linear between the points, and past the last one each
draft adds the mean per-draft cost up to it."""
DEFAULT_CONFIGS = (
    "ngram:k=8:max_n=16",
    "ngram:k=4",
    "ngram:k=8",
    "suffix:k=4",
    "suffix:k=8",
    "ngram:k=4:fixed",
    "ngram:k=8:fixed",
    "suffix:k=8:fixed",
)


@dataclass(frozen=True)
class ReplayConfig:
    """One proposer configuration: method, the most drafts k, fixed or adaptive, and EngineConfig overrides."""

    name: str
    method: str
    k: int
    fixed: bool
    overrides: dict[str, Any]

    @classmethod
    def parse(cls, text: str) -> ReplayConfig:
        """method[:k=K][:fixed][:FIELD=VALUE ...]; FIELD names an EngineConfig field, less its
        method prefix (max_n: ngram_prompt_lookup_max; max_tree_depth: suffix_max_tree_depth)."""
        method, *parts = text.split(":")
        k, fixed, overrides = 4, False, {}
        for part in parts:
            if part == "fixed":
                fixed = True
                continue
            key, _, value = part.partition("=")
            if key == "k":
                k = int(value)
                continue
            if method == "ngram":
                field = {"min_n": "ngram_prompt_lookup_min", "max_n": "ngram_prompt_lookup_max"}[key]
            else:
                field = "suffix_" + key
            overrides[field] = float(value) if "." in value else int(value)
        return cls(text, method, k, fixed, overrides)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(speculative_method=self.method, num_speculative_tokens=self.k, **self.overrides)


class StepCosts:
    """The cost of a row of 1 + k tokens in decode steps, from measured points."""

    def __init__(self, text: str) -> None:
        points = {0: 1.0} | {int(k): float(c) for k, c in (p.split(":") for p in text.split(","))}
        self.ks = sorted(points)
        self.costs = [points[k] for k in self.ks]

    def __call__(self, k: int) -> float:
        ks, cs = self.ks, self.costs
        for i in range(1, len(ks)):
            if k <= ks[i]:
                return cs[i - 1] + (cs[i] - cs[i - 1]) * (k - ks[i - 1]) / (ks[i] - ks[i - 1])
        # (Between two measured points the slope can be noise, e.g. ~0 from 6 to 8 drafts.)
        slope = (cs[-1] - 1.0) / ks[-1] if ks[-1] else 0.0
        return cs[-1] + slope * (k - ks[-1])

    def relative_slope(self, max_k: int) -> float:
        """The least-squares slope of cost(k) - 1 over k = 1..max_k: the engine's linear fit of it."""
        ks = range(1, max_k + 1)
        return sum(k * (self(k) - 1.0) for k in ks) / sum(k * k for k in ks)


def best_by_table(alpha: float, max_k: int, costs: StepCosts) -> int:
    """The adaptive rule of draft_length.best_draft_length for one decode row, with the cost of
    each k read from the measured curve rather than from a straight line through it."""
    best_k, best_rate = 0, 1.0
    gain, term = 0.0, 1.0
    for k in range(1, max_k + 1):
        term *= alpha
        gain += term
        if (1.0 + gain) / costs(k) > best_rate:
            best_k, best_rate = k, (1.0 + gain) / costs(k)
    return best_k


def replay_item(
    proposer: Proposer,
    request_id: str,
    prompt: list[int],
    output: list[int],
    config: ReplayConfig,
    costs: StepCosts,
    chooser: str = "linear",
) -> dict[str, Any]:
    """The decode steps of one request (the first token comes from its prefill) under config.
    chooser: how an adaptive draft length is costed, "linear" as the engine does (a slope per
    draft) or "table" (each k's own cost, best_by_table)."""
    tokens = [*prompt, *output[:1]]
    tracker = AcceptanceTracker(adaptive=not config.fixed)
    slope = costs.relative_slope(config.k)
    steps = drafts = drafted = accepted = 0
    cost = propose_s = 0.0
    accepted_per_step: list[int] = []
    i = 1
    while i < len(output):
        # One decode row in the step: the request is alone, as in the single-stream point.
        if config.fixed:
            k = config.k * tracker.should_propose()
        else:
            k = tracker.draft_length(config.k, 1, slope)
            if chooser == "table" and k > 0:
                # The tracker still decides when to back off and probe (by the straight line);
                # while it drafts, the table picks how many.
                k = max(best_by_table(tracker.alpha, config.k, costs), 1)
        guess: list[int] = []
        if k > 0:
            t0 = time.perf_counter()
            guess = proposer.propose(request_id, tokens, len(prompt), k)[:k]
            propose_s += time.perf_counter() - t0
        run = 0
        while run < len(guess) and i + run < len(output) and guess[run] == output[i + run]:
            run += 1
        if guess:
            tracker.record(len(guess), run)
            drafts += 1
            drafted += len(guess)
            accepted += run
            accepted_per_step.append(run)
        new = output[i : i + run + 1]
        tokens += new
        i += len(new)
        steps += 1
        cost += costs(len(guess))
    proposer.finish(request_id, tokens, len(prompt))
    return {
        "steps": steps,
        "drafts": drafts,
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_accepted_length": 1 + accepted / drafts if drafts else None,
        "tokens_per_step": (len(output) - 1) / steps if steps else None,
        "cost_steps": cost,
        "speedup": (len(output) - 1) / cost if cost else None,
        "propose_ms_per_call": 1000 * propose_s / drafts if drafts else None,
    }


def generate_outputs(n: int, output_len: int, seed: int, threads: int) -> list[dict[str, Any]]:
    """The grounded items' greedy outputs, in one batched run of the exact mode."""
    items = spec.grounded_items(n, seed)
    llm = LLM(exact=True, num_threads=threads)
    prompts = [si.prompt_ids(llm, item) for item in items]
    results = llm.generate(prompts, SamplingParams(max_tokens=output_len, temperature=0.0), use_tqdm=False)
    return [
        {
            "task": item.task,
            "prompt_ids": prompt,
            "output_ids": r.outputs[0].token_ids,
            "output_start": r.outputs[0].text[:120],
            "copied": si.copied_share(r.outputs[0].text, item.source),
        }
        for item, prompt, r in zip(items, prompts, results, strict=True)
    ]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="method[:k=K][:fixed][:FIELD=VALUE]")
    p.add_argument("--items", type=int, default=12)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=1001, help="the items' seed (speculative.py's single stream: 1001)")
    p.add_argument("--cost", default=DEFAULT_COST, help="k:cost,... a row of 1 + k tokens in decode steps")
    p.add_argument(
        "--chooser",
        choices=("linear", "table"),
        default="linear",
        help="adaptive draft lengths costed as the engine does (linear) or by each k's measured cost (table)",
    )
    p.add_argument("--outputs", help="the greedy outputs of an earlier run (its JSON); generated if absent")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--output", default=RESULTS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    configs = [ReplayConfig.parse(c) for c in args.configs]
    costs = StepCosts(args.cost)
    if args.outputs and os.path.exists(args.outputs):
        with open(args.outputs) as f:
            outputs = json.load(f)["outputs"]
    else:
        outputs = generate_outputs(args.items, args.output_len, args.seed, args.threads)
    out: dict[str, Any] = {
        "benchmark": "speculative_replay",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine_info": machine_info(),
        "config": vars(args),
        "outputs": outputs,
        "replays": {},
    }
    for config in configs:
        proposer = make_proposer(config.engine_config())
        assert proposer is not None
        # One proposer over the items in order, as one server: the suffix cache carries earlier outputs.
        rows = [
            replay_item(proposer, f"r{i}", o["prompt_ids"], o["output_ids"], config, costs, args.chooser)
            for i, o in enumerate(outputs)
        ]
        decode_tokens = sum(max(len(o["output_ids"]) - 1, 0) for o in outputs)
        cost = sum(r["cost_steps"] for r in rows)
        drafted = sum(r["draft_tokens"] for r in rows)
        drafts = sum(r["drafts"] for r in rows)
        accepted = sum(r["accepted_tokens"] for r in rows)
        total = {
            "speedup": decode_tokens / cost if cost else None,
            "tokens_per_step": decode_tokens / sum(r["steps"] for r in rows),
            "acceptance_rate": accepted / drafted if drafted else None,
            "mean_accepted_length": 1 + accepted / drafts if drafts else None,
        }
        out["replays"][config.name] = {"items": rows, "total": total}
        print(
            f"{config.name:<28} x{total['speedup']:.2f}  tok/step {total['tokens_per_step']:.2f}  "
            f"acceptance {total['acceptance_rate'] or 0:.0%}  "
            f"mean acc. length {total['mean_accepted_length'] or 0:.2f}  "
            "per item x " + " ".join(f"{r['speedup']:.2f}" for r in rows),
            flush=True,
        )
    cp.save(out, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
