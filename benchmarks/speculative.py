"""Speculative decoding, served: speculation off vs ngram vs suffix, through the OpenAI API.

For each method in turn: start `novainfer serve` on a free loopback port (with
`--speculative-method M --num-speculative-tokens K`, nothing for `off`), warm it up, run
each workload at each concurrency with benchmarks/serve_bench.py's client, stop it.

Workloads:
  grounded  requests whose answer is largely in the prompt, built from text shipped in
            benchmarks/data/ (grounded_items): rename a function of, or fix a typo in, one
            function of the repo's Python files (chat); repeat or summarize a few sentences
            of Genesis (KJV, chat); continue a parts table (/v1/completions); EOS honoured
  random    serve_bench's `random` workload: random words via /v1/completions, greedy,
            EOS ignored (the small model tends to loop there, which proposals do predict)
  random-sampled
            random words via /v1/completions sampled at temperature 1.0 with a seed per
            request, EOS honoured: proposals rarely match, so this is what useless drafts
            cost (seeded: every method generates the same tokens)
  structured  (not in the default list) chat requests with a JSON-schema response_format:
            convert a parts table in the prompt into a JSON array of objects with the same
            five fields each, the repeating structured text agents ask for; the drafts are
            checked against the grammar (docs/speculative_decoding.md)

Every point records output tok/s and TPOT (from the streamed client), and from the
server's /metrics: draft tokens proposed and accepted (acceptance rate; mean accepted
length: tokens per verified proposal, the target's own included, as vLLM counts it) and
generated tokens per engine step. Every method gets the same
requests (seeded per workload and concurrency); the texts of greedy outputs are compared
with those of `off` (`outputs_same_as_off`). `random` and `structured` requests ignore EOS;
`grounded` and `random-sampled` ones end at it, greedy or seeded, so every method generates
the same tokens (in the exact mode). The suffix method's corpus of earlier outputs grows
across points, as it would on a server.

`--paired` starts every method's server at once and sends each request (each batch of c at
concurrency c) to each server in turn, alternating which goes first, and adds each method's
paired ratios against `off` (median, geometric mean, bootstrap interval): the interleaved A/B
that cancels this VM's minute-to-minute drift (benchmarks/speculative_paired.py). The same
requests, flags and JSON fields otherwise.

Writes benchmarks/results/speculative.json (with machine_info), or --output.

    .venv/bin/python benchmarks/speculative.py                          # the full run
    .venv/bin/python benchmarks/speculative.py --paired --mode novainfer --methods off suffix \
        --workloads grounded --concurrency 1 --min-requests 12 --k 8   # off vs suffix, interleaved
    .venv/bin/python benchmarks/speculative.py --concurrency 1 --min-requests 2 \\
        --requests-per-conc 1 --output-len 16 --output /tmp/spec.json    # a smoke run
    .venv/bin/python benchmarks/speculative.py --workloads structured --concurrency 1 8 \\
        --output benchmarks/results/speculative_structured.json           # structured outputs
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import signal
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import compare_peers as cp  # noqa: E402
import serve_bench as sb  # noqa: E402
from machine_info import machine_info  # noqa: E402

DATA = os.path.join(HERE, "data")
CODE_DIR = os.path.join(DATA, "code")
PASSAGE_FILE = os.path.join(DATA, "kjv_genesis_1-11.txt")
RESULTS = os.path.join(HERE, "results", "speculative.json")
METHODS = ("off", "ngram", "suffix")
WORKLOADS = ("grounded", "random", "random-sampled", "structured")
DEFAULT_WORKLOADS = ("grounded", "random", "random-sampled")
# ---------------------------------------------------------------- the grounded workload
#
# SmolLM2-135M-Instruct only does a copying task when the text to copy is short: given a whole
# 60-90 line file or an 18-line passage it describes the text instead of repeating it, and
# asked to continue a table in a chat it lists numbers. Given one function, a passage of a few
# lines, or a table as a text to continue (/v1/completions), it copies. So the items are those:
# what a user of a small model gets their task done with (docs/benchmarks.md has the
# per-item outputs). Summaries stay in, copying little.

TASKS = ("code", "passage", "table")
CODE_TASKS = ("rename", "fix")
PASSAGE_TASKS = ("quote", "summarize")


@dataclass(frozen=True)
class GroundedItem:
    """One request of the grounded workload and the text its answer is grounded in."""

    task: str
    """code-rename, code-fix, passage-quote, passage-summarize or table."""
    path: str
    """/v1/chat/completions (prompt is the user message) or /v1/completions (the prompt)."""
    prompt: str
    source: str
    """The text the answer should copy from (the overlap in speculative_items.py)."""

    def body(self, output_len: int) -> dict[str, Any]:
        body: dict[str, Any] = {"max_tokens": output_len, "temperature": 0.0}
        if self.path == "/v1/completions":
            return body | {"prompt": self.prompt}
        return body | {"messages": [{"role": "user", "content": self.prompt}]}


def code_files() -> list[tuple[str, str]]:
    """(name, text) of the snapshots of the repo's own Python files under benchmarks/data/code."""
    out = []
    for name in sorted(os.listdir(CODE_DIR)):
        with open(os.path.join(CODE_DIR, name)) as f:
            out.append((name.removesuffix(".txt"), f.read()))
    return out


def code_snippets(min_lines: int = 5, max_lines: int = 30) -> list[str]:
    """The top-level functions and classes of the shipped files, each as its own text."""
    out = []
    for _, text in code_files():
        for block in re.findall(r"^(?:def|class) .*?(?=^\S|\Z)", text, re.M | re.S):
            block = block.rstrip() + "\n"
            if min_lines <= block.count("\n") <= max_lines:
                out.append(block)
    return out


def with_typo(text: str, rng: random.Random) -> tuple[str, str]:
    """The text with two adjacent letters of one longer identifier swapped, and that identifier."""
    words = sorted({w for w in re.findall(r"\b[a-z_]{6,}\b", text)})
    word = rng.choice(words)
    i = rng.randrange(1, len(word) - 2)
    typo = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    pos = [m.start() for m in re.finditer(rf"\b{word}\b", text)]
    at = rng.choice(pos)
    return text[:at] + typo + text[at + len(word) :], word


def camel_case(name: str) -> str:
    head, *rest = name.lstrip("_").split("_")
    return head + "".join(w.capitalize() for w in rest)


def code_item(variant: str, rng: random.Random) -> GroundedItem:
    """Rename a function, or fix a typo, in one function or class of the repo: the answer is the code again."""
    if variant == "rename":
        snippet = rng.choice([s for s in code_snippets() if s.startswith("def ") and "_" in s.split("(")[0]])
        name = snippet.split("(")[0].removeprefix("def ")
        ask, code, task = f"Rename the function `{name}` to `{camel_case(name)}`.", snippet, "code-rename"
    else:
        snippet = rng.choice([s for s in code_snippets() if re.search(r"\b[a-z_]{6,}\b", s)])
        (code, _), ask, task = with_typo(snippet, rng), "Fix the typo in this code.", "code-fix"
    # Of the phrasings tried, the one the model most often answers with the code itself.
    prompt = f"Here is my code:\n\n```python\n{code}```\n\n{ask} Reply with only the updated code."
    return GroundedItem(task, "/v1/chat/completions", prompt, snippet)


def passage(rng: random.Random, min_words: int = 50, max_words: int = 100) -> str:
    """Whole consecutive sentences of Genesis 1-11 (KJV, public domain), at least 50-100 words."""
    with open(PASSAGE_FILE) as f:
        sentences = re.split(r"(?<=[.:;?!])\s+(?=[A-Z])", " ".join(f.read().split()))
    target = rng.randint(min_words, max_words)
    start = rng.randrange(0, len(sentences) - 20)  # of ~300
    out: list[str] = []
    for sentence in sentences[start:]:
        out.append(sentence)
        if sum(len(x.split()) for x in out) >= target:
            break
    return " ".join(out)


def passage_item(variant: str, rng: random.Random) -> GroundedItem:
    text = passage(rng)
    if variant == "quote":
        return GroundedItem(
            "passage-quote", "/v1/chat/completions", f"Repeat the passage below exactly.\n\n{text}", text
        )
    ask = "Summarize this passage in two sentences."
    return GroundedItem("passage-summarize", "/v1/chat/completions", f"{ask}\n\n{text}", text)


ITEMS = ("bolt", "washer", "hinge", "bracket", "spring", "gasket", "rivet", "clamp", "valve", "bearing")


def table_rows(rng: random.Random) -> list[str]:
    """A markdown parts table of 20-30 rows."""
    rows = ["| id | item | size (mm) | qty | unit price |", "|---|---|---|---|---|"]
    first = rng.randrange(100, 900)
    for i in range(rng.randint(20, 30)):
        item = ITEMS[(first + i) % len(ITEMS)]
        rows.append(
            f"| {first + i} | {item} | {rng.choice((4, 6, 8, 10, 12))} | {rng.randint(1, 50)} | "
            f"{rng.randint(1, 40)}.{rng.randrange(100):02d} |"
        )
    return rows


def table_item(rng: random.Random) -> GroundedItem:
    # A continuation is a completion, not a chat question: the prompt is the text to go on with.
    table = "\n".join(table_rows(rng))
    return GroundedItem("table", "/v1/completions", f"Parts inventory\n\n{table}\n", table)


def grounded_items(n: int, seed: int) -> list[GroundedItem]:
    """n items cycling through code, passage and table, each kind alternating its variants."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        task, turn = TASKS[i % len(TASKS)], i // len(TASKS)
        if task == "code":
            items.append(code_item(CODE_TASKS[turn % len(CODE_TASKS)], rng))
        elif task == "passage":
            items.append(passage_item(PASSAGE_TASKS[turn % len(PASSAGE_TASKS)], rng))
        else:
            items.append(table_item(rng))
    return items


def grounded_workload(n: int, output_len: int, seed: int, extra: dict[str, Any]) -> list[sb.Job]:
    """n requests of grounded_items(); EOS ends them (the answer is done: what follows an end
    of turn is not part of any task)."""
    return [
        one_request(sb.RequestSpec(item.path, item.body(output_len) | extra, output_len))
        for item in grounded_items(n, seed)
    ]


PARTS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "parts": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "item": {"type": "string"},
                    "size_mm": {"type": "integer"},
                    "qty": {"type": "integer"},
                    "unit_price": {"type": "number"},
                },
                "required": ["id", "item", "size_mm", "qty", "unit_price"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["parts"],
    "additionalProperties": False,
}


def structured_workload(n: int, output_len: int, seed: int, extra: dict[str, Any]) -> list[sb.Job]:
    """n chat requests turning a parts table into JSON under a schema (response_format)."""
    rng = random.Random(seed)
    jobs: list[sb.Job] = []
    for _ in range(n):
        content = (
            "Convert every row of this table, in order, into an object of the `parts` array "
            "(fields id, item, size_mm, qty, unit_price).\n\n" + "\n".join(table_rows(rng))
        )
        body = {
            "messages": [{"role": "user", "content": content}],
            "max_tokens": output_len,
            "temperature": 0.0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "parts", "schema": PARTS_SCHEMA}},
        }
        jobs.append(one_request(sb.RequestSpec("/v1/chat/completions", body | extra, output_len)))
    return jobs


def one_request(spec: sb.RequestSpec) -> sb.Job:
    return lambda answers: spec if not answers else None


def jobs_for(workload: str, concurrency: int, args: argparse.Namespace) -> list[sb.Job]:
    # Fresh prompts for every point (no prefix-cache reuse from an earlier point), the same for every method.
    seed = args.seed * 1000 + concurrency
    extra = {"ignore_eos": True}
    n = max(args.requests_per_conc * concurrency, args.min_requests)
    if workload == "grounded":
        return grounded_workload(n, args.output_len, seed, {})
    if workload == "random":
        return sb.random_workload(n, (32, 256), (args.output_len, args.output_len), seed, extra)
    if workload == "random-sampled":
        return random_sampled_workload(n, args.output_len, seed)
    if workload == "structured":
        return structured_workload(n, args.output_len, seed, extra)
    raise ValueError(workload)


def random_sampled_workload(n: int, output_len: int, seed: int) -> list[sb.Job]:
    """Random-word completions sampled at temperature 1.0, each with its own seed (the same
    tokens with speculation on or off), ending at EOS or output_len tokens."""
    rng = random.Random(seed)
    jobs: list[sb.Job] = []
    for _ in range(n):
        body = {
            "prompt": sb.random_words(rng, rng.randint(32, 256)),
            "max_tokens": output_len,
            "temperature": 1.0,
            "seed": rng.randrange(2**31),
        }
        jobs.append(one_request(sb.RequestSpec("/v1/completions", body, output_len)))
    return jobs


# ---------------------------------------------------------------- /metrics


def scrape(base_url: str) -> dict[str, float]:
    """Counters summed over their labels: the speculation ones, engine steps and generated tokens."""
    try:
        with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return parse_counters(text)


def parse_counters(text: str) -> dict[str, float]:
    sums: dict[str, float] = {}
    for m in re.finditer(r"^([A-Za-z_:][\w:]*)(?:\{[^}]*\})? (\S+)$", text, re.M):
        name = m.group(1)
        # Counters only: a gauge's difference means nothing.
        if ("spec_decode" in name and name.endswith("_total")) or name in (
            "novainfer_engine_steps_total",
            "novainfer_generation_tokens_total",
        ):
            sums[name] = sums.get(name, 0.0) + float(m.group(2))
    return sums


def _find(counters: dict[str, float], pattern: str) -> float | None:
    # NovaInfer's own names first; vLLM's (--metrics-compat vllm) count the same events again.
    for prefix in ("novainfer_", "vllm:"):
        hits = [v for k, v in counters.items() if k.startswith(prefix) and re.search(pattern, k)]
        if hits:
            return sum(hits)
    return None


def speculation_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    d = {k: v - before.get(k, 0.0) for k, v in after.items()}
    drafts = _find(d, r"spec_decode_num_drafts(_total)?$")
    proposed = _find(d, r"spec_decode_num_draft_tokens(_total)?$")
    accepted = _find(d, r"spec_decode_num_accepted_tokens(_total)?$")
    steps = d.get("novainfer_engine_steps_total")
    generated = d.get("novainfer_generation_tokens_total")
    return {
        "spec_decode_counters": {k: v for k, v in d.items() if "spec_decode" in k},
        "drafts": drafts,
        "draft_tokens": proposed,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / proposed if accepted is not None and proposed else None,
        # Tokens a verification row yields, the target's own included (vLLM's and /metrics' definition).
        "mean_accepted_length": 1 + accepted / drafts if accepted is not None and drafts else None,
        "generated_tokens_per_step": generated / steps if generated is not None and steps else None,
    }


# ---------------------------------------------------------------- runs


def method_args(method: str, k: int, fixed_k: bool = False) -> list[str]:
    if method == "off":
        return []  # no speculation flag at all: runs on a build that has none
    fixed = ["--no-speculative-adaptive-draft-length"] if fixed_k else []
    return ["--speculative-method", method, "--num-speculative-tokens", str(k), *fixed]


def digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def run_point(
    server: cp.Server, method: str, workload: str, concurrency: int, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, str]]:
    outputs: dict[str, str] = {}  # request body -> digest of its output text

    def record(spec: sb.RequestSpec, r: sb.Result) -> None:
        if r.ok:
            outputs[json.dumps(spec.body, sort_keys=True)] = digest(r.text)

    before = scrape(server.url)
    s = asyncio.run(
        sb.run_jobs(
            server.url,
            cp.MODEL_NAME,
            jobs_for(workload, concurrency, args),
            concurrency,
            None,
            args.point_timeout_s,
            args.point_timeout_s,
            args.seed,
            on_result=record,
        )
    )
    stats = speculation_stats(before, scrape(server.url))
    if s["truncated"]:
        server.settle()
    run = {
        "method": method,
        "workload": workload,
        "concurrency": concurrency,
        "completed": s["completed"],
        "errors": s["errors"],
        "unfinished": s["unfinished"],
        "truncated": s["truncated"],
        "duration_s": s["duration_s"],
        "output_tok_per_s": s["output_tok_per_s"],
        "tpot_mean_s": s["tpot_s"]["mean"],
        "tpot_p50_s": s["tpot_s"]["p50"],
        "tpot_p99_s": s["tpot_s"]["p99"],
        "ttft_p50_s": s["ttft_s"]["p50"],
        "output_len_mismatches": s["output_len_mismatches"],
        **stats,
        "error_samples": s["error_samples"],
    }
    rate = stats["acceptance_rate"]
    print(
        f"  {method:<6} {workload:<8} c={concurrency:<3} {s['output_tok_per_s']:7.1f} out tok/s  "
        f"TPOT p50 {s['tpot_s']['p50'] * 1000:.0f}ms  "
        f"acceptance {'-' if rate is None else f'{rate:.0%}'}  "
        f"done {s['completed']} err {s['errors']} unfinished {s['unfinished']}",
        flush=True,
    )
    return run, outputs


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each method's point against `off` at the same workload and concurrency."""
    base = {(r["workload"], r["concurrency"]): r for r in runs if r["method"] == "off"}
    out = []
    for r in runs:
        b = base.get((r["workload"], r["concurrency"]))
        if r["method"] == "off" or b is None:
            continue
        out.append(
            {
                "method": r["method"],
                "workload": r["workload"],
                "concurrency": r["concurrency"],
                "output_tok_per_s_ratio": r["output_tok_per_s"] / b["output_tok_per_s"]
                if b["output_tok_per_s"]
                else None,
                "tpot_p50_speedup": b["tpot_p50_s"] / r["tpot_p50_s"] if r["tpot_p50_s"] else None,
                "outputs_same_as_off": r.get("outputs_same_as_off"),
            }
        )
    return out


def bench_method(
    method: str, args: argparse.Namespace, out: dict[str, Any], baseline: dict[Any, dict[str, str]]
) -> None:
    server = cp.Server(args.mode, args.threads, "float32", extra_args=method_args(method, args.k, args.fixed_k))
    try:
        try:
            ready_s = server.wait_ready()
        except RuntimeError as e:
            # A build without this method (or its flags): record why and go on with the others.
            out["servers"][method] = {"command": server.cmd, "error": str(e), "log_tail": cp._log_tail(server)}
            print(f"{method}: did not start: {e}", flush=True)
            return
        print(f"{method}: ready in {ready_s:.1f}s ({' '.join(server.cmd)})", flush=True)
        out["servers"][method] = {"command": server.cmd, "ready_s": ready_s}
        cp._warm_up(server, burst=False)
        for workload in args.workloads:
            for c in args.concurrency:
                run, outputs = run_point(server, method, workload, c, args)
                if method == "off":
                    baseline[(workload, c)] = outputs
                elif (workload, c) in baseline:
                    ref = baseline[(workload, c)]
                    common = [k for k in outputs if k in ref]
                    run["outputs_same_as_off"] = (
                        sum(outputs[k] == ref[k] for k in common) / len(common) if common else None
                    )
                out["runs"].append(run)
                out["comparison"] = compare(out["runs"])
                cp.save(out, args.output)
                if server.proc.poll() is not None:
                    raise RuntimeError(f"{method} died during {workload} c={c}: {cp._log_tail(server, 5)}")
    finally:
        server.stop()


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(DEFAULT_WORKLOADS))
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--k", type=int, default=4, help="--num-speculative-tokens of the speculating servers")
    p.add_argument("--fixed-k", action="store_true", help="always k drafts (--no-speculative-adaptive-draft-length)")
    p.add_argument("--output-len", type=int, default=256, help="tokens per request (EOS ignored but in random-sampled)")
    p.add_argument("--requests-per-conc", type=int, default=2, help="requests per point: this x concurrency ...")
    p.add_argument("--min-requests", type=int, default=6, help="... but at least this many")
    p.add_argument("--point-timeout-s", type=float, default=600.0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--mode",
        default="novainfer-exact",
        choices=list(cp.NOVAINFER_MODES),
        help="NovaInfer's mode (compare_peers.NOVAINFER_MODES); exact by default, where speculation's "
        "outputs must equal the non-speculative ones token for token (the fast modes' kernels round "
        "differently by batch size)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--paired",
        action="store_true",
        help="every method's server at once, each request (or batch of c) to each in turn: paired ratios vs off",
    )
    p.add_argument("--output", default=RESULTS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, cp._interrupt)  # a killed run still stops the server it started
    if args.paired:
        # Imported here: speculative_paired builds on this module's workloads and counters.
        import speculative_paired

        return speculative_paired.main(args)
    out: dict[str, Any] = {
        "benchmark": "speculative",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine_info": machine_info(),
        "config": vars(args),
        "servers": {},
        "runs": [],
        "comparison": [],
    }
    baseline: dict[Any, dict[str, str]] = {}
    # off first: the other methods' outputs are compared with its.
    for method in sorted(args.methods, key=lambda m: m != "off"):
        bench_method(method, args, out, baseline)
    cp.save(out, args.output)
    for c in out["comparison"]:
        ratio = c["output_tok_per_s_ratio"]
        same = c["outputs_same_as_off"]
        print(
            f"{c['method']:<6} {c['workload']:<8} c={c['concurrency']:<3} "
            f"{'-' if ratio is None else f'{ratio:.2f}x'} output tok/s vs off, "
            f"{'-' if same is None else f'{same:.0%}'} of outputs identical to off"
        )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
