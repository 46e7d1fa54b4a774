"""The fused step's int4 matmul (csrc/int4_matmul.h: int4 weights x int8 activations) and its
repacking (fused_cpu/int4_matmul.py): the same q, scales and zeros as models/int4.py's weights;
the activations' quantization and the products bit for bit those of the torch reference
(int4_reference.py: the same on every instruction set), which is fp64's (d xq) @ W rounded to
bf16. Row invariance: test_row_invariance.py."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from services.engine_core.fused_cpu.int4_matmul import pack, repack, unpack_q
from services.engine_core.models.int4 import GROUP, Int4Weight
from tests.engine_core.fused_cpu import int4_reference

BF16 = torch.bfloat16
SHAPES = [(960, 576), (576, 1536), (80, 64), (208, 96), (16, 32)]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def activations(rows: int, in_features: int, seed: int = 1) -> torch.Tensor:
    """bf16 rows like a layer's input: a few large channels (as hidden states have), and an
    all-zero row (d = 0) where there are several."""
    x = randn(rows, in_features, seed=seed)
    x[:, torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))[:4]] *= 20
    if rows > 2:
        x[2] = 0
    return x.to(BF16)


def q_of(weight: torch.Tensor) -> torch.Tensor:
    """Int4Weight.quantize's q for weight, recomputed."""
    n, k = weight.shape
    groups = weight.float().view(n, k // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    return ((groups - low[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.uint8).view(n, k)


@pytest.mark.parametrize("out_features, in_features", SHAPES)
def test_unpack_q_recovers_the_quantized_values(out_features: int, in_features: int) -> None:
    weight = randn(out_features, in_features)
    assert torch.equal(unpack_q(Int4Weight.quantize(weight)), q_of(weight))


@pytest.mark.parametrize("out_features, in_features", SHAPES)
def test_repacked_layout(out_features: int, in_features: int) -> None:
    """The layout pack() and csrc/int4_layout.h document: column n's q of input k in line
    (n // 16, k // 8), byte 4 (n % 16) + k % 4, low nibble for k % 8 < 4, else high."""
    weight = Int4Weight.quantize(randn(out_features, in_features))
    packed, scales_zeros = repack(weight)
    q = unpack_q(weight)
    assert torch.equal(packed, pack(q))
    assert packed.shape == (out_features // 16, in_features // 8, 64) and packed.dtype == torch.uint8
    assert scales_zeros.shape == (in_features // GROUP, 2, out_features)
    for n in (0, min(17, out_features - 1), out_features - 1):
        k = torch.arange(in_features)
        byte = packed[n // 16, k // 8, 4 * (n % 16) + k % 4]
        assert torch.equal(torch.where(k % 8 < 4, byte & 15, byte >> 4), q[n])
    assert torch.equal(scales_zeros[:, 0], weight.scales_zeros[..., 0])
    assert torch.equal(scales_zeros[:, 1], weight.scales_zeros[..., 1])


def test_pack_needs_whole_vectors() -> None:
    with pytest.raises(ValueError, match="out % 16"):
        pack(torch.zeros(40, 64, dtype=torch.uint8))


@pytest.mark.parametrize("rows, in_features", [(1, 32), (5, 96), (17, 576), (3, 1536)])
def test_quantize_rows_equals_reference(ext: ModuleType, rows: int, in_features: int) -> None:
    """The int8 activations (and their scales and sums) bit for bit the reference's."""
    x = activations(rows, in_features)
    for ours, ref in zip(ext.quantize_rows(x), int4_reference.quantize_rows(x), strict=True):
        assert ours.dtype == ref.dtype and torch.equal(ours, ref)


def test_quantize_rows_rounds_half_to_even(ext: ModuleType) -> None:
    """A block whose max is 127 has d = 1: x.5 values round to the even integer, as q8_0's."""
    x = torch.zeros(1, 32)
    x[0, :6] = torch.tensor([127.0, 2.5, -3.5, 0.5, -0.5, 1.5])
    q, d, c, s = ext.quantize_rows(x.to(BF16))
    assert q[0, :6].tolist() == [127, 2, -4, 0, 0, 2] and d.item() == 1.0
    assert s.item() == 127.0 and c.item() == -8 * 127.0


def test_quantize_rows_tiny_blocks_are_zero(ext: ModuleType) -> None:
    """A block whose scale would be subnormal (its reciprocal inf) quantizes to zeros, as an
    all-zero block does, whatever the instruction set (test_int4_isa.py compares them)."""
    x = torch.zeros(1, 96)
    x[0, :3] = torch.tensor([1e-38, -3e-39, 0.0])  # block 0: tiny; block 1: zeros; block 2: normal
    x[0, 64:67] = torch.tensor([1.0, -0.5, 0.25])
    q, d, c, s = ext.quantize_rows(x.to(BF16))
    assert not q[0, :64].any() and q[0, 64:67].tolist() == [127, -64, 32]
    assert c[0, :2].tolist() == [0.0, 0.0] and s[0, :2].tolist() == [0.0, 0.0]
    for ours, ref in zip((q, d, c, s), int4_reference.quantize_rows(x.to(BF16)), strict=True):
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("out_features, in_features", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 72])
def test_int4_matmul_equals_reference(ext: ModuleType, out_features: int, in_features: int, rows: int) -> None:
    """Bit for bit the reference's per-group fp32 fmas; those within ~1e-6 of a row's rms of
    fp64's (d xq) @ W (the kernel's only error besides the activations' int8 rounding and the
    output's bf16 rounding is its fp32 accumulation's)."""
    weight = Int4Weight.quantize((0.05 * randn(out_features, in_features)).to(BF16))
    packed, scales_zeros = repack(weight)
    x = activations(rows, in_features)
    ours = ext.int4_matmul(x, packed, scales_zeros)
    assert ours.dtype == BF16 and ours.shape == (rows, out_features)
    fp32 = int4_reference.int4_matmul_fp32(x, unpack_q(weight), scales_zeros)
    assert torch.equal(ours, fp32.to(BF16))
    sz = scales_zeros.double().repeat_interleave(GROUP, 0)  # [K, 2, N]
    w = (unpack_q(weight).double() - 8) * sz[:, 0].T + sz[:, 1].T
    exact = int4_reference.dequantized_rows(x) @ w.T
    rms = exact.pow(2).mean(1, keepdim=True).sqrt()
    assert ((fp32.double() - exact).abs() <= 1e-5 * rms).all()
    # bf16 rounding to nearest: at most 2^-8 of the value.
    assert ((ours.double() - exact).abs() <= 2.0**-8 * exact.abs() + 1e-5 * rms).all()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("out_features", [16, 48, 80])
def test_int4_matmul_partial_units(ext: ModuleType, out_features: int, threads: int) -> None:
    """N not a multiple of a unit's columns (64 on AVX-512): column n's bits are those it gets in a
    wider matrix, at every row blocking (1..20, 33 and 80 rows) and 1 and 2 threads."""
    in_features, wide = 96, 144
    q = torch.randint(0, 16, (wide, in_features), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    scales_zeros = (0.05 * randn(in_features // GROUP, 2, wide, seed=3)).to(BF16)
    x = activations(80, in_features)
    narrow = pack(q[:out_features]), scales_zeros[..., :out_features].contiguous()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        full = ext.int4_matmul(x, pack(q), scales_zeros)
        assert torch.equal(full, int4_reference.int4_matmul(x, q, scales_zeros))
        for rows in [*range(1, 21), 33, 80]:
            assert torch.equal(ext.int4_matmul(x[:rows].contiguous(), *narrow), full[:rows, :out_features]), rows
    finally:
        torch.set_num_threads(before)


def test_int4_matmul_rejects_mismatched_shapes(ext: ModuleType) -> None:
    packed, scales_zeros = repack(Int4Weight.quantize(randn(64, 64)))
    with pytest.raises(RuntimeError, match="disagree"):
        ext.int4_matmul(randn(2, 96).to(BF16), packed, scales_zeros)
    with pytest.raises(RuntimeError, match="bf16"):
        ext.int4_matmul(randn(2, 64), packed, scales_zeros)
    with pytest.raises(RuntimeError, match="uint8"):
        ext.int4_matmul(randn(2, 64).to(BF16), packed.view(4, 16, 32), scales_zeros)
