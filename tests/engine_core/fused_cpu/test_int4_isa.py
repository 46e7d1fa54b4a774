"""The fused step's int4 matmul and its activation quantizer give the same bits on every
instruction set they have code for (csrc/int4_matmul_avx512.h, csrc/int4_matmul_avx2.h and the
portable loops; quantize_rows.h's branches): which CPU serves a request, AVX-512 or AVX2-only,
must not change its tokens, and the integer dot products make that exact. A small extension
(int4_isa.cpp: those headers alone) is built for each instruction set this CPU runs and their
outputs compared bit for bit: -march=native (AVX-512 where the CPU has it), -mno-avx512f (AVX2),
-mno-avx (portable). Each build is cached in the temp dir by a key over its sources and flags:
the three builds took 29 s on the 2-core Zen 4 (2026-12-03 09:15 UTC; 36 s beside another
compile), the comparisons under 1 s; so the test is not marked slow."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import tempfile
from typing import Any

import pytest
import torch

from services.engine_core.fused_cpu import extension
from services.engine_core.fused_cpu.int4_matmul import repack
from services.engine_core.models.int4 import GROUP, Int4Weight

BF16 = torch.bfloat16
HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "int4_isa.cpp")
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (80, 64)]
ROWS = (1, 2, 3, 5, 9, 17, 33)

ISAS = {
    # name: (the CPU flags it needs, its flags after extension.CFLAGS' -march=native), as
    # extension.py builds the engine's extension for each ATen capability.
    "avx512": ({"avx512f"}, ("-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512")),
    "avx2": ({"avx2", "fma"}, ("-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mno-avx512f")),
    "portable": ({"avx"}, ("-DCPU_CAPABILITY=DEFAULT", "-mno-avx")),  # -mno-avx: x86 only
}


def build(isa: str) -> Any:
    """The ops (torch.ops.<namespace>) of int4_isa.cpp built for `isa`, built first if this key's
    build is not in the temp dir."""
    import ninja
    from torch.utils import cpp_extension

    flags = [*extension.CFLAGS, *ISAS[isa][1]]
    h = hashlib.sha256()
    for path in [SOURCE, *sorted(glob.glob(os.path.join(extension.CSRC, "*.h")))]:
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read())
    for part in (torch.__version__, extension.build_key(), os.environ.get("CXX", "c++"), " ".join(flags)):
        h.update(part.encode() + b"\0")
    ns = f"novainfer_int4_isa_{isa}_{h.hexdigest()[:16]}"
    build_dir = os.path.join(tempfile.gettempdir(), "novainfer-int4-isa", ns)
    os.makedirs(build_dir, exist_ok=True)
    os.environ["PATH"] = os.pathsep.join((ninja.BIN_DIR, os.environ.get("PATH", "")))
    cpp_extension.load(
        name=ns,
        sources=[SOURCE],
        extra_cflags=[*flags, f"-DNOVAINFER_ISA_NS={ns}"],
        extra_ldflags=list(extension.LDFLAGS),
        extra_include_paths=[extension.CSRC],
        build_directory=build_dir,
        is_python_module=False,
        verbose=False,
    )
    return getattr(torch.ops, ns)


@pytest.fixture(scope="module")
def builds() -> dict[str, Any]:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    cpu = set(extension._cpu_flags().split())
    runnable = [isa for isa, (needs, _) in ISAS.items() if needs <= cpu]
    if len(runnable) < 2:
        pytest.skip(f"one instruction set to compare here ({runnable})")
    return {isa: build(isa) for isa in runnable}


def activations(rows: int, in_features: int, seed: int) -> torch.Tensor:
    """Gaussian rows with 4 outlier channels x20 (as hidden states have), an all-zero block
    (d = 0) and, from 2 rows, a block too small for an int8 scale (treated as zeros), in bf16."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=g)
    x[:, torch.randperm(in_features, generator=g)[:4]] *= 20
    x[0, :GROUP] = 0
    if rows > 1:
        x[1, :GROUP] *= 1e-39
    return x.to(BF16)


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's bits as integers (so NaN equals itself and -0 differs from 0)."""
    if t.dtype == BF16:
        return t.view(torch.int16)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    return t


@pytest.mark.parametrize("out_features, in_features", SHAPES)
def test_same_bits_on_every_instruction_set(builds: dict[str, Any], out_features: int, in_features: int) -> None:
    """SmolLM2's layer shapes and a tiny one (5 vectors of 16 columns: a partial unit) at the
    verify steps' row counts: every build's quantized rows (q, d, c, s) and products equal the
    first build's, bit for bit."""
    weight = Int4Weight.quantize(torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)))
    packed, scales_zeros = repack(weight)
    (first, ops0), *others = builds.items()
    for rows in ROWS:
        x = activations(rows, in_features, seed=rows)
        want_q = [bits(t) for t in ops0.quantize_rows(x)]
        want = bits(ops0.int4_matmul(x, packed, scales_zeros))
        for isa, ops in others:
            got_q = [bits(t) for t in ops.quantize_rows(x)]
            for name, got_t, want_t in zip("qdcs", got_q, want_q, strict=True):
                assert torch.equal(got_t, want_t), f"quantize_rows' {name}: {isa} != {first} at {rows} rows"
            got = bits(ops.int4_matmul(x, packed, scales_zeros))
            assert torch.equal(got, want), f"int4_matmul: {isa} != {first} at {rows} rows"
