"""benchmarks/speculative_replay.py: the engine's proposers and draft-length policy replayed
over known outputs (no model)."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
)

import speculative_replay as sr


def test_configs_parse_into_engine_configs() -> None:
    c = sr.ReplayConfig.parse("ngram:k=8:max_n=16:fixed")
    assert (c.method, c.k, c.fixed) == ("ngram", 8, True)
    e = c.engine_config()
    assert e.speculative_method == "ngram" and e.num_speculative_tokens == 8 and e.ngram_prompt_lookup_max == 16
    assert not e.speculative_adaptive_draft_length
    s = sr.ReplayConfig.parse("suffix:min_token_prob=0.2:max_tree_depth=32").engine_config()
    assert s.suffix_min_token_prob == 0.2 and s.suffix_max_tree_depth == 32 and s.num_speculative_tokens == 4
    with pytest.raises(KeyError):
        sr.ReplayConfig.parse("ngram:depth=3")


def test_step_costs_interpolate_between_measured_points() -> None:
    costs = sr.StepCosts("2:1.2,4:2.0")
    assert costs(0) == 1.0 and costs(1) == pytest.approx(1.1) and costs(3) == pytest.approx(1.6)
    assert costs(6) == pytest.approx(2.5)  # past the last point: the mean cost per draft up to it
    assert str(costs) == "2:1.200,4:2.000"


def test_measured_cost_reads_the_single_stream_points(tmp_path: str) -> None:
    path = os.path.join(str(tmp_path), "cost.json")
    points = [{"batch": b, "drafts": d, "x_no_drafts": 1 + 0.1 * d * b} for b in (1, 8) for d in range(3)]
    with open(path, "w") as f:
        json.dump({"points": points}, f)
    assert sr.measured_cost(path) == "1:1.100,2:1.200"
    assert sr.measured_cost(os.path.join(str(tmp_path), "absent.json")) == sr.FALLBACK_COST


def test_a_copy_is_accepted_whole_and_a_fixed_k_steps_by_k_plus_one() -> None:
    source = list(range(100, 160))
    prompt = [1, 2, *source, 3]
    output = [*source, 4]  # the model repeats the source, then ends
    r = sr.Replayer(sr.ReplayConfig.parse("ngram:k=4:fixed"), sr.StepCosts("4:2.0")).item("r", prompt, output)
    # Token 0 comes from the prefill; the first decode has only a 1-token match (min_n is 2), so
    # it decodes plainly; from then on every draft of the copy is right but the last (the
    # drafts run past the source into the prompt's 3, which the output does not have).
    assert r["drafting_steps"] == 12 and r["draft_tokens"] == 48 and r["accepted_tokens"] == 47
    assert r["steps"] == 13 and r["no_draft_found"] == 1 and r["no_draft_chosen"] == 0
    assert r["cost_steps"] == pytest.approx(1 + 12 * 2.0)
    t = sr.summarize([r])
    assert t["tokens_per_step"] == pytest.approx(60 / 13) and t["speedup"] == pytest.approx(60 / 25)
    assert t["draft_tokens_per_step"] == pytest.approx(48 / 13)
    assert t["mean_accepted_length"] == pytest.approx(1 + 47 / 12)


def test_adaptive_lengths_follow_the_cost_curve() -> None:
    """A copy, drafts free up to 2 and dear past 3: the engine's policy learns the curve from
    the steps it replays and drafts 2-3 at a time, never 4 or more for long."""
    source = list(range(100, 400))
    replayer = sr.Replayer(sr.ReplayConfig.parse("suffix:k=8"), sr.StepCosts("1:1.0,2:1.0,3:1.1,4:2.0,8:3.0"), 0.0)
    r = replayer.item("r", [1, *source, 2], source)
    t = sr.summarize([r])
    assert t["acceptance_rate"] > 0.95
    assert 2.9 < t["tokens_per_step"] < 4.2
    assert t["speedup"] > 2.8


def test_nothing_to_copy_costs_nothing_with_adaptive_lengths() -> None:
    replayer = sr.Replayer(sr.ReplayConfig.parse("suffix:k=4"), sr.StepCosts(sr.FALLBACK_COST))
    r = replayer.item("r", [5, 6, 7], list(range(20, 60)))
    assert r["drafting_steps"] == 0 and r["cost_steps"] == r["steps"] == 39


def test_main_on_saved_outputs(tmp_path: str) -> None:
    outputs = {"grounded": [{"prompt_ids": [9, *range(30), 9], "output_ids": list(range(30))}]}
    saved = os.path.join(str(tmp_path), "saved.json")
    with open(saved, "w") as f:
        json.dump({"outputs": outputs}, f)
    out = os.path.join(str(tmp_path), "replay.json")
    argv = ["--outputs", saved, "--workloads", "grounded", "--configs", "ngram:k=4:fixed", "suffix:k=8"]
    assert sr.main([*argv, "--output", out]) == 0
    with open(out) as f:
        data = json.load(f)
    assert set(data["replays"]["grounded"]) == {"ngram:k=4:fixed", "suffix:k=8"}
    assert data["replays"]["grounded"]["ngram:k=4:fixed"]["total"]["speedup"] > 1.5
