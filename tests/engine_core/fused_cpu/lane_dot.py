"""csrc/lane_dot.h's order of operations in numpy: the reference the int8 and bf16 kernels'
tests compare their bits with."""

from __future__ import annotations

import numpy as np


def fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """fp32 fma, through float64: a * b is exact there, and the sum rounded twice is the once
    rounded one but where it falls within 2^-29 of a midpoint between fp32 values (not here)."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def lane_dot(xs: np.ndarray, ws: np.ndarray) -> np.ndarray:
    """[M, N] fp32: every row of xs [M, K] with every row of ws [N, K], step by step as the
    kernels compute it: eight lanes along K, their fixed sum, then the tail past K // 8 * 8."""
    k8 = xs.shape[1] // 8 * 8
    p = np.zeros((xs.shape[0], ws.shape[0], 8), dtype=np.float32)
    for k in range(k8):
        p[..., k % 8] = fma(xs[:, None, k], ws[None, :, k], p[..., k % 8])
    s = ((p[..., 0] + p[..., 4]) + (p[..., 2] + p[..., 6])) + ((p[..., 1] + p[..., 5]) + (p[..., 3] + p[..., 7]))
    for k in range(k8, xs.shape[1]):
        s = fma(xs[:, None, k], ws[None, :, k], s)
    return s
