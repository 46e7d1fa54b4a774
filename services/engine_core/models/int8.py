"""Int8 weight-only matmul for the LM head of steps of a few rows on a CPU.

The LM head is the largest matrix of a small model (49152 x 576 in SmolLM2: 56 MB in bf16, a
third of what a 4-bit decode step reads) and every decode step reads all of it for one row of
logits. One int8 value per weight and a scale per output row (symmetric, round to nearest)
halve those bytes against bf16, and torch's CPU kernel `_weight_int8pack_mm` multiplies the
activations (in their own dtype) by them directly. Unlike int4 (groups of 32, which costs the
head ~4 % of perplexity), int8 per row is lossless in practice: the bundled GGUF stores the head
as Q8_0 already, and greedy tokens and perplexity stay those of the dense head
(docs/benchmarks.md).
"""

from __future__ import annotations

import torch
from torch import Tensor


class Int8Weight:
    """One [out, in] matrix as int8 values and a scale per output row (in the activations' dtype)."""

    def __init__(self, values: Tensor, scales: Tensor) -> None:
        self.values, self.scales = values, scales

    @classmethod
    @torch.no_grad()
    def quantize(cls, weight: Tensor) -> Int8Weight:
        """Symmetric per output row: w ~= q * scale, q in [-127, 127], scale = max |w| / 127."""
        if weight.device.type != "cpu":
            raise ValueError(f"int8 weights are for the CPU kernel, got a matrix on {weight.device}")
        w = weight.float()
        scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        values = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return cls(values, scale.to(weight.dtype))

    def __call__(self, x: Tensor) -> Tensor:
        """x [rows, in] in the dtype of the scales -> x @ weight.T [rows, out] in that dtype."""
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.values, self.scales)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes

    def dequantize(self) -> Tensor:
        """The matrix the kernel multiplies by, as float32 (for tests and error checks)."""
        return self.values.float() * self.scales.float()[:, None]
