"""The int8 LM head that int4 steps multiply by (models/int8.py)."""

from __future__ import annotations

import pytest
import torch

from services.engine_core.models import int8
from services.engine_core.models.int8 import Int8Weight
from services.engine_core.weight_loader import load_model
from shared.config import EngineConfig

CPU = torch.device("cpu")


def weight_only(q: Int8Weight) -> Int8Weight:
    """The same matrix through the fallback kernel (_weight_int8pack_mm)."""
    q._packed = None
    return q


def test_quantize_rounds_each_row_to_255_levels() -> None:
    weight = torch.randn(80, 64, generator=torch.Generator().manual_seed(0))
    q = Int8Weight.quantize(weight.to(torch.bfloat16))
    assert q.values.dtype == torch.int8 and q.scales.dtype == torch.float32
    step = weight.to(torch.bfloat16).float().abs().amax(1, keepdim=True) / 127
    assert ((q.dequantize() - weight.to(torch.bfloat16).float()).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["onednn", "weight_only"])
def test_matmul_is_the_dequantized_matrix(dtype: torch.dtype, kernel: str) -> None:
    g = torch.Generator().manual_seed(0)
    q = Int8Weight.quantize(torch.randn(80, 64, generator=g))
    if kernel == "weight_only":
        weight_only(q)
    x = torch.randn(3, 64, generator=g).to(dtype)
    out = q(x)
    assert out.dtype == torch.float32 and out.shape == (3, 80)
    ref = x.float() @ q.dequantize().t()
    # onednn quantizes each activation row to 8 bits (about 0.5 % of error), the weight-only
    # kernel rounds activations and scales to bf16.
    tol = 2e-2
    assert ((out - ref).norm() / ref.norm()).item() < tol


def test_a_row_does_not_depend_on_the_others() -> None:
    g = torch.Generator().manual_seed(1)
    q = Int8Weight.quantize(torch.randn(96, 64, generator=g))
    x = torch.randn(5, 64, generator=g)
    x[3] *= 100  # a row with a much larger range must not coarsen the others' quantization
    batch = q(x)
    for i in range(5):
        assert torch.equal(q(x[i : i + 1])[0], batch[i])


def test_onednn_only_where_it_does_not_saturate() -> None:
    """The largest weights times the largest activations: int16 pair sums saturate without VNNI,
    whatever a model's weights, so oneDNN multiplies only where it gets them right (else the
    weight-only kernel, whose bf16 rounding of the activations is exact for ones)."""
    q = Int8Weight(torch.full((8, 64), 127, dtype=torch.int8), torch.ones(8))
    assert torch.equal(q(torch.ones(2, 64)), torch.full((2, 8), 127.0 * 64))


def test_zero_rows_stay_finite() -> None:
    weight = torch.zeros(16, 32)
    weight[1] = 1.0
    q = Int8Weight.quantize(weight)
    assert torch.isfinite(q.scales).all()
    out = q(torch.cat((torch.ones(1, 32), torch.zeros(1, 32))))
    assert torch.isfinite(out).all() and out[0, 0] == 0 and out[0, 1] == 32 and not out[1].any()


def test_int4_mode_gets_an_int8_head_for_small_steps_only() -> None:
    """The head has its own cutoff (int8.MAX_ROWS), far past the layers' int4 one: a step of 8
    requests verifying drafts keeps the int8 head."""
    model, _ = load_model(EngineConfig(model="tiny-llama", quantization="int4"), CPU, torch.float32)
    dense, _ = load_model(EngineConfig(model="tiny-llama"), CPU, torch.float32)
    assert isinstance(model.lm_head_quantized, Int8Weight) and dense.lm_head_quantized is None
    rows = model.lm_head_max_rows
    assert rows == model.lm_head_quantized.max_rows >= model.layers[0].int4_max_rows
    assert rows == int8.MAX_ROWS or model.lm_head_quantized._packed is None  # (the fallback kernel: 16)
    hidden = torch.randn(rows + 1, model.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    small, ref = model.compute_logits(hidden[:rows]), dense.compute_logits(hidden[:rows])
    assert small.dtype == torch.float32
    assert ((small - ref).norm() / ref.norm()).item() < 2e-2
    assert torch.equal(model.compute_logits(hidden), dense.compute_logits(hidden))  # a large step: dense
