"""The fused extension's bf16 matmul (csrc/bf16_matmul.h), a float checkpoint's decode rows and LM
head on a CPU without native bf16 (fused_cpu/decode.py): the product of the bf16 weights in fp32,
and every row its lone bits whatever the other rows, their number, the row blocking or the thread
count (a draft verified in a step must get its lone decode's bits)."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from services.engine_core.fused_cpu.decode import bf16_rows_invariant
from tests.engine_core.fused_cpu.lane_dot import lane_dot

BF16 = torch.bfloat16
# SmolLM2's four layer matrices and head, a tiny one, and odd ones: N not a multiple of any unit's
# columns (8, 4, 2), K not a multiple of the 8 lanes (a tail of inputs) or shorter than them.
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576), (80, 64), (4099, 67), (13, 5), (1, 9)]
# One row (a decode), 2-3 (their own blocking), 4 and up in blocks of up to 6, many blocks.
ROWS = [*range(1, 21), 33, 128]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def weight(out_features: int, in_features: int) -> torch.Tensor:
    return (0.05 * randn(out_features, in_features)).to(BF16)


@pytest.mark.parametrize("out_features, in_features", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_the_product_in_fp32(ext: ModuleType, out_features: int, in_features: int, dtype: torch.dtype) -> None:
    """Within fp32 rounding of the float64 product of the same rows and weights (both exact there)."""
    w = weight(out_features, in_features)
    for rows in (1, 3, 9):
        x = randn(rows, in_features, seed=rows).to(dtype)
        out = ext.bf16_matmul(x, w)
        assert out.dtype == torch.float32 and out.shape == (rows, out_features)
        want = x.double() @ w.double().t()
        # Each product passes through at most K / 8 fmas of its lane, 3 adds and 7 tail fmas, each
        # rounding by at most 2^-24 of what it has summed.
        bound = (x.double().abs() @ w.double().abs().t()) * (in_features // 8 + 10) * 2.0**-24 * 1.01
        assert ((out.double() - want).abs() <= bound).all()


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The header's definition of every element, step by step in numpy."""
    xs, ws = x.float().numpy(), w.float().numpy()
    return torch.from_numpy(lane_dot(xs, ws))


@pytest.mark.parametrize("out_features, in_features", [(80, 64), (13, 67), (7, 5)])
def test_every_element_is_the_documented_sequence(ext: ModuleType, out_features: int, in_features: int) -> None:
    """Bit for bit the fixed sequence of fp32 operations bf16_matmul.h defines (what makes it the
    same on every path, blocking and thread count), at each row blocking; a bf16 product is that
    value rounded once (what a fused step's layer gets)."""
    w = weight(out_features, in_features)
    for rows in (1, 2, 3, 9):
        x = randn(rows, in_features, seed=5 + rows).to(BF16)
        want = reference(x, w)
        assert torch.equal(ext.bf16_matmul(x, w), want), rows
        assert torch.equal(ext.bf16_matmul(x, w, True), want.to(BF16)), rows


@pytest.mark.parametrize("out_features, in_features", [(4099, 67), (13, 5)])
def test_bf16_rows_are_their_fp32_values(ext: ModuleType, out_features: int, in_features: int) -> None:
    w = weight(out_features, in_features)
    x = randn(5, in_features, seed=1).to(BF16)
    assert torch.equal(ext.bf16_matmul(x, w), ext.bf16_matmul(x.float(), w))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("out_features, in_features", [(960, 576), (3072, 576), (576, 1536), (80, 67), (13, 5)])
def test_a_row_is_its_lone_bits(ext: ModuleType, out_features: int, in_features: int, threads: int) -> None:
    """1..20, 33 and 128 rows (every row blocking: one row, two or three, blocks of up to six),
    each a prefix and a suffix of 128 rows: each row's bits are those it gets alone, at 1 and 2
    threads alike, in fp32 and in bf16 out."""
    w = weight(out_features, in_features)
    x = randn(128, in_features, seed=2).to(BF16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lone = torch.cat([ext.bf16_matmul(x[i : i + 1], w) for i in range(128)])
        for rows in ROWS:
            assert torch.equal(ext.bf16_matmul(x[:rows], w), lone[:rows]), rows
            assert torch.equal(ext.bf16_matmul(x[-rows:], w), lone[-rows:]), rows
            assert torch.equal(ext.bf16_matmul(x[:rows], w, True), lone[:rows].to(BF16)), rows
    finally:
        torch.set_num_threads(before)
    assert torch.equal(ext.bf16_matmul(x, w), lone), "another thread count, other bits"


def test_the_lm_head_shape_across_threads(ext: ModuleType) -> None:
    """SmolLM2's head at 1 and 9 rows (a decode, a 1 + 8 verify): the same bits at 1 and 2 threads."""
    w = weight(49152, 576)
    x = randn(9, 576, seed=3).to(BF16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [ext.bf16_matmul(x[:1], w), ext.bf16_matmul(x, w)]
        torch.set_num_threads(2)
        two = [ext.bf16_matmul(x[:1], w), ext.bf16_matmul(x, w)]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert torch.equal(one[1][:1], one[0])


def test_zero_rows_and_columns(ext: ModuleType) -> None:
    w = torch.zeros(16, 32, dtype=BF16)
    w[1] = 1.0
    out = ext.bf16_matmul(torch.cat((torch.ones(1, 32), torch.zeros(1, 32))), w)
    assert torch.isfinite(out).all() and out[0, 0] == 0 and out[0, 1] == 32 and not out[1].any()
    assert ext.bf16_matmul(torch.zeros(0, 32), w).shape == (0, 16)


def test_rejects_what_it_cannot_multiply(ext: ModuleType) -> None:
    w = weight(16, 32)
    with pytest.raises(RuntimeError, match="disagree on K"):
        ext.bf16_matmul(torch.zeros(1, 31), w)
    with pytest.raises(RuntimeError, match="bf16"):
        ext.bf16_matmul(torch.zeros(1, 32), w.float())
    with pytest.raises(RuntimeError, match="bf16 or fp32"):
        ext.bf16_matmul(torch.zeros(1, 32, dtype=torch.float16), w)


def test_the_start_up_check(ext: ModuleType) -> None:
    """decode.bf16_rows_invariant passes the kernel and catches one whose rows depend on the call."""
    weights = [weight(960, 576), weight(80, 67)]
    assert bf16_rows_invariant(ext, weights)

    class RowCountDependent:
        @staticmethod
        def bf16_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            out = ext.bf16_matmul(x, w)
            return out if x.shape[0] < 9 else out * (1 + 2.0**-20)

    assert not bf16_rows_invariant(RowCountDependent, weights)  # type: ignore[arg-type]
