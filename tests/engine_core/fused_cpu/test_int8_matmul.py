"""The fused extension's int8 matmul (csrc/int8_matmul.h), the int8 LM head's kernel where oneDNN's
int8 matmul is inexact (models/int8.py): the dequantized matrix's product in fp32, and every row
its lone bits whatever the other rows, their number, the row blocking or the thread count (a
draft verified in a step must get its lone decode's logits)."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from services.engine_core.models import int8
from services.engine_core.models.int8 import Int8Weight
from tests.engine_core.fused_cpu.lane_dot import lane_dot

BF16 = torch.bfloat16
# SmolLM2's head, a tiny one, and odd ones: N not a multiple of any unit's columns (8, 4, 2), K
# not a multiple of the 8 lanes (a tail of inputs) or shorter than them.
SHAPES = [(49152, 576), (80, 64), (4099, 67), (13, 5), (7, 576), (1, 9)]
# One row (a decode), 2-3 (their own blocking), 4 and up in blocks of up to 6, many blocks.
ROWS = [*range(1, 21), 33, 128]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def head(out_features: int, in_features: int) -> Int8Weight:
    return Int8Weight.quantize(randn(out_features, in_features))


@pytest.mark.parametrize("out_features, in_features", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_the_dequantized_matrix_in_fp32(
    ext: ModuleType, out_features: int, in_features: int, dtype: torch.dtype
) -> None:
    """Within fp32 rounding of the float64 product of the same activations (bf16 converted exactly)
    and the dequantized weights: unlike oneDNN's int8 x int8 path the activations are not quantized."""
    q = head(out_features, in_features)
    for rows in (1, 3, 9):
        x = randn(rows, in_features, seed=rows).to(dtype)
        out = ext.int8_matmul(x, q.values, q.scales)
        assert out.dtype == torch.float32 and out.shape == (rows, out_features)
        want = x.double() @ (q.values.double() * q.scales.double()[:, None]).t()
        # Each product passes through at most K / 8 fmas of its lane, 3 adds, 7 tail fmas and the
        # scaling, each rounding by at most 2^-24 of what it has summed.
        magnitude = x.double().abs() @ (q.values.double().abs() * q.scales.double()[:, None]).t()
        bound = magnitude * (in_features // 8 + 11) * 2.0**-24 * 1.01
        assert ((out.double() - want).abs() <= bound).all()


def reference(x: torch.Tensor, q: Int8Weight) -> torch.Tensor:
    """The header's definition of every element, step by step in numpy."""
    xs, w, scale = x.float().numpy(), q.values.float().numpy(), q.scales.numpy()
    return torch.from_numpy(lane_dot(xs, w) * scale[None, :])


@pytest.mark.parametrize("out_features, in_features", [(80, 64), (13, 67), (7, 5)])
def test_every_element_is_the_documented_sequence(ext: ModuleType, out_features: int, in_features: int) -> None:
    """Bit for bit the fixed sequence of fp32 operations int8_matmul.h defines (what makes it the
    same on every path, blocking and thread count), at each row blocking."""
    q = head(out_features, in_features)
    for rows in (1, 2, 3, 9):
        x = randn(rows, in_features, seed=5 + rows).to(BF16)
        assert torch.equal(ext.int8_matmul(x, q.values, q.scales), reference(x, q)), rows


@pytest.mark.parametrize("out_features, in_features", SHAPES)
def test_bf16_rows_are_their_fp32_values(ext: ModuleType, out_features: int, in_features: int) -> None:
    q = head(out_features, in_features)
    x = randn(5, in_features, seed=1).to(BF16)
    assert torch.equal(ext.int8_matmul(x, q.values, q.scales), ext.int8_matmul(x.float(), q.values, q.scales))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("out_features, in_features", [(4099, 576), (80, 67), (13, 5)])
def test_a_row_is_its_lone_bits(ext: ModuleType, out_features: int, in_features: int, threads: int) -> None:
    """1..20, 33 and 128 rows (every row blocking: one row, two or three, blocks of up to six),
    each a prefix and a suffix of 128 rows: each row's bits are those it gets alone, at 1 and 2
    threads alike."""
    q = head(out_features, in_features)
    x = randn(128, in_features, seed=2).to(BF16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lone = torch.cat([ext.int8_matmul(x[i : i + 1], q.values, q.scales) for i in range(128)])
        for rows in ROWS:
            assert torch.equal(ext.int8_matmul(x[:rows], q.values, q.scales), lone[:rows]), rows
            assert torch.equal(ext.int8_matmul(x[-rows:], q.values, q.scales), lone[-rows:]), rows
    finally:
        torch.set_num_threads(before)
    assert torch.equal(ext.int8_matmul(x, q.values, q.scales), lone), "another thread count, other bits"


def test_the_lm_head_shape_across_threads(ext: ModuleType) -> None:
    """SmolLM2's head at 1 and 9 rows (a decode, a 1 + 8 verify): the same bits at 1 and 2 threads."""
    q = head(49152, 576)
    x = randn(9, 576, seed=3).to(BF16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [ext.int8_matmul(x[:1], q.values, q.scales), ext.int8_matmul(x, q.values, q.scales)]
        torch.set_num_threads(2)
        two = [ext.int8_matmul(x[:1], q.values, q.scales), ext.int8_matmul(x, q.values, q.scales)]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert torch.equal(one[1][:1], one[0])


def test_zero_rows_and_columns(ext: ModuleType) -> None:
    weight = torch.zeros(16, 32)
    weight[1] = 1.0
    q = Int8Weight.quantize(weight)
    out = ext.int8_matmul(torch.cat((torch.ones(1, 32), torch.zeros(1, 32))), q.values, q.scales)
    assert torch.isfinite(out).all() and out[0, 0] == 0 and out[0, 1] == 32 and not out[1].any()
    assert ext.int8_matmul(torch.zeros(0, 32), q.values, q.scales).shape == (0, 16)


def test_rejects_what_it_cannot_multiply(ext: ModuleType) -> None:
    q = head(16, 32)
    with pytest.raises(RuntimeError, match="disagree on K"):
        ext.int8_matmul(torch.zeros(1, 31), q.values, q.scales)
    with pytest.raises(RuntimeError, match="int8"):
        ext.int8_matmul(torch.zeros(1, 32), q.values.float(), q.scales)
    with pytest.raises(RuntimeError, match="bf16 or fp32"):
        ext.int8_matmul(torch.zeros(1, 32, dtype=torch.float16), q.values, q.scales)


def test_the_head_uses_it_when_given(ext: ModuleType) -> None:
    """Int8Weight.use_kernel (what the engine does where oneDNN's matmul is not used): its logits
    are the kernel's, for activations of any float dtype, up to int8.MAX_ROWS_KERNEL rows."""
    q = head(80, 64)
    if q.uses_onednn:
        with pytest.raises(ValueError, match="oneDNN"):
            q.use_kernel(ext.int8_matmul)
        q._packed = None  # the case under test: a CPU where oneDNN's int8 matmul is not used
    q.use_kernel(ext.int8_matmul)
    assert q.max_rows == int8.MAX_ROWS_KERNEL
    x = randn(3, 64, seed=4)
    assert torch.equal(q(x), ext.int8_matmul(x, q.values, q.scales))
    assert torch.equal(q(x.to(BF16)), ext.int8_matmul(x.to(BF16), q.values, q.scales))
    assert torch.equal(q(x.half()), ext.int8_matmul(x.half().float(), q.values, q.scales))
