"""The fused int4 matmul's exact numbers in torch (csrc/int4_matmul.h, csrc/quantize_rows.h): the
int8 quantization of the activations and the per-group fp32 fmas, each correctly rounded, so a
kernel of any instruction set can be checked against it bit for bit (and so against the others)."""

from __future__ import annotations

import torch
from torch import Tensor

from services.engine_core.models.int4 import GROUP


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x [M, K] bf16 -> (xq int8 [M, K], d, c, s fp32 [M, K / 32]): per row and 32-block
    d = max|x| / 127, xq = round-half-even(x * (1 / d)) (0 where d < FLT_MIN), s = d * sum xq,
    c = -8 * s."""
    m, k = x.shape
    blocks = x.float().view(m, k // GROUP, GROUP)
    d = blocks.abs().amax(-1) / 127
    inv = torch.where(d >= torch.finfo(torch.float32).tiny, 1 / d, torch.zeros_like(d))
    xq = (blocks * inv[..., None]).round().clamp(-127, 127)
    s = d * xq.sum(-1)
    return xq.to(torch.int8).view(m, k), d, -8 * s, s


def fma32(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """fp32 fma(a, b, c), correctly rounded, for fp32 a, b whose product is exact in fp64 (here:
    at most 24 + 24 significant bits). The sum is rounded in fp64 and its error kept (TwoSum);
    rounding that fp64 sum to fp32 is then wrong only where it lies exactly halfway between two
    fp32 values and the error says on which side the exact sum is."""
    p, c64 = a.double() * b.double(), c.double()
    t = p + c64
    bp = t - c64
    e = (p - bp) + (c64 - (t - bp))
    r = t.float()
    other = torch.nextafter(r, torch.where(e > 0, torch.inf, -torch.inf).float())
    halfway = (r.double() + other.double()) / 2 == t
    return torch.where((e != 0) & halfway, other, r)


def dot_products(xq: Tensor, q: Tensor) -> Tensor:
    """[M, N, G] int32 sums of q (0..15) [N, K] times xq [M, K] per 32-input group (exact in fp64:
    at most 32 * 15 * 127)."""
    m, k = xq.shape
    n = q.shape[0]
    x = xq.double().view(m, 1, k // GROUP, GROUP)
    w = q.double().view(1, n, k // GROUP, GROUP)
    return (x * w).sum(-1).to(torch.int32)


def int4_matmul(x: Tensor, q: Tensor, scales_zeros: Tensor) -> Tensor:
    """x [M, K] bf16 @ W.T -> [M, N] bf16, W = (q - 8) * scale + zero (q uint8 [N, K],
    scales_zeros bf16 [K / 32, 2, N]), as the kernel computes it: int4_matmul_fp32, rounded."""
    return int4_matmul_fp32(x, q, scales_zeros).to(torch.bfloat16)


def int4_matmul_fp32(x: Tensor, q: Tensor, scales_zeros: Tensor) -> Tensor:
    """The kernel's fp32 accumulators [M, N]: from acc = 0, per group in order,
    u = fma(dot, d, c); acc = fma(u, scale, acc); acc = fma(zero, s, acc)."""
    xq, d, c, s = quantize_rows(x)
    dot = dot_products(xq, q).float()
    sz = scales_zeros.float()
    acc = torch.zeros(x.shape[0], q.shape[0])
    for g in range(dot.shape[2]):
        u = fma32(dot[..., g], d[:, g : g + 1], c[:, g : g + 1])
        acc = fma32(u, sz[g, 0][None], acc)
        acc = fma32(sz[g, 1][None], s[:, g : g + 1], acc)
    return acc


def dequantized_rows(x: Tensor) -> Tensor:
    """x as the kernel multiplies it: d * xq, fp64 [M, K]."""
    xq, d, _, _ = quantize_rows(x)
    m, k = x.shape
    return (xq.double().view(m, k // GROUP, GROUP) * d.double()[..., None]).view(m, k)
