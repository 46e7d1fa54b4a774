"""Speculative decoding replayed: the engine's proposers and draft-length policy over known
outputs, without running the model again: steps, drafts and accepted tokens exactly as the
engine would count them, and the speed-up they imply at a measured step-cost curve.

Speculation never changes the output (greedy, or seeded sampling: each position draws with
its own uniform; docs/speculative_decoding.md), so once a workload's outputs are known, what
speculation does at every step follows from them: propose from prompt + output so far (the
engine's proposer), choose the draft length as the engine does (its AcceptanceTracker and
StepCost, the latter fed the step times of the cost curve), accept drafts up to the first
that differs from the output, move on by the accepted drafts and the target's token. Each
request decodes alone (the single-stream point), one proposer over the requests in order (as
one server: the suffix cache carries earlier outputs).

Per workload and configuration it reports: decode steps, tokens per step, draft tokens per
step, steps that drafted (and why the others did not: the policy chose 0 drafts, or the
proposer had none), acceptance, mean accepted length, and the projected speed-up: decode
tokens over the steps' cost, a step verifying k drafts costing `--cost`'s figure for k in
decode steps (default: the single-stream points of benchmarks/results/verify_step_cost.json,
the CPU default mode). Per-step serving overheads and the proposer's own time are not in it
(the proposer's time per call is reported).

Workloads are speculative.py's (the same prompts, seeds and order as its single-stream point):
`grounded` (greedy, EOS honoured), `random` (greedy random words, EOS ignored),
`random-sampled` (temperature 1.0, a seed per request). Their outputs come from one batched
run per workload in the CPU default mode (`--exact`: the exact mode), saved with the results;
`--outputs FILE` reuses those of an earlier run.

    .venv/bin/python benchmarks/speculative_replay.py                         # 3 workloads x 12 requests, 256 tokens
    .venv/bin/python benchmarks/speculative_replay.py --outputs benchmarks/results/speculative_replay.json
    .venv/bin/python benchmarks/speculative_replay.py --configs suffix:k=8 ngram:k=8:max_n=16 --workloads grounded
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
from machine_info import machine_info  # noqa: E402

from novainfer.llm import LLM  # noqa: E402
from services.engine_core.speculative.acceptance import AcceptanceTracker  # noqa: E402
from services.engine_core.speculative.draft_length import StepCost, StepPlan  # noqa: E402
from services.engine_core.speculative.proposer import Proposer, make_proposer  # noqa: E402
from shared.config import EngineConfig  # noqa: E402
from shared.protocol import SamplingParams  # noqa: E402

RESULTS = os.path.join(HERE, "results", "speculative_replay.json")
STEP_COST_RESULTS = os.path.join(HERE, "results", "verify_step_cost.json")
FALLBACK_COST = "1:1.0,2:1.005,3:1.10,4:1.57,5:2.26,6:2.15,7:2.44,8:2.42"
"""verify_step_cost.json's single-stream points of 2026-12-02 (CPU default mode, 2 threads),
for when that file is absent."""
DECODE_S = 0.011
"""The simulated decode step (s): only ratios matter, StepCost learns relative costs."""
DEFAULT_CONFIGS = ("suffix:k=8", "ngram:k=8", "suffix:k=8:fixed")
DEFAULT_WORKLOADS = ("grounded", "random", "random-sampled")


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
        return EngineConfig(
            speculative_method=self.method,
            num_speculative_tokens=self.k,
            speculative_adaptive_draft_length=not self.fixed,
            **self.overrides,
        )


class StepCosts:
    """The cost of a step verifying k drafts, in decode steps, from measured points."""

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

    def __str__(self) -> str:
        return ",".join(f"{k}:{c:.3f}" for k, c in zip(self.ks[1:], self.costs[1:], strict=True))


def measured_cost(path: str = STEP_COST_RESULTS) -> str:
    """The single-stream points of a verify_step_cost.py run as `--cost` text (FALLBACK_COST without one)."""
    if not os.path.exists(path):
        return FALLBACK_COST
    with open(path) as f:
        points = [p for p in json.load(f)["points"] if p["batch"] == 1 and p["drafts"] > 0]
    return ",".join(f"{p['drafts']}:{p['x_no_drafts']:.3f}" for p in points) or FALLBACK_COST


class Replayer:
    """One configuration over a workload's requests, in order, as one engine would see them."""

    def __init__(self, config: ReplayConfig, costs: StepCosts, jitter: float = 0.05, seed: int = 0) -> None:
        self.config = config
        self.engine_config = config.engine_config()
        proposer = make_proposer(self.engine_config)
        assert proposer is not None
        self.proposer: Proposer = proposer
        self.costs = costs
        self.step_cost = StepCost()
        self.jitter = jitter
        self.rng = random.Random(seed)

    def _draft_length(self, tracker: AcceptanceTracker) -> int:
        """The engine's choice (engine.py, _propose) for a request decoding alone."""
        max_k = self.config.k
        if self.config.fixed:
            return max_k if tracker.should_propose() else 0
        return tracker.draft_length(max_k, StepPlan(self.step_cost, 1))

    def item(self, request_id: str, prompt: list[int], output: list[int]) -> dict[str, Any]:
        """The decode steps of one request (its first token comes from its prefill)."""
        tokens = [*prompt, *output[:1]]
        tracker = AcceptanceTracker(adaptive=not self.config.fixed)
        steps = drafts = drafted = accepted = chose_none = proposed_none = 0
        cost = propose_s = 0.0
        i = 1
        while i < len(output):
            k = self._draft_length(tracker)
            guess: list[int] = []
            if k > 0:
                t0 = time.perf_counter()
                guess = self.proposer.propose(request_id, tokens, len(prompt), k)[:k]
                propose_s += time.perf_counter() - t0
                proposed_none += not guess
            else:
                chose_none += 1
            run = 0
            while run < len(guess) and i + run < len(output) and guess[run] == output[i + run]:
                run += 1
            if guess:
                tracker.record(len(guess), run)
                drafts += 1
                drafted += len(guess)
                accepted += run
            new = output[i : i + run + 1]
            tokens += new
            i += len(new)
            steps += 1
            step = self.costs(len(guess))
            cost += step
            noise = 1.0 + self.jitter * (2.0 * self.rng.random() - 1.0)
            self.step_cost.record(1, len(guess), step * DECODE_S * noise)
        self.proposer.finish(request_id, tokens, len(prompt))
        return {
            "decode_tokens": len(output) - 1 if output else 0,
            "steps": steps,
            "drafting_steps": drafts,
            "no_draft_chosen": chose_none,
            "no_draft_found": proposed_none,
            "draft_tokens": drafted,
            "accepted_tokens": accepted,
            "cost_steps": cost,
            "propose_s": propose_s,
        }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals and ratios over a workload's replayed requests."""
    t = {key: sum(r[key] for r in rows) for key in rows[0]} if rows else {}
    steps, drafts, drafted = t.get("steps", 0), t.get("drafting_steps", 0), t.get("draft_tokens", 0)
    return t | {
        "tokens_per_step": t["decode_tokens"] / steps if steps else None,
        "draft_tokens_per_step": drafted / steps if steps else None,
        "acceptance_rate": t["accepted_tokens"] / drafted if drafted else None,
        "mean_accepted_length": 1 + t["accepted_tokens"] / drafts if drafts else None,
        "speedup": t["decode_tokens"] / t["cost_steps"] if t.get("cost_steps") else None,
        "propose_ms_per_call": 1000 * t["propose_s"] / (drafts + t["no_draft_found"])
        if drafts + t.get("no_draft_found", 0)
        else None,
    }


def replay(
    config: ReplayConfig, outputs: list[dict[str, Any]], costs: StepCosts, jitter: float = 0.05
) -> dict[str, Any]:
    replayer = Replayer(config, costs, jitter)
    rows = [replayer.item(f"r{i}", o["prompt_ids"], o["output_ids"]) for i, o in enumerate(outputs)]
    return {"items": rows, "total": summarize(rows)}


def workload_requests(workload: str, n: int, output_len: int, seed: int) -> list[dict[str, Any]]:
    """speculative.py's single-stream requests of a workload (their bodies), in its order."""
    args = argparse.Namespace(seed=seed, requests_per_conc=n, min_requests=n, output_len=output_len)
    return [job([]).body | {"path": job([]).path} for job in spec.jobs_for(workload, 1, args)][:n]


def generate_outputs(workload: str, n: int, output_len: int, seed: int, llm: LLM) -> list[dict[str, Any]]:
    """A workload's outputs, in one batched run (as the server would run them: chat template
    for chat requests, the text for completions)."""
    bodies = workload_requests(workload, n, output_len, seed)
    prompts, params = [], []
    for b in bodies:
        if "messages" in b:
            prompts.append(llm.tokenizer.apply_chat_template(b["messages"], True))
        else:
            prompts.append(llm.tokenizer.encode(b["prompt"]))
        params.append(
            SamplingParams(
                max_tokens=b["max_tokens"],
                temperature=b.get("temperature", 1.0),
                seed=b.get("seed"),
                ignore_eos=b.get("ignore_eos", False),
            )
        )
    results = [llm.generate([p], [sp], use_tqdm=False)[0] for p, sp in zip(prompts, params, strict=True)]
    return [
        {"prompt_ids": p, "output_ids": r.outputs[0].token_ids, "output_start": r.outputs[0].text[:120]}
        for p, r in zip(prompts, results, strict=True)
    ]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="method[:k=K][:fixed][:FIELD=VALUE]")
    p.add_argument("--workloads", nargs="+", default=list(DEFAULT_WORKLOADS), choices=DEFAULT_WORKLOADS)
    p.add_argument("--items", type=int, default=12, help="requests per workload")
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="speculative.py's --seed (its single-stream point)")
    p.add_argument(
        "--cost",
        default=None,
        help="k:cost,... a step verifying k drafts in decode steps (default: verify_step_cost.json's single stream)",
    )
    p.add_argument(
        "--jitter", type=float, default=0.05, help="+- share of noise on the step times StepCost learns from"
    )
    p.add_argument("--exact", action="store_true", help="generate the outputs in the exact mode")
    p.add_argument("--outputs", help="the outputs of an earlier run (its JSON); generated if absent")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--output", default=RESULTS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    configs = [ReplayConfig.parse(c) for c in args.configs]
    costs = StepCosts(args.cost or measured_cost())
    saved: dict[str, list[dict[str, Any]]] = {}
    if args.outputs and os.path.exists(args.outputs):
        with open(args.outputs) as f:
            saved = json.load(f)["outputs"]
    missing = [w for w in args.workloads if w not in saved]
    if missing:
        llm = LLM(exact=args.exact, num_threads=args.threads)
        for w in missing:
            saved[w] = generate_outputs(w, args.items, args.output_len, args.seed, llm)
    out: dict[str, Any] = {
        "benchmark": "speculative_replay",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine_info": machine_info(),
        "config": vars(args) | {"cost": str(costs)},
        "outputs": {w: saved[w] for w in args.workloads},
        "replays": {},
    }
    for w in args.workloads:
        for config in configs:
            result = replay(config, saved[w], costs, args.jitter)
            out["replays"].setdefault(w, {})[config.name] = result
            t = result["total"]
            print(
                f"{w:<15} {config.name:<22} x{t['speedup']:.2f}  steps {t['steps']}  "
                f"tok/step {t['tokens_per_step']:.2f}  draft tok/step {t['draft_tokens_per_step']:.2f}  "
                f"drafting steps {t['drafting_steps']} (none chosen {t['no_draft_chosen']}, "
                f"none found {t['no_draft_found']})  acceptance {t['acceptance_rate'] or 0:.0%}  "
                f"mean acc. length {t['mean_accepted_length'] or 0:.2f}",
                flush=True,
            )
    cp.save(out, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
