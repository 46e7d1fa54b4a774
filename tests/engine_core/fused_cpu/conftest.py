"""The built fused CPU extension, shared by the tests here (they skip where there is no C++
compiler: the engine then runs its eager path, which test_decode.py checks), a decode step's
metadata, and a count of the fused steps that verify drafts."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from services.engine_core import run_mode
from services.engine_core.attention.base import AttentionMetadata
from services.engine_core.fused_cpu import extension
from services.engine_core.fused_cpu.decode import FusedDecode


def default_mode(int4: bool = True, fused: bool = True) -> str:
    """The CPU default's run mode on this CPU (the bundled model's with int4, a float checkpoint's
    without): bf16 dense weights where the CPU has native bf16 or the model no int4 copies, else
    fp32 ones in the fused step (`+fp32-dense`) or, without it (fused=False:
    --no-fused-cpu-decode), the eager float32 mode. Read through run_mode, so a test that
    patches run_mode.cpu_has_native_bf16 (test_float_checkpoint.py) gets its CPU's."""
    native = run_mode.cpu_has_native_bf16()
    mode = ("bfloat16" if native or fused else "float32") + "+int4+int8-lm-head" * int4
    return mode + ("+fused-decode" + ("" if native or not int4 else "+fp32-dense")) * fused


@pytest.fixture(scope="session")
def ext() -> ModuleType:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the fused CPU decode kernels cannot be built here")
    module = extension.load(extension.DEFAULT_CACHE_DIR)
    assert module is not None, "a compiler is present but the fused CPU decode kernels did not build (see the log)"
    return module


def decode_metadata(batch: int, context: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A pure-decode step of `batch` requests, request i `context + i` tokens in, each on its own
    blocks (benchmarks/roofline.py's, with lengths that differ)."""
    seq_lens = [context + i + 1 for i in range(batch)]
    blocks = -(-max(seq_lens) // block_size)
    table = torch.arange(batch * blocks, dtype=torch.int32).view(batch, blocks)
    slots = torch.tensor(
        [int(table[i, (s - 1) // block_size]) * block_size + (s - 1) % block_size for i, s in enumerate(seq_lens)]
    )
    md = AttentionMetadata(
        num_reqs=batch,
        num_tokens=batch,
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=table,
        slot_mapping=slots,
        max_query_len=1,
        max_seq_len=max(seq_lens),
        query_lens_cpu=[1] * batch,
        seq_lens_cpu=seq_lens,
    )
    ids = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(batch))
    return ids, torch.tensor([s - 1 for s in seq_lens]), md


@pytest.fixture
def counted_verify_steps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The number of draft tokens of each fused step that verified any."""
    counts: list[int] = []
    run = FusedDecode.run

    def counting(self: FusedDecode, *args: object) -> torch.Tensor:
        md = args[-1]
        assert isinstance(md, AttentionMetadata)
        if md.num_draft_tokens:
            counts.append(md.num_draft_tokens)
        return run(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(FusedDecode, "run", counting)
    yield counts
