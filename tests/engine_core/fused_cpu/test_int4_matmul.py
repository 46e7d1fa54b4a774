"""The fused step's int4 matmul (csrc/int4_matmul.h) and its repacking (fused_cpu/int4_matmul.py):
the same q, scales and zeros as models/int4.py's weights, and products equal to torch's int4
kernel's (bit for bit on AVX-512, where both compute fma(x, fma(q - 8, scale, zero), acc) in k
order; close elsewhere). Row invariance: test_row_invariance.py."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from services.engine_core.fused_cpu.int4_matmul import pack, repack, unpack_q
from services.engine_core.models.int4 import GROUP, Int4Weight

BF16 = torch.bfloat16
SHAPES = [(960, 576), (576, 1536), (80, 64), (16, 32)]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def avx512() -> bool:
    """Whether the kernels were built with AVX-512 (-march=native on this CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512f" in f.read()
    except OSError:
        return False


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
    """Whether it shares torch's bytes or unpacks and packs again, the layout pack() documents."""
    weight = Int4Weight.quantize(randn(out_features, in_features))
    packed, scales_zeros = repack(weight)
    q = unpack_q(weight)
    assert torch.equal(packed, pack(q))
    blocks = -(-out_features // 64)
    assert packed.shape == (blocks, in_features, 32) and packed.dtype == torch.uint8
    assert scales_zeros.shape == (in_features // GROUP, 2, out_features)
    c = out_features - 1  # the last column: block c // 64, byte c % 32, high nibble if c % 64 >= 32
    nibble = packed[c // 64, :, c % 32] >> 4 if c % 64 >= 32 else packed[c // 64, :, c % 32] & 15
    assert torch.equal(nibble, q[c])
    assert torch.equal(scales_zeros[:, 0], weight.scales_zeros[..., 0])


@pytest.mark.parametrize("out_features, in_features", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 72])
def test_int4_matmul_equals_torch_int4_kernel(ext: ModuleType, out_features: int, in_features: int, rows: int) -> None:
    weight = Int4Weight.quantize((0.05 * randn(out_features, in_features)).to(BF16))
    x = randn(rows, in_features, seed=1).to(BF16)
    ours = ext.int4_matmul(x, *repack(weight))
    torch_out = weight(x)
    assert ours.dtype == BF16 and ours.shape == (rows, out_features)
    if avx512():
        assert torch.equal(ours, torch_out)
    else:
        torch.testing.assert_close(ours, torch_out, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("out_features", [8, 20, 100])
def test_int4_matmul_partial_columns(ext: ModuleType, out_features: int, threads: int) -> None:
    """N not a multiple of a strip (64) or of a vector (16 columns on AVX-512, 8 on AVX2): column
    n's bits are those it gets in a wider matrix (where nothing is masked), at every row blocking
    of each instruction set's kernel (1..20, 33 and 80 rows) and 1 and 2 threads."""
    in_features, wide = 96, 144
    q = torch.randint(0, 16, (wide, in_features), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    scales_zeros = (0.05 * randn(in_features // GROUP, 2, wide, seed=3)).to(BF16)
    x = randn(80, in_features, seed=1).to(BF16)
    w = (q.double() - 8) * scales_zeros[:, 0].double().repeat_interleave(GROUP, 0).T
    w += scales_zeros[:, 1].double().repeat_interleave(GROUP, 0).T
    narrow = pack(q[:out_features]), scales_zeros[..., :out_features].contiguous()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        full = ext.int4_matmul(x, pack(q), scales_zeros)
        torch.testing.assert_close(full.double(), x.double() @ w.T, atol=2e-2, rtol=1e-2)
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
