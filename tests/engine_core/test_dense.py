"""models/dense.py: padded dense calls, and the probe of the row count that makes them row-invariant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.engine_core.models import dense


def test_padded_calls_compute_the_same_product() -> None:
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 24, generator=gen), torch.randn(40, generator=gen)
    x, h = torch.randn(3, 24, generator=gen), torch.randn(3, 40, generator=gen)
    torch.testing.assert_close(dense.linear(x, w, b, min_rows=8), F.linear(x, w, b))
    want = h + x @ w.t()
    torch.testing.assert_close(dense.addmm_(h.clone(), x, w.t(), min_rows=8), want)
    out = h.clone()
    dense.addmm_(out, x, w.t(), min_rows=8)  # in place
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("shape", [(1728, 576), (576, 1536), (4096, 576)])
def test_probed_padding_makes_rows_independent_of_the_call(shape: tuple[int, int]) -> None:
    """Whatever this CPU's GEMM does by row count (row-invariant under MKL's strict CNR mode on
    Intel; not below 8 rows on a 2-core AMD EPYC), calls padded to the probed count give every
    row the bits it gets alone, in calls of any size and at any offset."""
    from services.engine_core.run_mode import use_batch_invariant_blas

    use_batch_invariant_blas()  # as the exact mode does (a no-op once this process ran a GEMM)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=gen)
    rows = dense.min_invariant_rows([w])
    if rows == 0:
        pytest.skip("no padding makes this CPU's float32 GEMM row-invariant")
    x = torch.randn(45, shape[1], generator=gen)
    lone = torch.cat([dense.linear(x[i : i + 1], w, min_rows=rows) for i in range(45)])
    for m in (1, 2, 3, 5, 7, 9, 13, 45):
        for start in (0, 45 - m):
            got = dense.linear(x[start : start + m], w, min_rows=rows)
            assert torch.equal(got, lone[start : start + m]), (m, start)
