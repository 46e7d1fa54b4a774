"""Decode steps of the CPU fast mode as one C++ call (csrc/decode_step.cpp).

The default CPU mode (bf16 activations, int4 layer matrices, models/int4.py) spends a
single-stream decode step mostly on issuing ~900 small eager ops, not on reading weights
(docs/benchmarks.md, the decode profile). Here a decode step of up to int4_max_rows requests,
each a decode row or a decode row and the speculative drafts it verifies, is one call into C++
that runs the whole forward: the int4 matmuls are torch's own kernel, the norms, RoPE + KV-cache
write, SiLU x mul and paged attention fused kernels (csrc/*.h, after sgl-kernel's CPU kernels).
Prefill chunks, larger batches and every mode but bf16 + int4 (the exact mode in particular)
keep the eager path.

Which weights: the int4 copies whenever the step's requests are few enough for them (what a
step of the same requests without drafts multiplies by), however many rows the drafts add. Each
fused kernel is row-invariant (a row's result does not depend on the step's other rows or their
count: the int4 matmul and the int8 LM head by test, the attention by its fixed KV splits), so a
draft verified here gets the bits it would get decoded alone, and greedy output is the same with
speculation on or off (tests/engine_core/fused_cpu/test_verify.py).

Numerics: the fused kernels accumulate in fp32 and round once where the eager ops round after
each op (and keep q in fp32), so outputs differ from the eager fast mode in the last bf16 bits;
greedy tokens mostly agree (tests/engine_core/fused_cpu/test_decode.py).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from services.engine_core.attention.base import AttentionMetadata
from services.engine_core.models.llama import CausalLM


def supported(model: CausalLM, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the fused path cannot run this model, or None when it can."""
    if device.type != "cpu":
        return "not on a CPU"
    if dtype != torch.bfloat16:
        return f"activations are {str(dtype).removeprefix('torch.')}, the kernels are bf16"
    if model.layers[0].int4 is None:
        return "the layers have no int4 weights"
    if model.cfg.head_dim % 2:
        return "an odd head_dim"
    return None


class FusedDecode:
    def __init__(self, ext: ModuleType, model: CausalLM) -> None:
        layers = model.layers
        q4 = [layer.int4 for layer in layers]
        assert all(w is not None for w in q4)

        def each(attr: str) -> list[Tensor]:
            values = [getattr(layer, attr) for layer in layers]
            return [] if values[0] is None else [v.contiguous() for v in values]

        def packed(matrix: str) -> tuple[list[Tensor], list[Tensor]]:
            weights = [getattr(w, matrix) for w in q4]
            return [w.packed for w in weights], [w.scales_zeros for w in weights]

        cfg = model.cfg
        first = layers[0]
        self.max_rows = first.int4_max_rows
        self._decoder: Any = ext.FusedDecoder(
            model.embed,
            model.rope_cos,
            model.rope_sin,
            model.norm,
            each("attn_norm"),
            *packed("qkv"),
            each("qkv_bias"),
            each("q_norm"),
            each("k_norm"),
            *packed("o"),
            each("mlp_norm"),
            *packed("gate_up"),
            *packed("down"),
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            first.eps,
            first.scale,
        )
        self._kv_caches: list[tuple[Tensor, Tensor]] | None = None

    def can_run(self, md: AttentionMetadata) -> bool:
        """A step of decodes (one new token per request, each with the drafts it verifies, if
        any), of few enough requests for the int4 copies."""
        return md.num_tokens - md.num_draft_tokens == md.num_reqs and md.num_reqs <= self.max_rows

    def run(
        self, input_ids: Tensor, positions: Tensor, kv_caches: list[tuple[Tensor, Tensor]], md: AttentionMetadata
    ) -> Tensor:
        """The final hidden states [num_tokens, hidden] of a decode step."""
        if kv_caches is not self._kv_caches:
            self._decoder.set_kv_caches([k for k, _ in kv_caches], [v for _, v in kv_caches])
            self._kv_caches = kv_caches
        return self._decoder.forward(
            input_ids, positions, md.block_tables, md.seq_lens, md.query_start_loc, md.slot_mapping
        )
