"""Int4 weight copies for small CPU steps (models/int4.py, --quantization int4): the packing
recovers a 4-bit GGUF's weights, and the model uses them only for steps of few rows."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
import torch

from services.engine_core.model_config import ModelConfig
from services.engine_core.models import build_model, int4
from services.engine_core.models.int4 import GROUP, MAX_ROWS, MAX_ROWS_AMX, Int4Weight
from services.engine_core.weight_loader import load_model
from shared.config import EngineConfig
from shared.model_files import resolve_model
from tests.engine_core.test_models import paged_logits, prefill_logits

CPU = torch.device("cpu")


def q4_1_matrix(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix as llama.cpp's Q4_1 stores it (w = d * q + m per group of 32, d and m in fp16,
    each group's min at q = 0 and max at q = 15), and each weight's d."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // GROUP, GROUP), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(n, k // GROUP, 1, generator=gen) * 0.02 + 1e-3).half().float()
    m = (-torch.rand(n, k // GROUP, 1, generator=gen) * 0.1).half().float()
    return (q * d + m).view(n, k), d.expand(-1, -1, GROUP).reshape(n, k)


def test_quantize_recovers_q4_1_weights() -> None:
    w, d = q4_1_matrix(64, 192)
    packed = Int4Weight.quantize(w)
    # The bf16 rounding of each group's scale and offset moves a weight by well under a step;
    # dequantize() itself returns bf16 values (the kernel's output), rounded by |w| * 2**-9.
    err = (packed.dequantize() - w).abs() - w.abs() * 2**-9
    assert (err / d).max() < 0.25
    x = torch.randn(5, 192)
    ref = x @ w.t()
    assert ((packed(x) - ref).norm() / ref.norm()) < 5e-3
    assert packed(x).dtype == torch.float32 and packed(x.bfloat16()).dtype == torch.bfloat16


def test_quantize_any_matrix_within_half_a_step() -> None:
    w = torch.randn(32, 64) * 0.05
    groups = w.view(32, 2, GROUP)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15)[..., None].expand(-1, -1, GROUP).reshape(32, 64)
    err = (Int4Weight.quantize(w).dequantize() - w).abs() - w.abs() * 2**-9  # bf16 output, as above
    assert (err / step).max() < 0.55


@pytest.mark.parametrize("shape", [(24, 64), (32, 48)])
def test_unsupported_shapes_are_refused(shape: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="int4 needs"):
        Int4Weight.quantize(torch.randn(shape))


@pytest.fixture(scope="module")
def smollm2_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The bundled model (Q4_1 layer weights) with int4 copies, and with dense weights only."""
    auto, _ = load_model(EngineConfig(), CPU, torch.float32)  # quantization auto: int4 for Q4_1
    dense, _ = load_model(EngineConfig(quantization="none"), CPU, torch.float32)
    return auto, dense


def test_int4_copies_of_the_4bit_gguf(smollm2_pair) -> None:
    auto, dense = smollm2_pair
    assert all(layer.int4_max_rows == MAX_ROWS for layer in auto.layers)
    assert all(layer.int4_max_rows == 0 and layer.int4 is None for layer in dense.layers)
    # The dense weights stay: large steps use them.
    for (name, p), (_, q) in zip(auto.state_dict().items(), dense.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


@pytest.fixture
def int4_layers_only(smollm2_pair) -> Iterator[tuple[torch.nn.Module, torch.nn.Module]]:
    """The pair with the int4 model's int8 LM head set aside: the int4 layers' error alone (the
    head's own is bounded in test_int8.py)."""
    auto, dense = smollm2_pair
    head, auto.lm_head_quantized = auto.lm_head_quantized, None
    yield auto, dense
    auto.lm_head_quantized = head


def test_small_steps_use_int4_and_large_ones_dense(int4_layers_only) -> None:
    auto, dense = int4_layers_only
    gen = torch.Generator().manual_seed(0)
    small = torch.randint(0, 49152, (MAX_ROWS,), generator=gen).tolist()
    ours, ref = prefill_logits(auto, small), prefill_logits(dense, small)
    assert not torch.equal(ours, ref)
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err < 0.05, err
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8
    large = torch.randint(0, 49152, (MAX_ROWS + 1,), generator=gen).tolist()
    assert torch.equal(prefill_logits(auto, large), prefill_logits(dense, large))


def test_decode_steps_follow_the_dense_model(int4_layers_only) -> None:
    """A prompt prefilled in one large step, then single-token decode steps (int4)."""
    auto, dense = int4_layers_only
    seq = torch.randint(0, 49152, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    schedule = [[32]] + [[1]] * 8
    ours, ref = paged_logits(auto, [seq], schedule)[0], paged_logits(dense, [seq], schedule)[0]
    assert torch.equal(ours[:32], ref[:32])
    err = ((ours[32:] - ref[32:]).abs().max() / ref[32:].abs().max()).item()
    assert err < 0.05, err


def test_int4_for_any_checkpoint(caplog) -> None:
    cfg = ModelConfig.from_hf_config(resolve_model("tiny-llama").hf_config())
    model, _ = load_model(EngineConfig(model="tiny-llama", quantization="int4"), CPU, torch.float32)
    ok = all(s % 16 == 0 for s in (cfg.hidden_size, cfg.intermediate_size)) and cfg.hidden_size % GROUP == 0
    assert ok and model.layers[0].int4_max_rows == MAX_ROWS
    assert any("lossy" in r.message for r in caplog.records)  # random weights are not 4-bit


def test_quantize_skips_shapes_the_kernel_cannot_pack() -> None:
    cfg = ModelConfig.from_hf_config(resolve_model("tiny-llama").hf_config())
    odd = build_model(
        ModelConfig(**{**cfg.__dict__, "hidden_size": 48, "num_heads": 3, "num_kv_heads": 1, "head_dim": 16})
    )
    assert odd.quantize_int4() is False
    assert odd.layers[0].int4_max_rows == 0


def test_bad_quantization_settings() -> None:
    with pytest.raises(ValueError, match="unknown quantization"):
        load_model(EngineConfig(quantization="awq"), CPU, torch.float32)
    with pytest.raises(ValueError, match="CPU only"):
        load_model(EngineConfig(quantization="int4"), torch.device("cuda"), torch.bfloat16)


def test_gguf_cache_remembers_the_weight_types(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO)
    config = EngineConfig(cache_dir=str(tmp_path), quantization="int4")
    first, _ = load_model(config, CPU, torch.float32)  # converts and writes the cache
    cached, _ = load_model(config, CPU, torch.float32)
    assert first.layers[0].int4_max_rows == cached.layers[0].int4_max_rows == MAX_ROWS
    assert [r.message for r in caplog.records if "int4" in r.message] == [
        f"int4 copies of the layers' Q4_1 weights for steps of up to {MAX_ROWS} rows"
    ] * 2


def test_int4_copies_are_cached_per_file_and_dtype(tmp_path, caplog) -> None:
    config = EngineConfig(cache_dir=str(tmp_path))  # quantization auto: int4 for this Q4_1 file
    first, _ = load_model(config, CPU, torch.float32)  # packs and writes the int4 cache
    (int4_cache,) = [n for n in os.listdir(tmp_path) if n.endswith("-int4.safetensors")]
    cached, _ = load_model(config, CPU, torch.float32)
    for a, b in zip(first.layers, cached.layers, strict=True):
        assert a.int4 is not None and b.int4 is not None and b.int4_max_rows == MAX_ROWS
        for x, y in zip(a.int4, b.int4, strict=True):
            assert torch.equal(x.packed, y.packed) and torch.equal(x.scales_zeros, y.scales_zeros)
    # Packed from bf16 dense weights, the copies differ: a cache of their own.
    load_model(config, CPU, torch.bfloat16)
    assert len([n for n in os.listdir(tmp_path) if n.endswith("-int4.safetensors")]) == 2
    # A damaged cache is repacked (and rewritten), never trusted.
    with open(tmp_path / int4_cache, "wb") as f:
        f.write(b"not safetensors")
    repacked, _ = load_model(config, CPU, torch.float32)
    assert any("ignoring unreadable int4 cache" in r.message for r in caplog.records)
    assert torch.equal(repacked.layers[3].int4.down.packed, first.layers[3].int4.down.packed)
    assert os.path.getsize(tmp_path / int4_cache) > 1000


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_int4_layers_compute_with_their_dequantized_weights(name: str) -> None:
    """The int4 path of every architecture (q/k/v bias, q/k norms) equals the dense path run on
    the weights the int4 copies hold, up to the bf16 activations and outputs of the kernel."""
    quantized, _ = load_model(EngineConfig(model=name, quantization="int4"), CPU, torch.float32)
    dense, _ = load_model(EngineConfig(model=name), CPU, torch.float32)
    with torch.no_grad():
        for q, d in zip(quantized.layers, dense.layers, strict=True):
            for attr in ("qkv", "o", "gate_up", "down"):
                getattr(d, f"{attr}_weight").copy_(getattr(q.int4, attr).dequantize())
            if q.qkv_bias is not None:  # random init zeroes biases, which would hide a dropped one
                bias = torch.randn(q.qkv_bias.shape, generator=torch.Generator().manual_seed(3)) * 0.5
                q.qkv_bias.copy_(bias)
                d.qkv_bias.copy_(bias)
    seq = torch.randint(0, quantized.cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    ours, ref = prefill_logits(quantized, seq), prefill_logits(dense, seq)
    assert ((ours - ref).norm() / ref.norm()).item() < 2e-2


def test_int4_lm_head_for_small_steps_only() -> None:
    model, _ = load_model(EngineConfig(model="tiny-llama", quantization="int4", int4_lm_head=True), CPU, torch.float32)
    dense, _ = load_model(EngineConfig(model="tiny-llama"), CPU, torch.float32)
    assert isinstance(model.lm_head_quantized, Int4Weight) and dense.lm_head_quantized is None
    hidden = torch.randn(MAX_ROWS + 1, model.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    small, ref = model.compute_logits(hidden[:MAX_ROWS]), dense.compute_logits(hidden[:MAX_ROWS])
    assert not torch.equal(small, ref)
    err = ((small - ref).abs().max() / ref.abs().max()).item()
    assert err < 0.05, err
    assert torch.equal(model.compute_logits(hidden), dense.compute_logits(hidden))  # a large step: dense


def test_int4_lm_head_needs_int4() -> None:
    with pytest.raises(ValueError, match="needs int4 quantization"):
        load_model(EngineConfig(model="tiny-llama", int4_lm_head=True), CPU, torch.float32)


def test_int4_in_a_bfloat16_model() -> None:
    """int4 for small steps over bf16 dense weights (AMX for large steps): the int4 kernel gets
    contiguous rows even where the bf16 cast is a no-op on a view (the gate half of gate|up)."""
    model, _ = load_model(EngineConfig(model="tiny-llama", quantization="int4"), CPU, torch.bfloat16)
    dense, _ = load_model(EngineConfig(model="tiny-llama"), CPU, torch.bfloat16)
    with torch.no_grad():  # the dense model multiplies by exactly what the int4 copies hold
        for q, d in zip(model.layers, dense.layers, strict=True):
            for attr in ("qkv", "o", "gate_up", "down"):
                getattr(d, f"{attr}_weight").copy_(getattr(q.int4, attr).dequantize())
    rows = model.layers[0].int4_max_rows
    assert rows == int4.max_rows(torch.bfloat16)
    seq = torch.randint(0, 512, (rows,), generator=torch.Generator().manual_seed(2)).tolist()
    ours, ref = prefill_logits(model, seq), prefill_logits(dense, seq)
    assert ((ours - ref).norm() / ref.norm()).item() < 3e-2


def test_int4_cutoff_by_the_dense_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps past int4.max_rows rows multiply by the dense weights: 8 rows over bf16 on AMX,
    where dense bf16 is fast, 16 over float32 or bf16 without AMX (measured crossovers)."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert int4.max_rows(torch.bfloat16) == MAX_ROWS_AMX == 8
    assert int4.max_rows(torch.float32) == MAX_ROWS == 16
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # oneDNN capped below AMX
    assert int4.max_rows(torch.bfloat16) == MAX_ROWS
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert int4.max_rows(torch.bfloat16) == MAX_ROWS_AMX
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert int4.max_rows(torch.bfloat16) == MAX_ROWS


def test_bfloat16_model_switches_to_dense_past_its_cutoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    model, _ = load_model(EngineConfig(model="tiny-llama", quantization="int4"), CPU, torch.bfloat16)
    layer = model.layers[0]
    assert layer.int4_max_rows == MAX_ROWS_AMX
    assert layer.int4_for(MAX_ROWS_AMX) is layer.int4 and layer.int4_for(MAX_ROWS_AMX + 1) is None


def test_fused_step_cutoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused CPU step's own int4 kernel serves up to FUSED_MAX_REQUESTS decoding requests
    without AMX (it beats the dense matmul there), AMX's cut-off with it."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert int4.fused_max_requests(torch.bfloat16) == MAX_ROWS_AMX
    assert int4.fused_max_requests(torch.float32) == int4.FUSED_MAX_REQUESTS == 64
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert int4.fused_max_requests(torch.bfloat16) == int4.FUSED_MAX_REQUESTS


def test_fused_prefill_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused step's prefill rows take the int4 copies without AMX (its kernel beats dense
    there at hundreds of rows too), the dense weights with it."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert not int4.fused_prefill_int4(torch.bfloat16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert int4.fused_prefill_int4(torch.bfloat16)
