"""benchmarks/speculative_items.py: the overlap measure, and a tiny offline run end to end."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
)

import speculative_items as si


def test_copied_share_counts_output_word_4grams_found_in_the_source() -> None:
    source = "and God saw the light that it was good and God divided the light"
    assert si.copied_share("God saw the light that it was good", source) == 1.0
    assert si.copied_share("a b c d e f", source) == 0.0
    # 1 of the output's 4 four-grams is in the source.
    assert si.copied_share("God saw the light x y z", source) == 0.25
    assert si.copied_share("too short", source) == 0.0


def test_one_item_end_to_end(tmp_path: str) -> None:
    out = os.path.join(str(tmp_path), "items.json")
    assert si.main(["--items", "1", "--output-len", "4", "--methods", "ngram", "--threads", "1", "--output", out]) == 0
    with open(out) as f:
        data = json.load(f)
    (row,) = data["items"]
    assert row["task"] == "code-rename" and row["output_tokens"] >= 1 and 0.0 <= row["copied"] <= 1.0
    ngram = row["methods"]["ngram"]
    assert ngram["output_same_as_off"] is True and ngram["steps"] >= 1
    assert data["totals"]["ngram"]["outputs_same_as_off"] == 1.0
