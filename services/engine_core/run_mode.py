"""How the engine runs its model (device, dtype, int4 copies), resolved from Config's `auto`
values here and nowhere else.

The CPU default is the fastest mode whose quality matches llama.cpp's on the same file
(docs/benchmarks.md, perplexity and served throughput): bfloat16 weights and activations
where the CPU multiplies bf16 natively (AVX512_BF16 or AMX), plus int4 copies of the layer
matrices for steps of few rows when the checkpoint itself stores them as 4-bit GGUF groups
(Q4_0/Q4_1: the copies hold the file's own weights, see models/int4.py), which the fused step
below multiplies (decode rows and, without AMX, prefill rows) by activations quantized to int8 per
32-input block, as llama.cpp multiplies the same file (fused_cpu/csrc/quantize_rows.h; perplexity
+0.3 % on the decode rows and +0.65 % on the prefill rows against bf16 activations,
docs/benchmarks.md: what makes a speculative verify row cheap and a prefill faster). A float checkpoint
is never re-quantized unless asked (--quantization int4): that would lose quality nobody
chose. On CUDA the default is bfloat16 without int4 (its kernel is CPU-only).

Every step of that mode runs as one call into the fused C++ kernels (fused_cpu/), whose rows do
not depend on each other, so speculation never changes greedy output. A CPU without native bf16
(an AVX2 EPYC, say) emulates bf16 matmuls, ~6x slower than fp32 ones, so there the default keeps
bf16 activations (and KV cache) but, for a model with int4 copies, fp32 dense weights (the
layers', the embedding, the LM head): the fused step multiplies its bf16 rows by them in fp32 and
rounds the products to bf16 (`bfloat16+int4+int8-lm-head+fused-decode+fp32-dense` for the bundled
model), where the fused kernels build (fused_fp32_dense). A float checkpoint runs the fused step
there too, for the same guarantee, with its dense weights in bf16 (`bfloat16+fused-decode`, as on
a CPU with native bf16; ModelRunner casts them once loaded): its decode rows and LM head go through
the extension's own row-invariant bf16 kernel (fused_cpu/csrc/bf16_matmul.h, half the bytes of
fp32 weights and no padded library calls), prefill rows through MKL on fp32 copies made per step
(docs/benchmarks.md). Where the kernels do not build, or with --dtype float32 or
--no-fused-cpu-decode, such a CPU runs eager float32.

The exact mode (--exact) is float32 with nothing else: greedy output is token for token
transformers' and does not depend on what else is in the batch. It is what the parity tests
run. On a CPU it is batch-invariant to the bit: a token's logits are the same whatever else is
in its step and however its tokens were grouped into steps (decoded one by one, verified as
drafts, prefilled in any chunks), so seeded sampling is too. Two things make it so: the
attention backend attends every query row in one canonical form (attention/torch_backend.py),
and MKL's float32 GEMM runs in its strict CNR mode (services/engine_core/__init__.py), where
each output row is computed the same way whatever the number of rows (by default MKL picks
other kernels for 1, a few and many rows, which round differently).

The fast modes differ from it in the last bits, so their greedy output can diverge after many
tokens and can depend on the batch (benchmarks/decode_agreement.py reports both).
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from shared.config import EngineConfig

# GGUF types whose groups of 32 the int4 kernel's layout holds (nearly) as the file stores
# them, so `--quantization auto` repacks them; other files stay dense unless asked.
AUTO_INT4_GGUF_TYPES = frozenset({"Q4_0", "Q4_1"})
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_MKL_CBWR_ALL = -1
_MKL_CBWR_STRICT = 0x10000


def use_batch_invariant_blas() -> bool:
    """Ask MKL for its strict CNR mode, where a float32 GEMM computes each output row the same
    way whatever the row count (the exact mode's batch invariance), and say whether it is on.
    MKL reads MKL_CBWR at its first GEMM, not when torch loads it, so an exact engine sets it
    before loading weights; a process that has already multiplied float32 matrices keeps the
    mode it started with (the engine then warns). Only the exact mode asks: strict mode gives
    up MKL's single-row GEMV kernel, which fp32 modes that are not exact keep. A user's own
    MKL_CBWR wins."""
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    return blas_batch_invariant()


def blas_batch_invariant() -> bool:
    """Whether torch's float32 GEMM computes each output row independently of the row count:
    its MKL runs in strict CNR mode (MKL_CBWR=...,STRICT, read at MKL's first GEMM)."""
    if not torch.backends.mkl.is_available():
        return False
    for lib in sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*")):
        try:
            get = ctypes.CDLL(str(lib)).mkl_serv_cbwr_get  # mkl_cbwr_get, as torch links MKL in
        except (OSError, AttributeError):
            continue
        get.argtypes, get.restype = [ctypes.c_int], ctypes.c_int
        return bool(get(_MKL_CBWR_ALL) & _MKL_CBWR_STRICT)
    return False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512_BF16 or AMX-BF16), which
    torch's bf16 matmuls (oneDNN) use; without them bf16 is emulated and no faster than fp32."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # a torch without the query: assume the safe answer
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def fused_fp32_dense(config: EngineConfig, device: torch.device) -> bool:
    """Whether this engine's default, if the fused C++ kernels build (the caller checks), is the
    fused step with bf16 activations and fp32 dense weights (bf16 ones where the model turns out to
    have no int4 copies: ModelRunner casts a float checkpoint's): on a CPU without native bf16, with
    nothing asked that rules it out (a dtype, --exact, --compile-decode, --no-fused-cpu-decode)."""
    return (
        device.type == "cpu"
        and config.dtype == "auto"
        and not config.exact
        and config.fused_cpu_decode
        and not config.compile_decode
        and not cpu_has_native_bf16()
    )


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.exact:
        return torch.float32
    if config.dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32
    if config.dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {config.dtype!r}: expected auto, {', '.join(_DTYPES)}")
    return _DTYPES[config.dtype]


def resolve_quantization(config: EngineConfig, device: torch.device, layer_types: frozenset[str]) -> str:
    """'int4' or 'none'. layer_types: the GGUF types of the checkpoint's layer matrices
    (empty for safetensors and random weights), known once the checkpoint is opened."""
    if config.exact:
        return "none"
    if config.quantization == "auto":
        use_int4 = device.type == "cpu" and bool(layer_types) and layer_types <= AUTO_INT4_GGUF_TYPES
        return "int4" if use_int4 else "none"
    if config.quantization not in ("none", "int4"):
        raise ValueError(f"unknown quantization {config.quantization!r}: expected auto, none, int4")
    if config.quantization == "int4" and device.type != "cpu":
        raise ValueError("--quantization int4 runs on a CPU only (its kernel is torch's CPU int4 matmul)")
    return config.quantization


def describe(
    dtype: torch.dtype,
    int4: bool,
    lm_head: str | None,
    compiled: bool,
    exact: bool,
    fused: bool = False,
    weight_dtype: torch.dtype | None = None,
) -> str:
    """The mode in a few words, as the start-up log and /v1/models show it: 'exact (float32)',
    'bfloat16+int4+int8-lm-head+fused-decode', 'float32+int4+int4-lm-head+compiled', ...
    lm_head: the quantized LM head's kind ('int8', 'int4') or None for a dense one; weight_dtype:
    the dense weights' dtype where it is not dtype's (the activations'): '+fp32-dense'."""
    name = str(dtype).removeprefix("torch.")
    if exact:
        return f"exact ({name})"
    parts = [name] + ["int4"] * int4 + [f"{lm_head}-lm-head"] * (lm_head is not None)
    parts += ["compiled"] * compiled + ["fused-decode"] * fused
    if weight_dtype is not None and weight_dtype != dtype:
        parts.append({torch.float32: "fp32", torch.bfloat16: "bf16"}.get(weight_dtype, str(weight_dtype)) + "-dense")
    return "+".join(parts)
