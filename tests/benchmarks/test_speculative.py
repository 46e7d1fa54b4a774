"""benchmarks/speculative.py: its workload, its flags and what it reads from /metrics (no server)."""

from __future__ import annotations

import os
import random
import sys

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
)

import compare_peers as cp
import speculative as spec


def test_grounded_workload_is_seeded_requests_over_the_shipped_texts() -> None:
    jobs = spec.grounded_workload(12, 32, seed=3, extra={})
    requests = [job([]) for job in jobs]
    assert all(job(["an answer"]) is None for job in jobs)  # one request per job
    items = spec.grounded_items(12, seed=3)
    # Code, passage and table in turn, each kind alternating its variants, so 12 items hold every variant twice.
    assert [it.task for it in items[:6]] == [
        "code-rename",
        "passage-quote",
        "table",
        "code-fix",
        "passage-summarize",
        "table",
    ]
    assert sorted(it.task for it in items) == sorted([it.task for it in items[:6]] * 2)
    for r, it in zip(requests, items, strict=True):
        assert r is not None and r.path == it.path and r.max_tokens == 32
        assert r.body["max_tokens"] == 32 and r.body["temperature"] == 0.0
        assert "ignore_eos" not in r.body  # an answer ends where the model ends it
        assert it.source in it.prompt or it.task == "code-fix"
    code, quote, table, fix = items[0], items[1], items[2], items[3]
    assert code.path == "/v1/chat/completions" and "```python\n" + code.source in code.prompt
    assert "Rename the function" in code.prompt
    assert fix.source not in fix.prompt and len(fix.prompt) > len(fix.source)  # the typo is in the prompt
    with open(spec.PASSAGE_FILE) as f:
        kjv = " ".join(f.read().split())
    assert quote.source in kjv and quote.source[0].isupper() and quote.source[-1] in ".:;?!"
    assert requests[1] is not None and requests[1].body["messages"][0]["content"].endswith(quote.source)
    # A table to continue is a completion: the prompt is the text to go on with.
    assert table.path == "/v1/completions" and requests[2] is not None
    assert requests[2].body["prompt"].endswith("|\n") and table.prompt.count("\n|") >= 20
    again = [job([]) for job in spec.grounded_workload(12, 32, seed=3, extra={})]
    assert [r.body for r in again if r] == [r.body for r in requests if r]
    other = [job([]) for job in spec.grounded_workload(12, 32, seed=4, extra={})]
    assert [r.body for r in other if r] != [r.body for r in requests if r]


def test_code_snippets_are_the_shipped_files_functions() -> None:
    snippets = spec.code_snippets()
    assert len(snippets) >= 8
    texts = "".join(t for _, t in spec.code_files())
    for s in snippets:
        assert s in texts and s.startswith(("def ", "class ")) and 5 <= s.count("\n") <= 30
    assert spec.camel_case("push_socket") == "pushSocket" and spec.camel_case("_tune") == "tune"


def test_code_task_repeats_a_repo_file_with_one_typo() -> None:
    files = dict(spec.code_files())
    assert len(files) >= 3
    rng = random.Random(0)
    for _ in range(20):
        text = rng.choice(list(files.values()))
        broken, word = spec.with_typo(text, rng)
        assert broken != text and len(broken) == len(text)
        assert broken.count(word) == text.count(word) - 1


def test_flags_and_method_args() -> None:
    args = spec.make_parser().parse_args([])
    assert args.methods == ["off", "ngram", "suffix"] and args.workloads == ["grounded", "random", "random-sampled"]
    assert args.concurrency == [1, 8, 32] and args.output.endswith("benchmarks/results/speculative.json")
    args = spec.make_parser().parse_args(["--methods", "suffix", "--concurrency", "1", "--k", "8"])
    assert args.methods == ["suffix"] and args.concurrency == [1] and args.k == 8
    assert spec.method_args("off", 4) == []
    assert spec.method_args("suffix", 8) == ["--speculative-method", "suffix", "--num-speculative-tokens", "8"]
    assert spec.method_args("suffix", 8, fixed_k=True)[-1] == "--no-speculative-adaptive-draft-length"
    cmd = cp.server_command("novainfer", 1, "/r", 2, extra_args=spec.method_args("ngram", 3))
    assert cmd[-4:] == ["--speculative-method", "ngram", "--num-speculative-tokens", "3"]


def test_point_sizes() -> None:
    args = spec.make_parser().parse_args(["--requests-per-conc", "2", "--min-requests", "6", "--output-len", "9"])
    assert len(spec.jobs_for("grounded", 1, args)) == 6
    assert "ignore_eos" not in spec.jobs_for("grounded", 1, args)[0]([]).body  # type: ignore[union-attr]
    assert len(spec.jobs_for("random", 8, args)) == 16
    r = spec.jobs_for("random", 8, args)[0]([])
    assert r is not None and r.path == "/v1/completions" and r.max_tokens == 9


def test_random_sampled_workload_is_seeded_sampling_that_may_stop() -> None:
    args = spec.make_parser().parse_args(["--requests-per-conc", "1", "--min-requests", "4", "--output-len", "9"])
    requests = [job([]) for job in spec.jobs_for("random-sampled", 1, args)]
    bodies = [r.body for r in requests if r is not None]
    assert len(bodies) == 4 and all(r is not None and r.path == "/v1/completions" for r in requests)
    assert all(b["temperature"] == 1.0 and b["max_tokens"] == 9 and "ignore_eos" not in b for b in bodies)
    assert len({b["seed"] for b in bodies}) == 4  # each its own seed ...
    again = [job([]) for job in spec.jobs_for("random-sampled", 1, args)]
    assert [r.body for r in again if r] == bodies  # ... the same for every method


METRICS = """# HELP novainfer_spec_decode_num_drafts_total x
novainfer_spec_decode_num_drafts_total{engine="0"} 10
novainfer_spec_decode_num_drafts_total{engine="1"} 10
novainfer_spec_decode_num_draft_tokens_total{engine="0"} 80
novainfer_spec_decode_num_accepted_tokens_total{engine="0"} 50
novainfer_spec_decode_num_accepted_tokens_per_pos_total{position="0"} 20
vllm:spec_decode_num_accepted_tokens_total{model_name="m"} 50
novainfer_spec_decode_acceptance_ratio{engine="0"} 0.6
novainfer_engine_steps_total 40
novainfer_generation_tokens_total 100
novainfer_prefix_cache_hits_total 7
"""


def test_speculation_stats_from_metrics() -> None:
    before = spec.parse_counters("novainfer_engine_steps_total 10\nnovainfer_generation_tokens_total 10\n")
    after = spec.parse_counters(METRICS)
    assert "novainfer_prefix_cache_hits_total" not in after
    assert "novainfer_spec_decode_acceptance_ratio" not in after  # a gauge
    s = spec.speculation_stats(before, after)
    assert s["drafts"] == 20 and s["draft_tokens"] == 80 and s["accepted_tokens"] == 50
    assert s["acceptance_rate"] == 50 / 80 and s["mean_accepted_length"] == 1 + 50 / 20
    assert s["generated_tokens_per_step"] == 90 / 30
    none = spec.speculation_stats({}, spec.parse_counters("novainfer_engine_steps_total 1\n"))
    assert none["acceptance_rate"] is None and none["mean_accepted_length"] is None


def test_comparison_against_off() -> None:
    runs = [
        {"method": "off", "workload": "grounded", "concurrency": 1, "output_tok_per_s": 10.0, "tpot_p50_s": 0.1},
        {
            "method": "suffix",
            "workload": "grounded",
            "concurrency": 1,
            "output_tok_per_s": 20.0,
            "tpot_p50_s": 0.05,
            "outputs_same_as_off": 1.0,
        },
        {"method": "ngram", "workload": "random", "concurrency": 8, "output_tok_per_s": 5.0, "tpot_p50_s": 0.2},
    ]
    (c,) = spec.compare(runs)
    assert c["method"] == "suffix" and c["output_tok_per_s_ratio"] == 2.0 and c["tpot_p50_speedup"] == 2.0
    assert c["outputs_same_as_off"] == 1.0


def test_structured_workload_asks_for_the_table_as_schema_json() -> None:
    args = spec.make_parser().parse_args(["--requests-per-conc", "1", "--min-requests", "3", "--output-len", "64"])
    requests = [job([]) for job in spec.jobs_for("structured", 1, args)]
    assert len(requests) == 3
    for r in requests:
        assert r is not None and r.path == "/v1/chat/completions" and r.max_tokens == 64
        assert r.body["response_format"]["json_schema"]["schema"] == spec.PARTS_SCHEMA
        assert r.body["ignore_eos"] is True and r.body["temperature"] == 0.0
        assert "| id | item |" in r.body["messages"][0]["content"]
    assert len({r.body["messages"][0]["content"] for r in requests if r}) == 3
