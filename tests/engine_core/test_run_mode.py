"""How `auto` resolves per device and checkpoint (run_mode.py): the CPU default is bf16 where
the CPU multiplies bf16 natively, with int4 copies only of a Q4_0/Q4_1 GGUF's layers; --exact
is float32 with nothing else."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.engine_core import run_mode
from services.engine_core.model_runner import ModelRunner
from services.engine_core.models import dense
from services.engine_core.run_mode import (
    blas_batch_invariant,
    cpu_has_native_bf16,
    describe,
    fused_fp32_dense,
    resolve_dtype,
    resolve_quantization,
)
from shared.config import EngineConfig

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
Q4_1, Q4_K_M = frozenset({"Q4_1"}), frozenset({"Q4_K", "Q6_K"})


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bf16_where_the_cpu_has_bf16_dot_products(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(run_mode, "cpu_has_native_bf16", lambda: native)
    assert resolve_dtype(EngineConfig(), CPU) == (torch.bfloat16 if native else torch.float32)
    assert resolve_dtype(EngineConfig(), CUDA) == torch.bfloat16
    assert resolve_dtype(EngineConfig(exact=True), CPU) == torch.float32
    assert resolve_dtype(EngineConfig(exact=True), CUDA) == torch.float32
    assert resolve_dtype(EngineConfig(dtype="float32"), CPU) == torch.float32
    assert resolve_dtype(EngineConfig(dtype="bfloat16"), CPU) == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_fused_fp32_dense_only_by_default_on_a_cpu_without_native_bf16(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(run_mode, "cpu_has_native_bf16", lambda: native)
    assert fused_fp32_dense(EngineConfig(), CPU) == (not native)
    assert not fused_fp32_dense(EngineConfig(), CUDA)
    for asked in (
        dict(exact=True),
        dict(dtype="float32"),
        dict(dtype="bfloat16"),
        dict(fused_cpu_decode=False),
        dict(compile_decode=True),
    ):
        assert not fused_fp32_dense(EngineConfig(**asked), CPU), asked  # type: ignore[arg-type]


def _cpu_without_native_bf16(monkeypatch: pytest.MonkeyPatch, builds: bool) -> None:
    """This process sees a CPU without native bf16 whose fused kernels build, or not."""
    from services.engine_core.fused_cpu import extension

    monkeypatch.setattr(run_mode, "cpu_has_native_bf16", lambda: False)
    if not builds:
        monkeypatch.setattr(extension, "load", lambda cache_dir: None)
    elif shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the fused CPU kernels cannot be built here")


@pytest.mark.parametrize("builds", [True, False])
def test_default_without_native_bf16(monkeypatch: pytest.MonkeyPatch, builds: bool) -> None:
    """On a CPU without native bf16 the default is the fused step with bf16 activations where the
    kernels build, else the eager float32 mode; --dtype float32 stays eager. A float checkpoint
    (random weights here) keeps bf16 dense weights there, for the fused bf16 kernel (a 4-bit one,
    with int4 copies, fp32 ones: `+fp32-dense`, tests/e2e/test_run_mode.py)."""
    _cpu_without_native_bf16(monkeypatch, builds)
    small = dict(model="tiny-llama", device="cpu", kv_cache_bytes=1 << 20, max_num_batched_tokens=64)
    runner = ModelRunner(EngineConfig(**small))  # type: ignore[arg-type]
    layer = runner.model.layers[0]
    if builds:
        assert runner.mode == "bfloat16+fused-decode" and runner.fused is not None
        assert runner.dtype == torch.bfloat16 and runner.kv_caches[0][0].dtype == torch.bfloat16
        assert layer.qkv_weight.dtype == runner.model.embed.dtype == torch.bfloat16
        assert layer.attn_norm.dtype == torch.bfloat16
        assert runner.fused.widen and runner.fused.bf16_rows_max_requests > 0
        assert runner.model.bf16_head_kernel is not None and runner.model.widen_head
    else:
        assert runner.mode == "float32" and runner.fused is None and layer.qkv_weight.dtype == torch.float32
    asked = ModelRunner(EngineConfig(**small, dtype="float32"))  # type: ignore[arg-type]
    assert asked.mode == "float32" and asked.fused is None


def test_native_bf16_follows_the_cpu_flags() -> None:
    caps = torch.cpu.get_capabilities()
    assert cpu_has_native_bf16() == bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def test_auto_quantization_repacks_only_4bit_gguf_layers_on_a_cpu() -> None:
    auto = EngineConfig()
    assert resolve_quantization(auto, CPU, Q4_1) == "int4"
    assert resolve_quantization(auto, CPU, frozenset({"Q4_0"})) == "int4"
    assert resolve_quantization(auto, CPU, frozenset()) == "none"  # safetensors or random weights
    assert resolve_quantization(auto, CPU, Q4_K_M) == "none"  # not the int4 kernel's layout
    assert resolve_quantization(auto, CPU, frozenset({"F32"})) == "none"
    assert resolve_quantization(auto, CUDA, Q4_1) == "none"
    assert resolve_quantization(EngineConfig(exact=True), CPU, Q4_1) == "none"
    assert resolve_quantization(EngineConfig(quantization="none"), CPU, Q4_1) == "none"
    assert resolve_quantization(EngineConfig(quantization="int4"), CPU, frozenset()) == "int4"  # asked: lossy
    with pytest.raises(ValueError, match="CPU only"):
        resolve_quantization(EngineConfig(quantization="int4"), CUDA, Q4_1)


def test_describe() -> None:
    assert describe(torch.float32, False, None, False, exact=True) == "exact (float32)"
    assert describe(torch.bfloat16, True, None, False, exact=False) == "bfloat16+int4"
    assert describe(torch.float32, True, "int4", True, exact=False) == "float32+int4+int4-lm-head+compiled"
    assert (
        describe(torch.bfloat16, True, "int8", False, exact=False, fused=True)
        == "bfloat16+int4+int8-lm-head+fused-decode"
    )
    assert (
        describe(torch.bfloat16, True, "int8", False, exact=False, fused=True, weight_dtype=torch.float32)
        == "bfloat16+int4+int8-lm-head+fused-decode+fp32-dense"
    )
    assert describe(torch.float32, True, None, False, exact=False, weight_dtype=torch.float32) == "float32+int4"


def test_runner_reports_its_resolved_mode() -> None:
    small = dict(model="tiny-llama", device="cpu", kv_cache_bytes=1 << 20, max_num_batched_tokens=64)
    default = ModelRunner(EngineConfig(**small))  # type: ignore[arg-type]
    # Random weights are float: auto adds no int4 copies; where a C++ compiler built the fused
    # kernels, decode steps run them on the dense bf16 weights.
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        assert default.mode == ("bfloat16" if cpu_has_native_bf16() else "float32")
    else:
        assert default.mode == "bfloat16+fused-decode"
    assert default.model.layers[0].int4 is None
    exact = ModelRunner(EngineConfig(**small, exact=True))  # type: ignore[arg-type]
    assert exact.mode == "exact (float32)" and exact.dtype == torch.float32


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="MKL's CNR mode is the batch-invariant GEMM")
def test_float32_gemm_rows_do_not_depend_on_the_row_count() -> None:
    """MKL_CBWR=AUTO,STRICT (set before any GEMM: tests/conftest.py here, the exact engine in
    its process): on an Intel CPU a row's product is the same bits alone, among a few rows and
    among many, as the exact mode's batch invariance needs. Other CPUs may keep MKL's kernels
    for a few rows (a 2-core AMD EPYC does below 8): there the exact mode pads its calls to the
    row count probed at start-up (models/dense.py, tests/engine_core/test_dense.py)."""
    assert blas_batch_invariant()
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1536, 576, generator=gen)
    x = torch.randn(64, 576, generator=gen)
    pad = dense.min_invariant_rows([w])
    assert pad > 0
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "GenuineIntel" in cpuinfo.read_text():
        assert pad == 1
    alone = dense.linear(x[:1], w, min_rows=pad)
    for rows in (2, 5, 9, 17, 64):
        assert torch.equal(dense.linear(x[:rows], w, min_rows=pad)[:1], alone), rows


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="MKL's CNR mode is the batch-invariant GEMM")
@pytest.mark.parametrize("exact", [True, False])
def test_only_the_exact_mode_turns_on_mkls_strict_mode(exact: bool) -> None:
    """Strict mode costs MKL's single-row GEMV kernel, so only an exact engine asks for it, in
    a process that starts without it (a fresh interpreter: MKL keeps the mode of its first GEMM)."""
    code = (
        "from services.engine_core.model_runner import ModelRunner\n"
        "from services.engine_core.run_mode import blas_batch_invariant\n"
        "from shared.config import EngineConfig\n"
        "ModelRunner(EngineConfig(model='tiny-llama', device='cpu', kv_cache_bytes=1 << 20,"
        f" max_num_batched_tokens=64, exact={exact}))\n"
        "print(blas_batch_invariant())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(exact)
