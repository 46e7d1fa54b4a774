"""The int4 matrices in the layout of the fused step's own int4 matmul (csrc/int4_matmul.h).

models/int4.py keeps each layer matrix packed for torch's `_weight_int4pack_mm_for_cpu`, whose
kernel unpacks the weights again for every few rows; the fused step's kernel dequantizes each
64-column strip once per call, for all rows, and is row-invariant. This repacks the same q,
scales and zeros (no requantization: the products use exactly the values (q - 8) * scale + zero)
into that kernel's layout at start-up.

torch's packed layout is an implementation detail of its build (its nibble order depends on the
CPU capability it was built for), so it is not assumed: where packing a random probe of the
matrix's shape gives the bytes this layout gives (torch's AVX-512 build, out % 64 == 0), the
model's packed tensor is used as it is (no copy, no start-up cost); else packing probe matrices
whose q spell each position's index in base 16 shows where torch puts every nibble, and q is
unpacked and packed again.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from services.engine_core.models.int4 import GROUP, Int4Weight

BLOCK = 64
"""Output columns per strip (kInt4Block)."""


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
    """q (0..15) [out, in] in csrc/int4_matmul.h's layout, uint8 [ceil(out / 64), in, 32]: byte
    d of (block b, input k) holds column 64b + d in its low nibble and 64b + 32 + d in its high
    one (zero past out)."""
    n, k = q.shape
    blocks = -(-n // BLOCK)
    padded = torch.zeros(blocks * BLOCK, k, dtype=torch.uint8)
    padded[:n] = q
    halves = padded.view(blocks, 2, BLOCK // 2, k)
    return (halves[:, 0] | (halves[:, 1] << 4)).transpose(1, 2).contiguous()


@functools.cache
def _torch_layout_is_ours(n: int, k: int) -> bool:
    """Whether torch packs an [n, k] matrix exactly as pack() does."""
    if n % BLOCK:
        return False
    q = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return packed.numel() == n * k // 2 and torch.equal(packed.view(-1), pack(q.to(torch.uint8)).view(-1))


def repack(weight: Int4Weight) -> tuple[Tensor, Tensor]:
    """(packed uint8 [ceil(out / 64), in, 32] as pack() lays it out, scales_zeros bf16
    [in / 32, 2, out]) for csrc/int4_matmul.h."""
    n, k = weight.scales_zeros.shape[1], weight.scales_zeros.shape[0] * GROUP
    # Where torch's layout is the kernel's, the model's own bytes, shared.
    ours = _torch_layout_is_ours(n, k)
    packed = weight.packed.view(n // BLOCK, k, BLOCK // 2) if ours else pack(unpack_q(weight))
    scales_zeros = weight.scales_zeros.transpose(1, 2).contiguous()  # [in / 32, out, 2] -> [in / 32, 2, out]
    return packed, scales_zeros
