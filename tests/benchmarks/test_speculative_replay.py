"""benchmarks/speculative_replay.py: replaying proposers over known greedy outputs (no model)."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
)

import speculative_replay as sr

from services.engine_core.speculative.proposer import make_proposer


def test_configs_parse_into_engine_configs() -> None:
    c = sr.ReplayConfig.parse("ngram:k=8:max_n=16:fixed")
    assert (c.method, c.k, c.fixed) == ("ngram", 8, True)
    e = c.engine_config()
    assert e.speculative_method == "ngram" and e.num_speculative_tokens == 8 and e.ngram_prompt_lookup_max == 16
    s = sr.ReplayConfig.parse("suffix:min_token_prob=0.2:max_tree_depth=32").engine_config()
    assert s.suffix_min_token_prob == 0.2 and s.suffix_max_tree_depth == 32 and s.num_speculative_tokens == 4
    with pytest.raises(KeyError):
        sr.ReplayConfig.parse("ngram:depth=3")


def test_step_costs_interpolate_between_measured_points() -> None:
    costs = sr.StepCosts("2:1.2,4:2.0")
    assert costs(0) == 1.0 and costs(1) == pytest.approx(1.1) and costs(3) == pytest.approx(1.6)
    assert costs(6) == pytest.approx(2.5)  # past the last point: the mean cost per draft up to it
    # The table rule reads each k's own cost: 2 drafts at 1.2 beat 4 at 2.0 even at alpha 0.99.
    assert sr.best_by_table(0.5, 4, costs) == 2 and sr.best_by_table(0.99, 4, costs) == 2
    assert sr.best_by_table(0.99, 4, sr.StepCosts("2:1.2,4:1.3")) == 4
    assert sr.best_by_table(0.05, 4, costs) == 0
    assert sr.StepCosts("1:1.5").relative_slope(1) == pytest.approx(0.5)


def test_a_copy_is_accepted_whole_and_a_fixed_k_steps_by_k_plus_one() -> None:
    source = list(range(100, 160))
    prompt = [1, 2, *source, 3]
    output = [*source, 4]  # the model repeats the source, then ends
    config = sr.ReplayConfig.parse("ngram:k=4:fixed")
    proposer = make_proposer(config.engine_config())
    assert proposer is not None
    r = sr.replay_item(proposer, "r", prompt, output, config, sr.StepCosts("4:2.0"))
    # Token 0 comes from the prefill; the first decode has only a 1-token match (min_n is 2), so
    # it decodes plainly; from then on every draft of the copy is right but the last (the
    # drafts run past the source into the prompt's 3, which the output does not have).
    assert r["drafts"] == 12 and r["draft_tokens"] == 48 and r["accepted_tokens"] == 47
    assert r["steps"] == 13 and r["tokens_per_step"] == pytest.approx(60 / 13)
    assert r["speedup"] == pytest.approx(60 / (1 + 12 * 2.0))
    assert r["mean_accepted_length"] == pytest.approx(1 + 47 / 12)


def test_nothing_to_copy_costs_nothing_with_adaptive_lengths() -> None:
    config = sr.ReplayConfig.parse("suffix:k=4")
    proposer = make_proposer(config.engine_config())
    assert proposer is not None
    r = sr.replay_item(proposer, "r", [5, 6, 7], list(range(20, 60)), config, sr.StepCosts(sr.DEFAULT_COST))
    assert r["drafts"] == 0 and r["speedup"] == pytest.approx(1.0) and r["tokens_per_step"] == 1.0


def test_main_on_saved_outputs(tmp_path: str) -> None:
    outputs = [{"task": "table", "prompt_ids": [9, *range(30), 9], "output_ids": list(range(30)), "copied": 1.0}]
    saved = os.path.join(str(tmp_path), "saved.json")
    with open(saved, "w") as f:
        json.dump({"outputs": outputs}, f)
    out = os.path.join(str(tmp_path), "replay.json")
    argv = ["--outputs", saved, "--configs", "ngram:k=4:fixed", "suffix:k=8", "--chooser", "table", "--output", out]
    assert sr.main(argv) == 0
    with open(out) as f:
        data = json.load(f)
    assert set(data["replays"]) == {"ngram:k=4:fixed", "suffix:k=8"}
    assert data["replays"]["ngram:k=4:fixed"]["total"]["speedup"] > 1.5
