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
faster: the layers keep both and each step picks by its row count (max_rows()).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor

GROUP = 32
_N_MULTIPLE = 16  # the packing kernel's requirement on output features

# Up to how many rows the int4 kernel beats the dense matmul it stands in for. Its cost grows
# with every row (it unpacks the weights per row block) while a dense matmul's stays nearly flat
# over the first tens of rows, so the crossover depends on how fast the dense kernel is
# (benchmarks/cpu_linear_kernels.py, SmolLM2's four layer matrices, A/B interleaved medians):
MAX_ROWS_AMX = 8
"""Dense bf16 on AMX tiles (2-core Xeon with AMX, 2026-12-02): int4 wins for a whole layer up to
4 rows with one thread (at 8 rows 1.31 vs 1.13 ms per layer) and up to 8 with two (o, gate|up
and down: 0.64 vs 0.80 ms at 8 rows, 0.87 vs 0.77 at 10); at 16 rows it costs 1.25x (two
threads) to 2.2x (one) the dense layer. The engine runs one thread per core, so 8. Past it a step
of 8 requests that verifies a few drafts pays dense bf16's nearly flat cost per row, not int4's."""
MAX_ROWS = 16
"""Dense bf16 without AMX (AVX512_BF16 dot products: the same machine with
ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16) and dense float32: int4 still wins at 16 rows (a layer 2.2
vs 2.6 ms in bf16 with one thread; 2-3.6x against float32), and is about even at 24-32."""


def _has_amx() -> bool:
    """Whether oneDNN's dense bf16 matmuls run on AMX tiles here."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and isa != "ALL" and "AMX" not in isa:
        return False  # the user capped oneDNN below AMX
    is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.13: guard it
    return bool(is_amx is not None and is_amx())


def _dense_on_amx(dense_dtype: torch.dtype) -> bool:
    """Whether dense weights of dense_dtype are multiplied on AMX tiles (bf16 on a CPU with AMX):
    the one case where the dense matmul beats the int4 kernels past a few rows."""
    return dense_dtype == torch.bfloat16 and _has_amx()


def max_rows(dense_dtype: torch.dtype) -> int:
    """The largest step, in rows, that multiplies by the int4 copies rather than the dense
    weights of dtype dense_dtype (see MAX_ROWS_AMX and MAX_ROWS)."""
    return MAX_ROWS_AMX if _dense_on_amx(dense_dtype) else MAX_ROWS


FUSED_MAX_REQUESTS = 64
"""Without AMX, the most decoding requests whose rows (drafts included) the fused CPU step
multiplies by the int4 copies. Its own int4 kernel (fused_cpu/csrc/int4_matmul.h: int8
activations, integer dot products, the weights read once a call for all rows) beats the dense
matmul at every row count measured, not only up to MAX_ROWS as torch's kernel does: a layer's
four matrices at 32 / 64 / 128 / 288 rows took 0.62 / 1.01 / 1.94 / 4.30 ms against dense bf16's
1.45 / 1.80 / 2.78 / 5.78 (2-core Zen 4, AVX512_BF16 without AMX, 2 threads, 2026-12-03,
benchmarks/int4_matmul_kernel.py --threads 2 --rows 32 64 96 128 192 288), and dense float32 (a
CPU without native bf16) is slower still. 64 requests is where it was measured (k drafts each
make up to 64 (1 + k) rows, which the adaptive draft lengths keep short in full steps); with AMX
the cut-off stays MAX_ROWS_AMX's, AMX's dense tiles not having been measured against this kernel."""


def fused_max_requests(dense_dtype: torch.dtype) -> int:
    """The most decoding requests a fused CPU step multiplies by the int4 copies (see
    FUSED_MAX_REQUESTS)."""
    return MAX_ROWS_AMX if _dense_on_amx(dense_dtype) else FUSED_MAX_REQUESTS


def fused_prefill_int4(dense_dtype: torch.dtype) -> bool:
    """Whether the fused CPU step's int4 copies also take the prefill rows (prompt chunks), not
    the dense weights of dtype dense_dtype: yes without AMX, where its kernel is faster at
    hundreds of rows too. A layer's four matrices at 128 / 512 rows took 2.6 / 9.7 ms against
    dense bf16's 4.4 / 11.9, and a prompt's prefill (the model part of TTFT) of 128 / 200 / 600 /
    2000 tokens 100 / 146 / 500 / 2488 ms against 118 / 223 / 617 / 2710 (2-core Zen 4,
    AVX512_BF16 without AMX, 2 threads, 2026-12-03 11:22-11:32 UTC, int4_matmul_kernel.py and
    prefill_step_cost.py). Dense fp32 (MKL: a CPU without native bf16) is slower still: with the
    Zen 4 emulating a Zen 3 (AVX2 builds, ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
    MKL_ENABLE_INSTRUCTIONS=AVX2), the AVX2 int4 kernel 4.8 / 18.0 ms against fp32's 11.3 / 31.7,
    measured under emulation only. The price is the int8 activations': perplexity 7.8279 ->
    7.8785 (+0.65 %) with the prefill rows on int4 (benchmarks/perplexity.py --modes
    default-fused-prefill-dense default-fused-prefill). With AMX the dense tiles, not measured
    against this kernel, keep them."""
    return not _dense_on_amx(dense_dtype)


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
