"""Dense matmuls padded to a minimum row count, so that a row's bits do not depend on how many
rows share its call.

The exact mode promises batch invariance: a token's logits are the same bits whether it was
decoded alone, in a batch, verified as a draft or prefilled in any chunk. On Intel CPUs MKL's
strict CNR mode (run_mode.use_batch_invariant_blas) gives that for every row count. Elsewhere
MKL may accept the mode and still pick other kernels for a few rows: on a 2-core AMD EPYC (AVX2)
a float32 GEMM of 1-3 and 5-7 rows rounds differently from one of 4 or of 8 and more, which all
agree. So the exact mode measures, at start-up, the smallest row count from which every call
agrees (min_invariant_rows) and pads smaller calls to it: a decode step of one row then
multiplies 8 rows (7 of zeros) on such a CPU, and 1 where strict CNR holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CANDIDATES = (1, 2, 4, 8, 16, 32)
"""Row counts min_invariant_rows tries, smallest first."""


def linear(x: Tensor, w: Tensor, bias: Tensor | None = None, min_rows: int = 1, multiple: int = 1) -> Tensor:
    """F.linear(x, w, bias), x padded with zero rows to at least min_rows rows and to a multiple
    of `multiple`. Weights of another dtype than x (fp32 dense weights under bf16 activations:
    fused_cpu/decode.py) multiply x converted to theirs, the product converted back."""
    t = x.shape[0]
    rows = max(min_rows, -(-t // multiple) * multiple)
    if w.dtype != x.dtype:
        out = linear(x.to(w.dtype), w, None, rows).to(x.dtype)
        return out if bias is None else out.add_(bias)
    if t >= rows:
        return F.linear(x, w, bias)
    return F.linear(_pad(x, rows), w, bias)[:t]


def addmm_(h: Tensor, a: Tensor, w_t: Tensor, min_rows: int = 1) -> Tensor:
    """h += a @ w_t in place (one addmm, as the model folds its residual adds), both padded to
    at least min_rows rows."""
    t = h.shape[0]
    if w_t.dtype != h.dtype:
        return h.add_(linear(a, w_t.t(), min_rows=min_rows))
    if t >= min_rows:
        return h.addmm_(a, w_t)
    return h.copy_(_pad(h, min_rows).addmm_(_pad(a, min_rows), w_t)[:t])


def _pad(x: Tensor, rows: int) -> Tensor:
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])


@torch.inference_mode()
def min_invariant_rows(weights: list[Tensor], candidates: tuple[int, ...] = CANDIDATES) -> int:
    """The smallest P of candidates for which every call of P or more rows gives each row the
    bits it gets in a call of P rows (it alone, then zero padding), for each of the weights,
    checked on random rows at several row counts and offsets; 0 if none. 1: the GEMM is
    row-invariant as it is."""
    gen = torch.Generator().manual_seed(2)
    for p in candidates:
        if all(_invariant_from(w, p, gen) for w in weights):
            return p
    return 0


def _invariant_from(w: Tensor, p: int, gen: torch.Generator) -> bool:
    n = 3 * p + 70
    x = torch.randn(n, w.shape[1], generator=gen).to(w.dtype)
    lone = torch.cat([linear(x[i : i + 1], w, min_rows=p) for i in range(n)])
    for m in sorted({p, p + 1, 2 * p + 3, 64, n}):
        for start in (0, n - m):
            if not torch.equal(F.linear(x[start : start + m], w), lone[start : start + m]):
                return False
    return True
