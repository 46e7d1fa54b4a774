"""Two `novainfer serve` instances behind vllm-router (PyPI) on loopback: its cache-aware
policy sends each conversation's turns to the instance that holds the history (a higher
prefix-cache hit rate, read from each instance's /metrics, than round robin), and an
instance that goes away is routed around with no failed request once the router's health
check has seen it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests.e2e.conftest import Server, start_server
from tests.e2e.conversations import prefix_counters, run_conversations
from tests.e2e.vllm_router import ROUTER, run_router

pytestmark = [pytest.mark.slow, pytest.mark.skipif(ROUTER is None, reason="vllm-router (PyPI) is not installed")]
HEALTH_INTERVAL_S = 1


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    tmp = str(tmp_path_factory.mktemp("router"))
    # One torch thread each: two engines spinning on the same few cores starve each other.
    servers = [start_server(tmp, "--num-threads", "1"), start_server(tmp, "--num-threads", "1")]
    yield servers
    for s in servers:
        s.stop()


def router(instances: list[Server], policy: str, log_dir: Path) -> AbstractContextManager[str]:
    return run_router([s.base_url for s in instances], policy, log_dir, HEALTH_INTERVAL_S)


def hit_rate(instances: list[Server], url: str, seed: int) -> float:
    urls = [s.base_url for s in instances]
    hits0, queries0 = prefix_counters(urls)
    assert run_conversations(url, num=4, turns=3, seed=seed) == 0
    hits1, queries1 = prefix_counters(urls)
    return (hits1 - hits0) / (queries1 - queries0)


def test_cache_aware_beats_round_robin(instances: list[Server], tmp_path: Path) -> None:
    # Different seeds: each policy meets conversations neither instance has cached.
    with router(instances, "round_robin", tmp_path) as url:
        round_robin = hit_rate(instances, url, seed=1)
    with router(instances, "cache_aware", tmp_path) as url:
        cache_aware = hit_rate(instances, url, seed=2)
    print(f"prefix-cache hit rate: cache_aware {cache_aware:.1%}, round_robin {round_robin:.1%}")
    assert cache_aware > round_robin + 0.15


def test_dead_instance_is_routed_around(instances: list[Server], tmp_path: Path) -> None:
    with router(instances, "cache_aware", tmp_path) as url:
        assert run_conversations(url, num=2, turns=2, seed=3) == 0
        instances[1].stop()
        # The router marks it unhealthy after a few failed checks, one per interval.
        time.sleep(HEALTH_INTERVAL_S * 6)
        assert run_conversations(url, num=3, turns=2, seed=4) == 0
