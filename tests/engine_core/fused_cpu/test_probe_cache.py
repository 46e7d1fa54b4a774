"""The fused step's start-up probes are kept on disk and read back, keyed by the call shapes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from services.engine_core.fused_cpu.probe_cache import cached_probes, probe_key


def _counting(answer: tuple[int, int, int]) -> tuple[list[int], Callable[[], tuple[int, int, int]]]:
    calls: list[int] = []

    def probe() -> tuple[int, int, int]:
        calls.append(1)
        return answer

    return calls, probe


def test_a_second_start_reads_the_first_ones_answer(tmp_path: Path) -> None:
    weights = [torch.zeros(64, 32), torch.zeros(128, 32, dtype=torch.bfloat16)]
    calls, probe = _counting((4, 32, 128))
    assert cached_probes(str(tmp_path), weights, probe) == (4, 32, 128)
    assert cached_probes(str(tmp_path), weights, probe) == (4, 32, 128)
    assert len(calls) == 1


def test_other_shapes_or_dtypes_probe_again(tmp_path: Path) -> None:
    a, b = [torch.zeros(64, 32)], [torch.zeros(64, 48)]
    assert probe_key(a) != probe_key(b)
    assert probe_key(a) != probe_key([torch.zeros(64, 32, dtype=torch.bfloat16)])
    calls, probe = _counting((1, 32, 128))
    cached_probes(str(tmp_path), a, probe)
    cached_probes(str(tmp_path), b, probe)
    assert len(calls) == 2


def test_no_cache_dir_or_a_broken_file_probes(tmp_path: Path) -> None:
    weights = [torch.zeros(64, 32)]
    calls, probe = _counting((2, 16, 64))
    cached_probes(None, weights, probe)
    cached_probes(None, weights, probe)
    assert len(calls) == 2
    cached_probes(str(tmp_path), weights, probe)
    (path,) = (tmp_path / "fused_cpu" / "probes").glob("*.json")
    path.write_text("{not json")
    assert cached_probes(str(tmp_path), weights, probe) == (2, 16, 64)
    assert len(calls) == 4
    assert cached_probes(str(tmp_path), weights, probe) == (2, 16, 64)
    assert len(calls) == 4  # rewritten whole
