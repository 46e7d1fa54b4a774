"""The fused decode path on a float checkpoint (a Hugging Face directory of bf16 safetensors, no
int4 copies): every decode and verify step runs fused on the dense bf16 weights (on a CPU without
native bf16, its decode rows and LM head on the extension's bf16 kernel, csrc/bf16_matmul.h), its
logits stay close to the eager path's, and greedy output is the same with speculation on or off.

The random-weight models are the tiny configs with hidden_size 128: at 64, the Llama and Qwen2
output projection (64 x 64) is a product torch's CPU matmul sends to its own kernel, not oneDNN's,
for one row (under 16^3 multiply-adds) and to oneDNN's for more, so no chunk of rows gets a
row's lone bits there and the engine gives up row invariance (dense_chunk 0); no real model's
matrices are that small."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from services.engine_core import run_mode
from services.engine_core.model_runner import ModelRunner
from shared.config import EngineConfig
from tests.engine_core.fused_cpu.conftest import default_mode
from tests.engine_core.fused_cpu.test_decode import _prefilled, assert_fused_logits_close, token_range
from tests.engine_core.fused_cpu.test_mixed import mixed_step
from tests.engine_core.fused_cpu.test_verify import assert_rows_equal_lone_decodes, drafted, verify_step
from tests.engine_core.speculative.test_spec_engine import GREEDY, check_all_proposers, prompts_for
from tests.engine_core.test_models import hf_tiny_model

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the fused path is the CPU default's")

TINY = ["tiny-llama", "tiny-qwen2", "tiny-qwen3"]


@pytest.fixture(scope="module", params=TINY)
def bf16_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Hugging Face directory of the tiny config's random weights, saved in bf16."""
    tmp = tmp_path_factory.mktemp(request.param)
    path = tmp / "hf"
    hf_tiny_model(request.param, tmp, hidden_size=128).to(torch.bfloat16).save_pretrained(path)
    assert all(t == "BF16" for t in _safetensors_dtypes(path))
    return str(path)


def _safetensors_dtypes(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)


@pytest.fixture(scope="module", params=["this-cpu", "no-native-bf16"])
def native_bf16(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Whether the engine sees a CPU with native bf16: this one's answer, and, where that is yes,
    a CPU without it too (run_mode.cpu_has_native_bf16 patched for the module's tests, engines
    included), so the widened path and the bf16 kernel run on any host."""
    native = run_mode.cpu_has_native_bf16()
    if request.param == "no-native-bf16" and not native:
        pytest.skip("this CPU has no native bf16: the this-cpu case runs that path")
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "no-native-bf16":
            patch.setattr(run_mode, "cpu_has_native_bf16", lambda: False)
            native = False
        yield native


@pytest.fixture(scope="module")
def runner(ext: ModuleType, bf16_dir: str, native_bf16: bool) -> ModelRunner:
    return ModelRunner(EngineConfig(model=bf16_dir, kv_cache_bytes=16 << 20, max_num_seqs=8))


def test_runs_every_decode_step_fused(runner: ModelRunner, bf16_dir: str, native_bf16: bool) -> None:
    """The default mode (no int4: the checkpoint is not 4-bit) with the fused path; every step
    of decodes runs it, on the dense bf16 weights: on a CPU without native bf16 by the extension's
    bf16 kernel (row-invariant at any row count), chosen by the step's requests as int4 is, with
    the library's calls (prefill rows, more requests) on fp32 copies; else in the library's
    row-invariant chunks."""
    assert runner.mode == default_mode(int4=False) and runner.model.layers[0].int4 is None
    assert runner.model.layers[0].qkv_weight.dtype == runner.model.embed.dtype == torch.bfloat16
    fused = runner.fused
    assert fused is not None and fused.int4_max_requests == 0
    assert runner.model.dense_head_chunk == fused.dense_chunk
    emulated = not native_bf16
    assert fused.widen == runner.model.widen_head == emulated
    if emulated:
        assert fused.bf16_rows_max_requests >= 8 and runner.model.bf16_head_kernel is not None
        assert runner.model.bf16_head_max_rows == fused.bf16_rows_max_requests
    else:
        assert fused.dense_chunk >= 8 and runner.model.bf16_head_kernel is None
    for requests, drafts in ((1, 0), (1, 8), (8, 3)):
        md = verify_step(*_step(requests, drafts, runner.block_size))[2]
        assert fused.can_run(md) and not fused.uses_int4(md) and fused.uses_bf16_rows(md) == emulated
    if emulated:
        many = fused.bf16_rows_max_requests + 1
        md = verify_step(*_step(many, 2, runner.block_size))[2]
        assert fused.can_run(md) and not fused.uses_bf16_rows(md)
    off = ModelRunner(EngineConfig(model=bf16_dir, kv_cache_bytes=16 << 20, fused_cpu_decode=False))
    assert off.fused is None and off.mode == default_mode(int4=False, fused=False)


def _step(requests: int, drafts: int, block_size: int) -> tuple[torch.Tensor, list[int], list[list[int]], int]:
    blocks = -(-(21 + drafts) // block_size)
    table = torch.arange(requests * blocks, dtype=torch.int32).view(requests, blocks)
    return table, [20] * requests, [[5] * (1 + drafts)] * requests, block_size


@torch.inference_mode()
@pytest.mark.parametrize(
    ("contexts", "drafts"),
    [([40], [0]), ([17, 3, 64], [0, 0, 0]), ([40], [8]), ([17, 3, 64, 9], [2, 0, 5, 1])],
)
def test_logits_close_to_eager(runner: ModelRunner, contexts: list[int], drafts: list[int]) -> None:
    caches, md0, next_ids, _ = _prefilled(runner, contexts, room=1 + max(drafts))
    copies = [(k.clone(), v.clone()) for k, v in caches]
    tokens = drafted(next_ids, drafts, 0, token_range(runner))
    ids, pos, md = verify_step(md0.block_tables, contexts, tokens, runner.block_size)
    # A random model's logits are flat (near-ties everywhere), so the argmax may differ in any
    # row, as long as it is a near-tie.
    assert_fused_logits_close(runner, ids, pos, caches, copies, md, min_argmax_agreement=0.0)


@torch.inference_mode()
def test_verify_rows_equal_lone_decodes(runner: ModelRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    """4 requests with 0-15 drafts, 40 rows, more than a dense chunk: the layers' and the dense
    LM head's rows go in several calls, and each row still gets the bits of its lone decode."""
    assert_rows_equal_lone_decodes(runner, [30, 5, 61, 12], [12, 0, 9, 15], monkeypatch)


@pytest.mark.parametrize("k", [2, 8])
def test_greedy_unchanged_by_speculation(
    runner: ModelRunner, bf16_dir: str, counted_verify_steps: list[int], k: int
) -> None:
    """ngram, suffix, always-right and always-wrong proposers; 5 requests in one batch, in the
    default mode (the speculative tests' engines are exact)."""
    check_all_proposers(bf16_dir, prompts_for(runner.model_config.vocab_size, seed=k), GREEDY, k=k, exact=False)
    assert counted_verify_steps and max(counted_verify_steps) > k  # several requests' drafts in one fused step


@torch.inference_mode()
def test_decode_rows_unchanged_by_prefill(runner: ModelRunner, native_bf16: bool) -> None:
    """A step of two decode requests verifying drafts (the bf16 kernel's rows without native bf16)
    and a prefill chunk (the library's, on fp32 copies of the weights there): its decode and draft
    rows are bit for bit those of the same step without the chunk."""
    fused = runner.fused
    assert fused is not None
    contexts, drafts, chunk = [17, 3, 40], [2, 5, -1], 60
    caches, md0, next_ids, _ = _prefilled(runner, contexts, room=chunk + 6)
    alone_caches = [(k.clone(), v.clone()) for k, v in caches]
    rng = random.Random(7)
    low, high = token_range(runner)
    tokens = [[int(next_ids[0]), *(rng.randrange(low, high) for _ in range(2))]]
    tokens += [[int(next_ids[1]), *(rng.randrange(low, high) for _ in range(5))]]
    tokens += [[rng.randrange(low, high) for _ in range(chunk)]]
    ids, pos, md = mixed_step(md0.block_tables, contexts, tokens, drafts, runner.block_size)
    ids_a, pos_a, md_a = mixed_step(md0.block_tables[:2], contexts[:2], tokens[:2], drafts[:2], runner.block_size)
    assert fused.uses_bf16_rows(md) == fused.uses_bf16_rows(md_a) == (not native_bf16)
    hidden = fused.run(ids, pos, caches, md)
    assert torch.equal(hidden[: md_a.num_tokens], fused.run(ids_a, pos_a, alone_caches, md_a))


@torch.inference_mode()
def test_prompt_kv_independent_of_chunking(runner: ModelRunner) -> None:
    """A prompt prefilled in one step and in chunks of 1, 37 and 62 rows: the same K/V bits in every
    layer and the same last row (the library's calls of prefill_block rows, on fp32 copies of the
    bf16 weights without native bf16)."""
    fused = runner.fused
    assert fused is not None
    if fused.prefill_block == 0:
        pytest.skip("the dense library gives no position-invariant call size here")
    caches, md0, _, _ = _prefilled(runner, [1], room=110)
    chunked_caches = [(k.clone(), v.clone()) for k, v in caches]
    rng = random.Random(8)
    prompt = [rng.randrange(*token_range(runner)) for _ in range(100)]

    def feed(kv: list[tuple[torch.Tensor, torch.Tensor]], chunks: list[int]) -> torch.Tensor:
        done, hidden = 0, torch.empty(0)
        for n in chunks:
            step = mixed_step(md0.block_tables, [1 + done], [prompt[done : done + n]], [-1], runner.block_size)
            hidden = fused.run(*step[:2], kv, step[2])
            done += n
        return hidden[-1]

    assert torch.equal(feed(caches, [100]), feed(chunked_caches, [1, 37, 62]))
    for (k, v), (k1, v1) in zip(caches, chunked_caches, strict=True):
        assert torch.equal(k, k1) and torch.equal(v, v1)
