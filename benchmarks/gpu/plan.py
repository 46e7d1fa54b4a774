"""What one run measures: every shape and size the sections use, the issue's on a GPU and tiny
ones with --smoke (so CI runs the same code paths in Triton's interpreter)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Model shapes as config JSONs: the engine and transformers both build random-weight models from them.
CONFIGS = os.path.join(ROOT, "shared", "model_configs")


@dataclass
class Plan:
    """Every shape and size the sections use: the issue's on a GPU, tiny ones with --smoke."""

    smoke: bool
    device: str
    attn_dtype: torch.dtype
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    rel_tolerance: float
    correctness_shapes: list[tuple[int, int, int]]
    correctness_batches: dict[str, tuple[list[int], list[int], int]]
    """name -> (query lens, context lens, num_splits)."""
    copy_bytes: int
    decode_cases: list[tuple[int, int]]
    """(batch, context length); the first is the target case."""
    prefill: tuple[int, int]
    """(sequences, tokens each)."""
    step_models: list[str]
    step_batches: list[int]
    step_prompt_len: int
    step_warm: int
    step_timed: int
    model_dtype: str
    e2e_model: str
    e2e_seqs: int
    e2e_input: tuple[int, int]
    e2e_output: tuple[int, int]
    hf_batch: int
    hf_cb_warmup: bool
    """Let transformers' continuous batching capture its graphs first (generate_batch's default);
    off in smoke runs, where it costs most of a minute on a CPU."""
    engine_budget_s: float
    hf_budget_s: float
    hf_mode: str = "auto"
    """auto: continuous batching where transformers has it, else static batches; or force one."""
    engine_overrides: dict[str, Any] = field(default_factory=dict)


def full_plan() -> Plan:
    # Qwen3-0.6B's attention: 16 query heads, 8 KV heads, head_dim 128.
    return Plan(
        smoke=False,
        device="cuda",
        attn_dtype=torch.bfloat16,
        heads=16,
        kv_heads=8,
        head_dim=128,
        block_size=16,
        rel_tolerance=1e-2,
        correctness_shapes=[(16, 8, 128), (12, 2, 128)],  # Qwen3-0.6B, Qwen2.5-1.5B
        correctness_batches={
            # contexts: empty, partial and aligned blocks, long; a fresh prefill, chunks after a
            # cached prefix (aligned and not), decodes between them.
            "decode": ([1] * 8, [0, 15, 16, 17, 300, 1000, 2047, 64], 1),
            "mixed": ([1, 37, 1, 128, 1, 16], [100, 0, 513, 19, 2000, 16], 1),
            "decode_split4": ([1] * 8, [0, 15, 16, 17, 300, 1000, 2047, 64], 4),
        },
        copy_bytes=1 << 30,
        decode_cases=[(64, 2048), (128, 2048), (16, 2048), (4, 8192)],
        prefill=(8, 1024),
        step_models=["qwen3-0.6b", "qwen2.5-1.5b"],
        step_batches=[64, 128],
        step_prompt_len=512,
        step_warm=5,
        step_timed=20,
        model_dtype="bfloat16",
        e2e_model="qwen3-0.6b",
        e2e_seqs=256,
        e2e_input=(100, 1024),
        e2e_output=(100, 1024),
        hf_batch=64,
        hf_cb_warmup=True,
        engine_budget_s=120.0,
        hf_budget_s=200.0,
        engine_overrides={"device": "cuda", "dtype": "bfloat16"},
    )


def smoke_plan(device: str) -> Plan:
    # tiny-qwen3's attention shape; fp32 because the interpreter's bf16 tl.dot is wrong.
    on_cpu = device == "cpu"
    return Plan(
        smoke=True,
        device=device,
        attn_dtype=torch.float32 if on_cpu else torch.bfloat16,
        heads=4,
        kv_heads=2,
        head_dim=32,
        block_size=16,
        rel_tolerance=1e-4 if on_cpu else 1e-2,
        correctness_shapes=[(4, 2, 32)],
        correctness_batches={
            "decode": ([1] * 3, [0, 17, 40], 1),
            "mixed": ([1, 5, 1], [20, 0, 9], 1),
            "decode_split3": ([1] * 3, [0, 17, 40], 3),
        },
        copy_bytes=16 << 20,
        decode_cases=[(4, 64), (2, 100)],
        prefill=(2, 32),
        step_models=["tiny-qwen3", "tiny-qwen2"],
        step_batches=[4],
        step_prompt_len=16,
        step_warm=1,
        step_timed=3,
        model_dtype="float32" if on_cpu else "bfloat16",
        e2e_model="tiny-qwen3",
        e2e_seqs=6,
        e2e_input=(4, 16),
        e2e_output=(4, 12),
        hf_batch=4,
        hf_cb_warmup=False,
        engine_budget_s=30.0,
        hf_budget_s=30.0,
        engine_overrides={"device": device, "dtype": "float32" if on_cpu else "bfloat16", "kv_cache_bytes": 32 << 20},
    )
