"""`--num-engines 2` behind one gateway: prefix-affinity routing sends each conversation's
turns to the engine that cached its history, so the prefix-cache hit rate beats round
robin's on the same workload, and both engines serve."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.conftest import start_server
from tests.e2e.conversations import prefix_counters, run_conversations

pytestmark = pytest.mark.slow


def engine_queries(base_url: str) -> dict[str, float]:
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        m[0]: float(m[1])
        for m in re.findall(r'^novainfer_prefix_cache_queries_total\{engine="(\d+)"[^}]*\} (\S+)$', text, re.MULTILINE)
    }


def hit_rate(tmp_path: Path, routing: str, seed: int) -> tuple[float, dict[str, float]]:
    # One torch thread per engine: two engines spinning on the same few cores starve each other.
    server = start_server(str(tmp_path), "--num-engines", "2", "--engine-routing", routing, "--num-threads", "1")
    try:
        assert run_conversations(server.base_url, num=4, turns=3, seed=seed) == 0
        hits, queries = prefix_counters([server.base_url])
        return hits / queries, engine_queries(server.base_url)
    finally:
        server.stop()


def test_prefix_affinity_beats_round_robin(tmp_path: Path) -> None:
    affinity, per_engine = hit_rate(tmp_path, "prefix-affinity", seed=5)
    round_robin, _ = hit_rate(tmp_path, "round-robin", seed=5)
    print(f"prefix-cache hit rate at 2 engines: prefix-affinity {affinity:.1%}, round-robin {round_robin:.1%}")
    assert sorted(per_engine) == ["0", "1"] and min(per_engine.values()) > 0, per_engine
    assert affinity > round_robin + 0.15
