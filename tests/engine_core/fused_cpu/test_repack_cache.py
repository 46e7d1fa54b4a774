"""The int4 copies in the fused kernel's layout are kept on disk, keyed by their bytes, and read back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.engine_core.fused_cpu import repack_cache
from services.engine_core.fused_cpu.int4_matmul import repack
from services.engine_core.fused_cpu.repack_cache import cached_repack, repack_key
from services.engine_core.models.int4 import Int4Weight


def _weights(seed: int) -> list[Int4Weight]:
    gen = torch.Generator().manual_seed(seed)
    return [Int4Weight.quantize(torch.randn(n, k, generator=gen).to(torch.bfloat16)) for n, k in ((64, 64), (80, 96))]


def _assert_same(got: list[tuple[torch.Tensor, torch.Tensor]], want: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    assert len(got) == len(want)
    for (p, sz), (wp, wsz) in zip(got, want, strict=True):
        assert torch.equal(p, wp) and torch.equal(sz, wsz)


def test_a_second_start_reads_what_the_first_repacked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = _weights(0)
    want = [repack(w) for w in weights]
    _assert_same(cached_repack(str(tmp_path), weights), want)
    assert len(list((tmp_path / "fused_cpu" / "int4").glob("*.safetensors"))) == 1

    def no_repack(_: Int4Weight) -> None:
        raise AssertionError("repacked although cached")

    monkeypatch.setattr(repack_cache, "repack", no_repack)
    _assert_same(cached_repack(str(tmp_path), weights), want)


def test_other_bytes_get_another_key() -> None:
    a, b = _weights(0), _weights(1)
    assert repack_key(a) != repack_key(b)
    assert repack_key(a) == repack_key(_weights(0))
    assert repack_key(a) != repack_key(a[:1])


def test_no_cache_dir_or_a_broken_file_repacks(tmp_path: Path) -> None:
    weights = _weights(2)
    want = [repack(w) for w in weights]
    _assert_same(cached_repack(None, weights), want)
    assert not (tmp_path / "fused_cpu").exists()
    cached_repack(str(tmp_path), weights)
    (path,) = (tmp_path / "fused_cpu" / "int4").glob("*.safetensors")
    path.write_bytes(b"not a safetensors file")
    _assert_same(cached_repack(str(tmp_path), weights), want)
