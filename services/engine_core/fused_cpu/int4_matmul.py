"""The int4 matrices in the layout of the fused step's own int4 matmul (csrc/int4_matmul.h).

The fused step multiplies every int4 row (decode and verify alike) by int4 weights and int8
activations: x quantized per row and 32-input block (llama.cpp's q8_1 scheme), then integer dot
products (AVX512-VNNI's vpdpbusd where the CPU has it), so a step's extra rows cost 2.5-3.2x
less than with the fp32-dequantizing kernel before it, for +0.30 % perplexity on SmolLM2's
fused decode rows (docs/benchmarks.md; +0.49 % with every eager int4 row quantized alike, the
prototype's figure: benchmarks/int8_activations/README.md). It reads the weights in its own layout
(csrc/int4_layout.h), so models/int4.py's q, scales and zeros (packed for torch's
`_weight_int4pack_mm_for_cpu`, whose nibble order is an implementation detail of torch's build)
are unpacked and packed again at start-up: the same values (q - 8) * scale + zero, no
requantization.

torch's layout is not assumed: packing probe matrices whose q spell each position's index in
base 16 shows where torch puts every nibble (_source_index).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from services.engine_core.models.int4 import GROUP, Int4Weight

VECTOR = 16
"""Output columns per vector (csrc/int4_layout.h kInt4Vector): out % VECTOR == 0 is required."""
CHUNK = 8
"""Inputs per 64-byte line (kInt4Chunk)."""
LAYOUT_VERSION = 2
"""Bumped whenever pack()'s layout changes (repack_cache.py keys the repacked bytes by it; 1 was
the fp32-dequantizing kernel's [out / 64, in, 32])."""


def _nibbles(packed: Tensor) -> Tensor:
    """A packed uint8 tensor's nibbles, low then high of each byte, flattened (int64)."""
    b = packed.reshape(-1).to(torch.int64)
    return torch.stack((b & 15, b >> 4), dim=1).reshape(-1)


@functools.cache
def _source_index(n: int, k: int) -> Tensor:
    """For each nibble of torch's packed [n, k] matrix, the flat index (row * k + col) of the q it
    holds."""
    index = torch.arange(n * k, dtype=torch.int64)
    source = torch.zeros(n * k, dtype=torch.int64)
    for digit in range((max(n * k - 1, 1).bit_length() + 3) // 4):
        q = ((index >> (4 * digit)) & 15).to(torch.int32).view(n, k)
        source |= _nibbles(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)) << (4 * digit)
    if not torch.equal(source.sort().values, index):
        raise RuntimeError("torch's int4 packing is not a permutation of nibbles; cannot repack")
    return source


def unpack_q(weight: Int4Weight) -> Tensor:
    """The matrix's q (0..15) as uint8 [out, in]."""
    n = weight.scales_zeros.shape[1]
    k = weight.scales_zeros.shape[0] * GROUP
    q = torch.empty(n * k, dtype=torch.uint8)
    q[_source_index(n, k)] = _nibbles(weight.packed).to(torch.uint8)
    return q.view(n, k)


def pack(q: Tensor) -> Tensor:
    """q (0..15) [out, in] in csrc/int4_layout.h's layout, uint8 [out / 16, in / 8, 64]: byte
    4 l + i of (vector v, chunk c) holds q[16 v + l, 8 c + i] in its low nibble and
    q[16 v + l, 8 c + 4 + i] in its high one."""
    n, k = q.shape
    if n % VECTOR or k % CHUNK:
        raise ValueError(f"int4 packing needs out % {VECTOR} == 0 and in % {CHUNK} == 0, got {(n, k)}")
    v = q.to(torch.uint8).view(n // VECTOR, VECTOR, k // CHUNK, 2, CHUNK // 2)  # [vector, lane, chunk, half, i]
    lines = v[:, :, :, 0] | (v[:, :, :, 1] << 4)  # [vector, lane, chunk, i]
    return lines.permute(0, 2, 1, 3).contiguous().view(n // VECTOR, k // CHUNK, 64)


def repack(weight: Int4Weight) -> tuple[Tensor, Tensor]:
    """(packed uint8 [out / 16, in / 8, 64] as pack() lays it out, scales_zeros bf16
    [in / 32, 2, out]) for csrc/int4_matmul.h."""
    packed = pack(unpack_q(weight))
    scales_zeros = weight.scales_zeros.transpose(1, 2).contiguous()  # [in / 32, out, 2] -> [in / 32, 2, out]
    return packed, scales_zeros
