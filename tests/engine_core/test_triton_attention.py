"""The Triton kernels against the torch reference, on fresh random paged batches.

Without a GPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes
stay small. The interpreter computes bf16 tl.dot wrongly, so bf16 is only tested on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.engine_core.attention import get_backend, triton_interpreter_enabled
from services.engine_core.attention.torch_backend import TorchAttentionBackend, reference_attention

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]')")

ON_GPU = torch.cuda.is_available()


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


if not ON_GPU and not triton_interpreter_enabled():
    pytest.skip("no GPU and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)
if not ON_GPU and _version(triton.__version__) < (3, 8) and _version(np.__version__) >= (2, 4):
    # Its interpreter turns a loop bound into int(1-element array), which numpy >= 2.4 refuses.
    pytest.skip(
        f"triton {triton.__version__}'s interpreter cannot run these kernels with numpy {np.__version__}: "
        "needs triton >= 3.8 on CPU",
        allow_module_level=True,
    )

from services.engine_core.attention.triton_backend import TritonAttentionBackend, choose_num_splits  # noqa: E402
from services.engine_core.attention.triton_kernels import paged_attention, write_kv_cache  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])

# (num_heads, num_kv_heads, head_dim): GQA ratios 1, 3 (SmolLM2), 8, and 3 at head_dim 128.
SHAPES = [(4, 4, 64), (9, 3, 64), (8, 1, 128), (6, 2, 128)]

# Decode rows (contexts block-aligned, partial, and 0: a one-token prompt) mixed with a prefill
# chunk with no context and chunks after a prefix-cache hit (aligned 16, unaligned 19).
MIXED = ([1, 7, 1, 20, 1, 1, 13], [36, 0, 32, 16, 0, 70, 19])
DECODE = ([1] * 5, [36, 0, 32, 150, 9])
# Speculative decoding: decode rows verifying drafts (1 + k tokens after a long context) next to
# plain decodes and a prefill chunk.
SPEC = ([4, 1, 9, 2, 1, 11], [36, 70, 19, 150, 0, 0])


def attention(batch, num_splits: int = 1, pad_rows: int = 0) -> torch.Tensor:
    """Write this step's K/V, then attend into an output poisoned with NaN beforehand."""
    write_kv_cache(batch.key, batch.value, batch.k_cache, batch.v_cache, batch.md.slot_mapping)
    out = torch.full(batch.query.shape, float("nan"), dtype=batch.query.dtype, device=DEVICE)
    md = batch.md
    paged_attention(
        batch.query,
        batch.k_cache,
        batch.v_cache,
        md.block_tables,
        md.seq_lens,
        md.query_start_loc,
        md.max_query_len,
        batch.scale,
        num_splits=num_splits,
        out=out,
    )
    return out


def reference(batch) -> torch.Tensor:
    return reference_attention(batch.query, batch.k_cache, batch.v_cache, batch.md, batch.scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lens", [MIXED, DECODE, SPEC], ids=["mixed", "decode", "spec"])
def test_attention_matches_reference(paged_batch, relative_error, lens, shape, dtype):
    num_heads, num_kv, head_dim = shape
    batch = paged_batch(*lens, num_heads=num_heads, num_kv_heads=num_kv, head_dim=head_dim, dtype=dtype, device=DEVICE)
    assert relative_error(attention(batch), reference(batch)) < TOLERANCE[dtype]


@pytest.mark.parametrize("num_splits", [2, 3, 8])
@pytest.mark.parametrize("lens", [MIXED, DECODE], ids=["mixed", "decode"])
def test_split_kv_matches_reference(paged_batch, relative_error, lens, num_splits):
    # 8 splits leave most requests with empty splits (and rows whose split is all past their
    # causal limit), which the merge must weigh as nothing.
    batch = paged_batch(
        *lens, num_heads=9, num_kv_heads=3, head_dim=64, dtype=torch.float16, device=DEVICE, seed=num_splits
    )
    assert relative_error(attention(batch, num_splits), reference(batch)) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("block_size", [8, 32])
def test_other_block_sizes(paged_batch, relative_error, block_size):
    batch = paged_batch(*MIXED, num_heads=9, num_kv_heads=3, head_dim=64, block_size=block_size, device=DEVICE)
    assert relative_error(attention(batch), reference(batch)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("num_splits", [1, 3])
def test_padded_rows_are_skipped(paged_batch, relative_error, num_splits):
    # A CUDA-graph batch padded past its tokens: padded K/V rows (slot -1) are not written and
    # padded output rows are left alone.
    batch = paged_batch(*MIXED, num_heads=9, num_kv_heads=3, head_dim=64, device=DEVICE, pad_rows=3)
    k_before = batch.k_cache.clone()
    out = attention(batch, num_splits)
    n = batch.md.num_tokens
    assert out[n:].isnan().all()
    assert relative_error(out[:n], reference(batch)[:n]) < TOLERANCE[torch.float32]
    written = torch.zeros(batch.k_cache.shape[:2], dtype=torch.bool, device=DEVICE).view(-1)
    written[batch.md.slot_mapping[:n]] = True
    flat_before, flat_after = k_before.view(len(written), -1), batch.k_cache.view(len(written), -1)
    assert torch.equal(flat_after[~written].isnan(), flat_before[~written].isnan())


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_matches_index_copy(paged_batch, dtype):
    batch = paged_batch(*MIXED, num_heads=8, num_kv_heads=2, head_dim=128, dtype=dtype, device=DEVICE)
    expected_k, expected_v = batch.k_cache.clone(), batch.v_cache.clone()
    TorchAttentionBackend().write_kv(batch.key, batch.value, expected_k, expected_v, batch.md)
    write_kv_cache(batch.key, batch.value, batch.k_cache, batch.v_cache, batch.md.slot_mapping)
    torch.testing.assert_close(batch.k_cache, expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(batch.v_cache, expected_v, rtol=0, atol=0, equal_nan=True)


def test_backend_through_get_backend(paged_batch, relative_error):
    backend = get_backend("triton", DEVICE)
    assert isinstance(backend, TritonAttentionBackend)
    batch = paged_batch(*MIXED, num_heads=9, num_kv_heads=3, head_dim=64, device=DEVICE)
    backend.write_kv(batch.key, batch.value, batch.k_cache, batch.v_cache, batch.md)
    out = backend.forward(batch.query, batch.key, batch.value, batch.k_cache, batch.v_cache, batch.md, batch.scale)
    assert relative_error(out, reference(batch)) < TOLERANCE[torch.float32]


def test_split_heuristic():
    sms = 132
    # Few long decodes: split to about two programs per SM, at most 16 slices.
    assert choose_num_splits(num_reqs=4, num_kv_heads=3, max_query_len=1, max_seq_len=8192, num_sms=sms) == 16
    assert choose_num_splits(num_reqs=16, num_kv_heads=8, max_query_len=1, max_seq_len=8192, num_sms=sms) == 3
    # Short contexts: not worth a merge.
    assert choose_num_splits(num_reqs=4, num_kv_heads=3, max_query_len=1, max_seq_len=300, num_sms=sms) == 1
    assert choose_num_splits(num_reqs=4, num_kv_heads=3, max_query_len=1, max_seq_len=600, num_sms=sms) == 2
    # A full GPU already, or prefill in the batch, or no GPU: one pass.
    assert choose_num_splits(num_reqs=64, num_kv_heads=3, max_query_len=1, max_seq_len=8192, num_sms=sms) == 1
    assert choose_num_splits(num_reqs=4, num_kv_heads=3, max_query_len=512, max_seq_len=8192, num_sms=sms) == 1
    assert choose_num_splits(num_reqs=4, num_kv_heads=3, max_query_len=1, max_seq_len=8192, num_sms=0) == 1


def test_get_backend_choices(monkeypatch):
    assert isinstance(get_backend("auto", "cpu"), TorchAttentionBackend)
    assert isinstance(get_backend("torch", "cpu"), TorchAttentionBackend)
    if ON_GPU:
        assert isinstance(get_backend("auto", "cuda"), TritonAttentionBackend)
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_backend("flash", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        get_backend("triton", "cpu")
