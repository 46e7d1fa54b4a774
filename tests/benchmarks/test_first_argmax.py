"""benchmarks/first_argmax.py: a tiny run times both paths and says which one the sampler takes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
)

import first_argmax as bench

import services.engine_core.sampler as sampler


def test_tiny_run(tmp_path: Path) -> None:
    out = tmp_path / "a.json"
    before = sampler._ARGMAX_PLAIN_MAX
    args = ["--rows", "1", "3", "--vocab", "49152", "--rounds", "2", "--calls", "1"]
    assert bench.main([*args, "--output", str(out)]) == 0
    after = sampler._ARGMAX_PLAIN_MAX
    assert after == before  # restored
    points = json.loads(out.read_text())["points"]
    assert [p["rows"] for p in points] == [1, 3]
    assert [p["first_argmax_takes"] for p in points] == ["plain", "blocked"]
    assert all(p["plain_ms"] > 0 and p["blocked_ms"] > 0 for p in points)
