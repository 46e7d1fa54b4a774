"""Test-wide setup.

Triton reads TRITON_INTERPRET when it is first imported, and any test module may import it
(some only to skip when it is missing), so the variable is set here, in the conftest pytest
loads before collecting any test: without a GPU the Triton kernels run in its interpreter.
"""

from __future__ import annotations

import os

# Before any GEMM: the exact mode's batch invariance (run_mode.use_batch_invariant_blas), for
# the whole test process, whose first GEMM may come from a test of another mode.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
