"""The int8 weight-only LM head that int4 steps multiply by (models/int8.py)."""

from __future__ import annotations

import pytest
import torch

from services.engine_core.models.int4 import MAX_ROWS
from services.engine_core.models.int8 import Int8Weight
from services.engine_core.weight_loader import load_model
from shared.config import EngineConfig

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_is_the_dequantized_matrix(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(80, 64, generator=g).to(dtype)
    q = Int8Weight.quantize(weight)
    assert q.values.dtype == torch.int8 and q.scales.dtype == dtype
    # Rounding to the nearest of 255 levels per row: at most half a step off (plus, in bf16, the
    # scale's own rounding: at most 127 x 2^-9 of a step).
    step = weight.float().abs().amax(1, keepdim=True) / 127
    slack = 0.5 if dtype == torch.float32 else 0.75
    assert ((q.dequantize() - weight.float()).abs() <= slack * step + 1e-6).all()
    x = torch.randn(3, 64, generator=g).to(dtype)
    out = q(x)
    assert out.dtype == dtype and out.shape == (3, 80)
    ref = x.float() @ q.dequantize().t()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert ((out.float() - ref).norm() / ref.norm()).item() < tol


def test_zero_row_stays_finite() -> None:
    weight = torch.zeros(16, 32)
    weight[1] = 1.0
    q = Int8Weight.quantize(weight)
    assert torch.isfinite(q.scales).all()
    assert torch.equal(q(torch.ones(1, 32))[0, 0], torch.tensor(0.0))


def test_int4_mode_gets_an_int8_head_for_small_steps_only() -> None:
    model, _ = load_model(EngineConfig(model="tiny-llama", quantization="int4"), CPU, torch.float32)
    dense, _ = load_model(EngineConfig(model="tiny-llama"), CPU, torch.float32)
    assert isinstance(model.lm_head_quantized, Int8Weight) and dense.lm_head_quantized is None
    hidden = torch.randn(MAX_ROWS + 1, model.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    small, ref = model.compute_logits(hidden[:MAX_ROWS]), dense.compute_logits(hidden[:MAX_ROWS])
    assert small.dtype == torch.float32
    assert ((small - ref).norm() / ref.norm()).item() < 1e-2
    assert torch.equal(model.compute_logits(hidden), dense.compute_logits(hidden))  # a large step: dense
