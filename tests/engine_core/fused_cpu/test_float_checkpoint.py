"""The fused decode path on a float checkpoint (a Hugging Face directory of bf16 safetensors, no
int4 copies): every decode and verify step runs fused on the dense bf16 weights, its logits stay
close to the eager path's, and greedy output is the same with speculation on or off.

The random-weight models are the tiny configs with hidden_size 128: at 64, the Llama and Qwen2
output projection (64 x 64) is a product torch's CPU matmul sends to its own kernel, not oneDNN's,
for one row (under 16^3 multiply-adds) and to oneDNN's for more, so no chunk of rows gets a
row's lone bits there and the engine gives up row invariance (dense_chunk 0); no real model's
matrices are that small."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch

from services.engine_core.model_runner import ModelRunner
from shared.config import EngineConfig
from tests.engine_core.fused_cpu.conftest import default_mode
from tests.engine_core.fused_cpu.test_decode import _prefilled, assert_fused_logits_close, token_range
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


@pytest.fixture(scope="module")
def runner(ext: ModuleType, bf16_dir: str) -> ModelRunner:
    return ModelRunner(EngineConfig(model=bf16_dir, kv_cache_bytes=16 << 20, max_num_seqs=8))


def test_runs_every_decode_step_fused(runner: ModelRunner, bf16_dir: str) -> None:
    """The default mode (no int4: the checkpoint is not 4-bit) with the fused path; every step
    of decodes runs it, on the dense weights, in chunks that keep rows row-invariant."""
    assert runner.mode == default_mode(int4=False) and runner.model.layers[0].int4 is None
    fused = runner.fused
    assert fused is not None and fused.int4_max_requests == 0 and fused.dense_chunk >= 8
    assert runner.model.dense_head_chunk == fused.dense_chunk
    for requests, drafts in ((1, 0), (1, 8), (8, 3)):
        md = verify_step(*_step(requests, drafts, runner.block_size))[2]
        assert fused.can_run(md) and not fused.uses_int4(md)
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
