"""Int8 LM head for steps of a few rows on a CPU.

The LM head is the largest matrix of a small model (49152 x 576 in SmolLM2: 56 MB in bf16, a
third of what a 4-bit decode step reads) and every decode step reads all of it for one row of
logits. One int8 value per weight and a scale per output row (symmetric, round to nearest)
halve those bytes against bf16. Unlike int4 (groups of 32, which costs the head ~4 % of
perplexity), int8 per row is lossless in practice: the bundled GGUF stores the head as Q8_0
already, and perplexity and greedy tokens stay those of the dense head (docs/benchmarks.md).

The multiply is oneDNN's int8 x int8 matmul (`onednn.qlinear_pointwise`, VNNI/AMX dot
products), with each activation row quantized to 8 bits by its own max |x|, as llama.cpp does
for its Q8_0 dot products: a row's logits do not depend on the other rows of the step. That
kernel is about 2x faster here than torch's weight-only `_weight_int8pack_mm`, which converts
every weight to float before multiplying (at one row it is bound by that, not by memory);
the weight-only kernel remains the fallback where oneDNN's int8 matmul is not available.

Without VNNI (an AVX2 EPYC) oneDNN's u8 x s8 matmul is inexact and the start-up check rejects it;
there the engine hands the head the fused CPU extension's own int8 kernel (use_kernel:
fused_cpu/csrc/int8_matmul.h, model_runner.py), which multiplies the unquantized activations by
these same values and scales in fp32, is row-invariant, and reads the 28 MB of int8 at one row
about 5x faster than the weight-only fallback, which converts every weight to float per call.
This module does not import the extension: a host without a C++ compiler keeps the fallback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# Activations are quantized to uint8 around this zero point (oneDNN's fast u8 x s8 form).
_ZERO_POINT = 128
MAX_ROWS = 128
"""Up to how many rows oneDNN's int8 matmul beats the dense bf16 head (benchmarks/
cpu_linear_kernels.py, SmolLM2's 49152 x 576 head, one thread, 2-core Xeon with AMX, 2026-12-02):
8.2 vs 22 ms at 16 rows, 14 vs 28 at 64, 26 vs 38 at 128, 101 vs 62 at 256. Without AMX the
dense head is slower still (at 32 rows 13 vs 52 ms). Unlike the layers' int4 kernel its cost
grows slowly with rows, so the head keeps its own cutoff rather than the layers'."""
_MAX_ROWS_FALLBACK = 16
"""The weight-only fallback converts every weight to float per call: only for few rows."""

MAX_ROWS_KERNEL = 64
"""Up to how many rows the fused extension's int8 kernel beats the dense fp32 head (benchmarks/
cpu_linear_kernels.py, SmolLM2's head, one thread, CPU time, 2-core AVX2 EPYC, loaded shared
machine, 2026-12-02 18:10 UTC): 4.2 vs 16.4 ms at 1 row, 9.4 vs 49.7 at 9, 37.5 vs 85.2 at 32,
60.6 vs 113.7 at 64, 152 vs 172 at 128 (an earlier blocking: 176 vs 160). The cut-off counts a
step's requests, whose drafts multiply its rows: 64 keeps a margin."""

Int8Kernel = Callable[[Tensor, Tensor, Tensor], Tensor]
"""(x [rows, in] bf16 or float32, values int8 [out, in], scales float32 [out]) -> x @ (values *
scales[:, None]).T, float32 [rows, out], row-invariant: the fused extension's int8_matmul."""


class Int8Weight:
    """One [out, in] matrix as int8 values and a float32 scale per output row."""

    def __init__(self, values: Tensor, scales: Tensor) -> None:
        self.values, self.scales = values, scales
        self._packed: Tensor | None = None
        self._kernel: Int8Kernel | None = None
        self._zero_points = torch.zeros(values.shape[0], dtype=torch.long)
        try:
            self._packed = torch.ops.onednn.qlinear_prepack(values, None)
            self(torch.zeros(1, values.shape[1]))  # a build whose kernel cannot run fails here, not mid-step
        except (AttributeError, RuntimeError, NotImplementedError) as e:
            log.info("oneDNN int8 matmul unavailable (%s): the int8 LM head uses _weight_int8pack_mm", e)
            self._packed = None
        if self._packed is not None and not _onednn_is_exact_enough(values, scales):
            log.info(
                "oneDNN's int8 matmul is inexact on this CPU (no VNNI: its u8 x s8 pair sums saturate): "
                "the int8 LM head uses _weight_int8pack_mm"
            )
            self._packed = None

    @classmethod
    @torch.no_grad()
    def quantize(cls, weight: Tensor) -> Int8Weight:
        """Symmetric per output row: w ~= q * scale, q in [-127, 127], scale = max |w| / 127."""
        if weight.device.type != "cpu":
            raise ValueError(f"int8 weights are for the CPU kernels, got a matrix on {weight.device}")
        w = weight.float()
        scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        values = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return cls(values, scale)

    @property
    def uses_onednn(self) -> bool:
        """Whether oneDNN's int8 x int8 matmul multiplies (it exists here and is exact enough)."""
        return self._packed is not None

    def use_kernel(self, kernel: Int8Kernel | None) -> None:
        """Multiply by `kernel` instead of the weight-only fallback (where oneDNN's matmul is not
        used): the caller has the fused extension, which this module does not import. None: the
        fallback again (benchmarks compare the two)."""
        if self._packed is not None:
            raise ValueError("oneDNN's int8 matmul already multiplies this head")
        self._kernel = kernel

    def __call__(self, x: Tensor) -> Tensor:
        """x [rows, in] -> x @ weight.T [rows, out] in float32 (what logits are kept in)."""
        if self._kernel is not None:
            if x.dtype not in (torch.bfloat16, torch.float32):
                x = x.float()
            return self._kernel(x, self.values, self.scales)
        if self._packed is None:
            # The weight-only kernel is fast only with bf16 activations (~10x slower in fp32).
            rows = x.to(torch.bfloat16).contiguous()
            return torch.ops.aten._weight_int8pack_mm(rows, self.values, self.scales.to(torch.bfloat16)).float()
        x = x.float()
        # Each row by its own scale; the kernel then sees scale 1 and adds nothing across rows.
        row_scale = x.abs().amax(dim=1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny).div_(127)
        xq = (x / row_scale).round_().add_(_ZERO_POINT).to(torch.uint8)
        out = torch.ops.onednn.qlinear_pointwise(
            xq, 1.0, _ZERO_POINT, self._packed, self.scales, self._zero_points,
            None, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        return out.mul_(row_scale)

    @property
    def max_rows(self) -> int:
        """The largest step, in logits rows, this head is faster for than the dense one."""
        if self._kernel is not None:
            return MAX_ROWS_KERNEL
        return MAX_ROWS if self._packed is not None else _MAX_ROWS_FALLBACK

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes

    def dequantize(self) -> Tensor:
        """The weight matrix the kernel multiplies by, as float32 (for tests and error checks)."""
        return self.values.float() * self.scales[:, None]


_PROBE_ROWS = 512
"""Output rows of the weight the start-up check multiplies (a slice: the whole head would cost
start-up time)."""


@torch.no_grad()
def _onednn_is_exact_enough(values: Tensor, scales: Tensor) -> bool:
    """Whether oneDNN's u8 x s8 matmul computes these weights as their int8 values say. Without
    VNNI (AVX512_VNNI, AVX-VNNI or AMX) oneDNN multiplies with vpmaddubsw, whose int16 pair sums
    saturate (255 x 127 x 2 > 32767), so a large activation times a large weight comes out wrong
    (a 2-core AMD EPYC with AVX2: 5 % relative error on random rows, and a zero row's logits not
    zero). Checked against the same product in float32: first the largest weights times the
    largest activations, which saturate every pair sum without VNNI whatever the model's weights
    (SmolLM2's head alone passed on the AVX2 EPYC: its first rows' weights seldom saturate); then a
    slice of the weight: a row of zeros, and random rows, whose 8-bit activations alone cost well
    under 1 %."""
    if not _exact_on(
        torch.full((8, values.shape[1]), 127, dtype=torch.int8), torch.ones(8), torch.ones(1, values.shape[1])
    ):
        return False
    rows = min(_PROBE_ROWS, values.shape[0])
    x = torch.randn(4, values.shape[1], generator=torch.Generator().manual_seed(0))
    x[0] = 0.0
    return _exact_on(values[:rows], scales[:rows], x)


def _exact_on(values: Tensor, scales: Tensor, x: Tensor) -> bool:
    """Whether oneDNN's product of x and these weights is that in float32: exactly zero for zero
    rows of x, within 1 % (its 8-bit activations) for the others."""
    probe = Int8Weight.__new__(Int8Weight)
    probe.values, probe.scales = values, scales
    probe._zero_points = torch.zeros(values.shape[0], dtype=torch.long)
    probe._kernel = None
    probe._packed = torch.ops.onednn.qlinear_prepack(values, None)
    got, want = probe(x), x @ probe.dequantize().t()
    zero = (x == 0).all(dim=1)
    if not torch.equal(got[zero], torch.zeros_like(got[zero])):
        return False
    return bool(((got[~zero] - want[~zero]).norm() / want[~zero].norm()) < 1e-2)
