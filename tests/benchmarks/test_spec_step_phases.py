"""benchmarks/spec_step_phases.py: grouping steps by kind, the phases and the clocks (no engine run)."""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
)

import spec_step_phases as ssp


def test_steps_grouped_by_drafts_with_emit_beside_the_step() -> None:
    phases = dict.fromkeys(ssp.PHASES, 0.001)
    steps = [
        {"shape": (1, 1, 0, True), "step": 0.010, "emit": 0.0005, **phases},
        {"shape": (1, 4, 3, True), "step": 0.020, "emit": 0.0005, **phases},
        {"shape": (1, 4, 3, False), "step": 0.020, **phases},
        {"shape": (1, 30, 0, True), "step": 0.050, **phases},
    ]
    groups = ssp.summarize(steps)
    assert set(groups) == {"k=0", "k=3", "k=3 EAGER", "prefill/mixed"}
    k3 = groups["k=3"]
    assert k3["steps"] == 1 and k3["fused"] == 1
    assert abs(k3["step_ms"]["median"] - 20.0) < 1e-9 and abs(k3["emit_ms"]["median"] - 0.5) < 1e-9
    # The rest of the step: what no phase timed (emitting comes after the step, not in it).
    assert abs(k3["other_ms"]["mean"] - (20.0 - len(ssp.PHASES))) < 1e-9
    assert groups["prefill/mixed"]["emit_ms"]["mean"] == 0.0


def test_clocks() -> None:
    assert ssp.CLOCKS["wall"] is time.perf_counter and ssp.CLOCKS["cpu"] is time.thread_time
