"""Int4 weight-only matmuls for steps of a few rows on a CPU.

A decode step of one or a few requests reads every weight once to do a few multiply-adds
with it, so on a CPU its time is the weights' bytes over memory bandwidth. A 4-bit GGUF
stores the layer matrices as 4-bit values in groups of 32 along the input dimension, with a
scale and an offset per group (Q4_1: w = d*q + m), and torch's CPU kernel
`_weight_int4pack_mm_for_cpu` reads exactly that layout (w = (q - 8) * scale + zero), so the
same weights cost 1/8 of their float32 bytes plus the scales. Re-quantizing the dequantized
Q4_1 values by each group's min and max recovers the file's q, d and m; only the scale and
offset are rounded to bfloat16, the kernel's type, as are the activations it multiplies.

The kernel unpacks the weights for every row block, so past a few rows the dense matmul is
faster: the layers keep both and each step picks by its row count (MAX_ROWS, measured on a
2-core x86 machine: int4 is 2-3.6x faster than float32 up to 16 rows).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

GROUP = 32
MAX_ROWS = 16
_N_MULTIPLE = 16  # the packing kernel's requirement on output features


def supported(weight: Tensor) -> bool:
    n, k = weight.shape
    return weight.device.type == "cpu" and n % _N_MULTIPLE == 0 and k % GROUP == 0


class Int4Weight:
    """One [out, in] matrix packed for torch's CPU int4 kernel, with bf16 scales and offsets."""

    def __init__(self, packed: Tensor, scales_zeros: Tensor) -> None:
        self.packed, self.scales_zeros = packed, scales_zeros

    @classmethod
    @torch.no_grad()
    def quantize(cls, weight: Tensor) -> Int4Weight:
        """Asymmetric round-to-nearest per group of GROUP inputs, from each group's min and max."""
        if not supported(weight):
            raise ValueError(
                f"int4 needs a CPU matrix with out % {_N_MULTIPLE} == 0 and in % {GROUP} == 0, "
                f"got {tuple(weight.shape)} on {weight.device}"
            )
        n, k = weight.shape
        groups = weight.float().view(n, k // GROUP, GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
        q = ((groups - low[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.int32).view(n, k)
        # The kernel computes (q - 8) * scale + zero, so zero is the value q = 8 stands for.
        zero = low + 8 * scale
        scales_zeros = torch.stack((scale, zero), -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        return cls(packed, scales_zeros)

    def __call__(self, x: Tensor) -> Tensor:
        """x [rows, in] -> x @ weight.T [rows, out], in x's dtype."""
        # The kernel needs contiguous bf16 rows. In bf16 models no cast is called at all: at one
        # row even a no-op .to() is a measurable share of the step (4 matrices x 30 layers).
        if x.dtype == torch.bfloat16:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, GROUP, self.scales_zeros)
        rows = x.to(torch.bfloat16).contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP, self.scales_zeros)
        return out.to(x.dtype)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes

    def dequantize(self) -> Tensor:
        """The matrix the kernel multiplies by, as float32 (for tests and error checks); its
        values pass through the kernel's bf16 output, so each is rounded to bf16."""
        n = self.scales_zeros.shape[1]
        eye = torch.eye(self.packed.shape[1] * 2, dtype=torch.bfloat16)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, GROUP, self.scales_zeros).float().t()[:n]


class Int4Layer(NamedTuple):
    """A decoder layer's four matrices as int4 copies."""

    qkv: Int4Weight
    o: Int4Weight
    gate_up: Int4Weight
    down: Int4Weight

    @classmethod
    def quantize(cls, qkv: Tensor, o: Tensor, gate_up: Tensor, down: Tensor) -> Int4Layer:
        return cls(
            Int4Weight.quantize(qkv), Int4Weight.quantize(o), Int4Weight.quantize(gate_up), Int4Weight.quantize(down)
        )
