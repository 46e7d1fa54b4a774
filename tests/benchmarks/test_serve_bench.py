"""The serving benchmark's statistics and workloads, without any server."""

from __future__ import annotations

import math
import os
import sys

import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
)

import serve_bench as sb


def test_percentile_matches_linear_interpolation() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]
    assert sb.percentile(xs, 0) == 1.0
    assert sb.percentile(xs, 100) == 4.0
    assert sb.percentile(xs, 50) == pytest.approx(2.5)
    assert sb.percentile(xs, 90) == pytest.approx(3.7)
    assert sb.percentile([5.0], 99) == 5.0
    assert math.isnan(sb.percentile([], 50))
    assert sb.percentile([1.0, math.nan, 3.0], 50) == 2.0


def test_tpot_excludes_the_first_token() -> None:
    r = sb.Result(ok=True, ttft=0.5, e2e=2.5, output_tokens=5)
    assert sb.tpot(r) == pytest.approx(0.5)
    assert math.isnan(sb.tpot(sb.Result(ok=True, ttft=0.5, e2e=0.5, output_tokens=1)))


def test_summarize_counts_only_successful_requests() -> None:
    good = [
        sb.Result(
            ok=True,
            ttft=0.1 * i,
            e2e=1.0 + i,
            itls=[0.01, 0.03],
            output_tokens=10,
            prompt_tokens=20,
            expected_tokens=10,
        )
        for i in range(1, 5)
    ]
    bad = sb.Result(error="HTTP 500: boom", expected_tokens=10)
    short = sb.Result(ok=True, ttft=0.2, e2e=1.0, output_tokens=7, prompt_tokens=20, expected_tokens=10)
    s = sb.summarize([*good, bad, short], duration=2.0, unfinished=3)
    assert (s["completed"], s["errors"], s["unfinished"]) == (5, 1, 3)
    assert s["output_tokens"] == 47 and s["prompt_tokens"] == 100
    assert s["output_tok_per_s"] == pytest.approx(23.5)
    assert s["total_tok_per_s"] == pytest.approx(73.5)
    assert s["request_throughput"] == pytest.approx(2.5)
    assert s["output_len_mismatches"] == 1
    assert s["itl_s"]["mean"] == pytest.approx(0.02)
    assert s["ttft_s"]["p50"] == pytest.approx(0.2)
    assert s["error_samples"] == ["HTTP 500: boom"]
    assert s["usage_cached_prompt_fraction"] is None
    # Tokens streamed by requests cut off at the deadline count in throughput only.
    cut = sb.summarize([*good, bad, short], duration=2.0, unfinished=3, partial_tokens=13)
    assert cut["output_tok_per_s"] == pytest.approx(30.0)
    assert cut["ttft_s"] == s["ttft_s"] and cut["output_tokens"] == 47


def test_random_workload_is_seeded_and_within_ranges() -> None:
    a = [j([]) for j in sb.random_workload(50, (8, 16), (3, 5), seed=7, extra={"ignore_eos": True})]
    b = [j([]) for j in sb.random_workload(50, (8, 16), (3, 5), seed=7, extra={"ignore_eos": True})]
    c = [j([]) for j in sb.random_workload(50, (8, 16), (3, 5), seed=8, extra={"ignore_eos": True})]
    assert [x.body for x in a] == [x.body for x in b] != [x.body for x in c]
    for spec in a:
        assert spec.path == "/v1/completions" and spec.body["ignore_eos"] is True
        assert 8 <= len(spec.body["prompt"].split()) <= 16
        assert 3 <= spec.max_tokens == spec.body["max_tokens"] <= 5
    # A single request: done once it has its answer.
    assert sb.random_workload(1, (8, 8), (3, 3), 0, {})[0](["answer"]) is None


def test_shared_prefix_conversations_carry_their_history() -> None:
    jobs = sb.shared_prefix_workload(
        10, turns=4, n_system=2, system_words=20, user_range=(3, 6), output_range=(4, 4), seed=0, extra={}
    )
    assert len(jobs) == 3  # 4 + 4 + 2 turns
    first = jobs[0]([])
    third = jobs[0](["a1", "a2"])
    assert first.path == "/v1/chat/completions"
    assert third.body["messages"][:2] == first.body["messages"]
    assert [m["role"] for m in third.body["messages"]] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert third.body["messages"][2]["content"] == "a1"
    assert jobs[0](["a"] * 4) is None and jobs[2](["a"] * 2) is None
    # Conversations 0 and 2 share a system prompt; 0 and 1 do not.
    system = [j([]).body["messages"][0]["content"] for j in jobs]
    assert system[0] == system[2] != system[1]


def test_chunk_text_reads_completions_and_chat_chunks() -> None:
    assert sb.chunk_text({"choices": [{"text": "hi"}]}) == "hi"
    assert sb.chunk_text({"choices": [{"delta": {"content": "yo"}}]}) == "yo"
    assert sb.chunk_text({"choices": [{"delta": {"role": "assistant"}}]}) == ""
    assert sb.chunk_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""


def test_seed_workload_shape() -> None:
    args = sb.make_parser().parse_args(["--workload", "seed"])
    specs = [j([]) for j in sb.build_jobs(args)]
    assert len(specs) == 40
    assert all(s.max_tokens == 50 and len(s.body["prompt"].split()) == 32 for s in specs)


def test_parse_range() -> None:
    assert sb.parse_range("32:256") == (32, 256)
    assert sb.parse_range("64") == (64, 64)
