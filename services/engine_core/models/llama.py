"""The Llama family (Llama, Qwen2, Qwen3) as one decoder-only transformer.

    h = embed(tokens)
    for each layer:  h += attn(rms_norm(h)) ;  h += mlp(rms_norm(h))
    logits = lm_head(rms_norm(h))

Qwen2 adds a bias to the q/k/v projections; Qwen3 RMS-normalises each query and key
head before RoPE. Projections that read the same input are fused (q|k|v into one
weight, gate|up into another) and the residual adds are folded into the output
matmuls (addmm_), because a CPU decode step of one token is bound by reading weights
and by per-op dispatch, not by FLOPs. Parameters are plain tensors with
requires_grad=False, allocated uninitialised in the target dtype/device: the loader
fills them (load_weights) and nothing here ever needs autograd.

The large matrices (the layers' four, the embedding, the LM head) may have their own dtype,
weight_dtype: fp32 under bf16 activations on a CPU without native bf16 for a 4-bit checkpoint,
where the fused C++ step multiplies its bf16 rows by fp32 weights (fused_cpu/decode.py). The eager
forward then converts at those matmuls (models/dense.py); it serves as the tests' reference there,
not for speed (as it does, on emulated bf16 matmuls, for a float checkpoint's bf16 weights there).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.engine_core.attention.base import AttentionBackend, AttentionMetadata
from services.engine_core.model_config import ModelConfig
from services.engine_core.models import dense, int4
from services.engine_core.models.int4 import Int4Layer, Int4Weight
from services.engine_core.models.int8 import Int8Weight

_DENSE = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")
"""A layer's large matrices (weight_dtype)."""
# HF parameter names of one layer -> (our attribute, index of the shard in a fused weight).
_LAYER_WEIGHTS: dict[str, tuple[str, int | None]] = {
    "input_layernorm.weight": ("attn_norm", None),
    "self_attn.q_proj.weight": ("qkv_weight", 0),
    "self_attn.k_proj.weight": ("qkv_weight", 1),
    "self_attn.v_proj.weight": ("qkv_weight", 2),
    "self_attn.q_proj.bias": ("qkv_bias", 0),
    "self_attn.k_proj.bias": ("qkv_bias", 1),
    "self_attn.v_proj.bias": ("qkv_bias", 2),
    "self_attn.q_norm.weight": ("q_norm", None),
    "self_attn.k_norm.weight": ("k_norm", None),
    "self_attn.o_proj.weight": ("o_weight", None),
    "post_attention_layernorm.weight": ("mlp_norm", None),
    "mlp.gate_proj.weight": ("gate_up_weight", 0),
    "mlp.up_proj.weight": ("gate_up_weight", 1),
    "mlp.down_proj.weight": ("down_weight", None),
}
# Present in some checkpoints, derived (not learned) state: nothing to load.
_IGNORED_WEIGHTS = re.compile(r".*rotary_emb\.inv_freq$")


class WeightError(ValueError):
    """A checkpoint that does not fit the model: missing, unexpected or misshapen tensors."""


def _param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Per-pair rotation frequencies, float32 [head_dim / 2], as transformers computes them."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3.1: stretch low frequencies by `factor`, keep high ones, interpolate between.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [T, heads, head_dim] in the half-split (GPT-NeoX) layout.

    cos is [T, 1, head_dim] (the half-size table repeated twice) and sin the same with its
    first half negated, so rotate_half(x) * sin == roll(x) * sin: three ops in all, since
    on a CPU each extra small op costs as much as the arithmetic."""
    return (x * cos).addcmul_(x.roll(x.shape[-1] // 2, dims=-1), sin)


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | None, weight_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        hidden, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.eps = cfg.rms_norm_eps
        self.scale = d**-0.5
        self.hidden_shape = (hidden,)
        self.shard_sizes = {
            "qkv_weight": (cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d),
            "qkv_bias": (cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d),
            "gate_up_weight": (cfg.intermediate_size, cfg.intermediate_size),
        }
        qkv_rows = sum(self.shard_sizes["qkv_weight"])
        wdtype = weight_dtype or dtype
        self.attn_norm = _param((hidden,), dtype, device)
        self.qkv_weight = _param((qkv_rows, hidden), wdtype, device)
        self.qkv_bias = _param((qkv_rows,), dtype, device) if cfg.attention_bias else None
        self.q_norm = _param((d,), dtype, device) if cfg.qk_norm else None
        self.k_norm = _param((d,), dtype, device) if cfg.qk_norm else None
        self.o_weight = _param((hidden, cfg.num_heads * d), wdtype, device)
        self.mlp_norm = _param((hidden,), dtype, device)
        self.gate_up_weight = _param((2 * cfg.intermediate_size, hidden), wdtype, device)
        self.down_weight = _param((hidden, cfg.intermediate_size), wdtype, device)
        # Set by quantize_int4: steps of up to int4_max_rows rows use these instead.
        self.int4_max_rows = 0
        self.int4: Int4Layer | None = None
        # Set by CausalLM.pad_dense_calls: dense calls of fewer rows are padded to this many.
        self.min_dense_rows = 1

    @torch.no_grad()
    def quantize_int4(self, max_rows: int) -> None:
        self.int4 = Int4Layer.quantize(self.qkv_weight, self.o_weight, self.gate_up_weight, self.down_weight)
        self.int4_max_rows = max_rows

    def int4_for(self, rows: int) -> Int4Layer | None:
        """The int4 weights a step of `rows` rows multiplies by, or None for the dense ones."""
        return self.int4 if rows <= self.int4_max_rows else None

    def forward(
        self,
        h: Tensor,
        cos: Tensor,
        sin: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        md: AttentionMetadata,
        backend: AttentionBackend,
    ) -> None:
        """Advance the residual stream h [T, hidden] through this layer, in place."""
        q, k, v = self.attn_in(h, cos, sin)
        backend.write_kv(k, v, k_cache, v_cache, md)
        attn = backend.forward(q, k, v, k_cache, v_cache, md, self.scale)
        self.attn_out_mlp(h, attn)

    def attn_in(self, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Everything before attention: h [T, hidden] -> q [T, heads, d], k and v [T, kv_heads, d]."""
        n, n_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        t = h.shape[0]
        q4 = self.int4_for(t)
        x = F.rms_norm(h, self.hidden_shape, self.attn_norm, self.eps)
        if q4 is not None:
            qkv = q4.qkv(x)
            if self.qkv_bias is not None:
                qkv += self.qkv_bias
        else:
            qkv = dense.linear(x, self.qkv_weight, self.qkv_bias, self.min_dense_rows)
        # q and k sit side by side in qkv, so they are normalised and rotated as one tensor.
        qk, v = qkv.view(t, n + 2 * n_kv, d).split((n + n_kv, n_kv), dim=1)
        if self.q_norm is not None and self.k_norm is not None:
            qk = F.rms_norm(qk, (d,), eps=self.eps)
            qk[:, :n] *= self.q_norm
            qk[:, n:] *= self.k_norm
        q, k = apply_rope(qk, cos, sin).split((n, n_kv), dim=1)
        return q, k, v

    def attn_out_mlp(self, h: Tensor, attn: Tensor) -> Tensor:
        """Everything after attention: adds the output projection of attn [T, heads, d] and
        then the MLP to h [T, hidden], in place; returns h."""
        q4 = self.int4_for(h.shape[0])
        attn = attn.reshape(h.shape[0], -1)
        if q4 is not None:
            h.add_(q4.o(attn))
        else:
            dense.addmm_(h, attn, self.o_weight.t(), self.min_dense_rows)
        x = F.rms_norm(h, self.hidden_shape, self.mlp_norm, self.eps)
        if q4 is not None:
            gate_up = q4.gate_up(x)
        else:
            gate_up = dense.linear(x, self.gate_up_weight, min_rows=self.min_dense_rows)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate, inplace=True).mul_(up)
        if q4 is not None:
            h.add_(q4.down(act))
        else:
            dense.addmm_(h, act, self.down_weight.t(), self.min_dense_rows)
        return h


class CausalLM(nn.Module):
    # Buffers, declared for the type checker (nn.Module's __getattr__ types them as Tensor | Module).
    rope_cos: Tensor
    rope_sin: Tensor

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
        max_positions: int | None = None,
        weight_dtype: torch.dtype | None = None,
    ) -> None:
        """max_positions: how many positions the RoPE table covers (default the model's context);
        weight_dtype: the large matrices' dtype (default dtype, the activations')."""
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.hidden_shape = (cfg.hidden_size,)
        wdtype = weight_dtype or dtype
        self.embed = _param((cfg.vocab_size, cfg.hidden_size), wdtype, device)
        # An nn.ModuleList (registers the layers); torch's stubs do not let it say it holds DecoderLayers.
        self.layers: Sequence[DecoderLayer] = nn.ModuleList(  # type: ignore[assignment]
            DecoderLayer(cfg, dtype, device, wdtype) for _ in range(cfg.num_layers)
        )
        self.norm = _param((cfg.hidden_size,), dtype, device)
        self.lm_head = None if cfg.tie_word_embeddings else _param((cfg.vocab_size, cfg.hidden_size), wdtype, device)
        # Set by quantize_lm_head: steps of up to lm_head_max_rows logits rows multiply by it instead.
        self.lm_head_quantized: Int4Weight | Int8Weight | None = None
        self.lm_head_max_rows = 0
        # Set where decode steps run fused (fused_cpu/decode.py dense_calls): the most rows per
        # dense head call for which every row gets its lone bits (0: one call for all rows), and
        # the multiple of rows every dense head call is padded to.
        self.dense_head_chunk = 0
        self.dense_head_multiple = 1
        # Set where bf16 dense weights sit on a CPU without native bf16 (fused_cpu/decode.py widen):
        # steps of up to bf16_head_max_rows logits rows (without drafts) take the extension's
        # row-invariant bf16 kernel, x [M, K] @ head.T -> fp32 (csrc/bf16_matmul.h), and larger
        # ones an fp32 copy of the head (widen_head), which the library multiplies natively.
        self.bf16_head_kernel: Callable[[Tensor, Tensor], Tensor] | None = None
        self.bf16_head_max_rows = 0
        self.widen_head = False
        # Set by pad_dense_calls (the exact mode where the GEMM needs it: models/dense.py).
        self.min_dense_rows = 1
        # Angles in float32 then cast, as transformers does, so bf16 models round the same way.
        positions = torch.arange(max_positions or cfg.max_position_embeddings, dtype=torch.float32)
        angles = torch.outer(positions, rope_inv_freq(cfg)).to(device)
        cos, sin = angles.cos(), angles.sin()
        self.register_buffer("rope_cos", torch.cat((cos, cos), -1).to(dtype), persistent=False)
        self.register_buffer("rope_sin", torch.cat((-sin, sin), -1).to(dtype), persistent=False)

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        kv_caches: list[tuple[Tensor, Tensor]],
        md: AttentionMetadata,
        backend: AttentionBackend,
    ) -> Tensor:
        """input_ids, positions: int64 [T]. Returns the final-normed hidden states [T, hidden]."""
        h = F.embedding(input_ids, self.embed).to(self.dtype)
        cos = self.rope_cos.index_select(0, positions).unsqueeze(1)
        sin = self.rope_sin.index_select(0, positions).unsqueeze(1)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            layer(h, cos, sin, k_cache, v_cache, md, backend)
        return F.rms_norm(h, self.hidden_shape, self.norm, self.cfg.rms_norm_eps)

    def quantize_int4(self, max_rows: int | None = None) -> bool:
        """Give every layer int4 copies of its matrices for steps of up to max_rows rows (by
        default where the int4 kernel beats the dense weights' dtype: int4.max_rows; the
        embedding and LM head stay dense). False, and nothing changes, where the kernel does
        not apply: not on a CPU, or a matrix shape it cannot pack."""
        layer = self.layers[0]
        matrices = (layer.qkv_weight, layer.o_weight, layer.gate_up_weight, layer.down_weight)
        if not all(int4.supported(w) for w in matrices):
            return False
        rows = int4.max_rows(layer.qkv_weight.dtype) if max_rows is None else max_rows
        for layer in self.layers:
            layer.quantize_int4(rows)
        return True

    def quantize_lm_head(self, bits: int) -> bool:
        """Give the LM head a weight-only copy (with int4 layers, after quantize_int4): int8 per
        output row (models/int8.py: lossless in practice, half of bf16's bytes) or int4 in groups
        (a quarter, but lossy). Steps of up to lm_head_max_rows logits rows multiply by it: the
        head's own cutoff, since the int8 kernel stays ahead of the dense head far past where the
        layers' int4 kernel falls behind. False, and nothing changes, where the kernel cannot
        take the matrix."""
        head = self.embed if self.lm_head is None else self.lm_head
        if bits == 8:
            q8 = Int8Weight.quantize(head)
            self.lm_head_quantized, self.lm_head_max_rows = q8, q8.max_rows
            return True
        if bits != 4:
            raise ValueError(f"the LM head is quantized to 8 or 4 bits, not {bits}")
        if not int4.supported(head):
            return False
        self.lm_head_quantized, self.lm_head_max_rows = Int4Weight.quantize(head), int4.max_rows(head.dtype)
        return True

    @torch.no_grad()
    def cast_dense(self, dtype: torch.dtype) -> None:
        """The large matrices (the layers' four, the embedding, the LM head) in dtype, one at a
        time (so the memory peak is the old copy and one new matrix)."""
        owners: list[tuple[nn.Module, str]] = [(layer, n) for layer in self.layers for n in _DENSE]
        for module, name in [*owners, (self, "embed"), (self, "lm_head")]:
            w = getattr(module, name)
            if w is not None and w.dtype != dtype:
                setattr(module, name, nn.Parameter(w.to(dtype), requires_grad=False))

    def pad_dense_calls(self, min_rows: int) -> None:
        """Every dense matmul (the layers' and the LM head's) of fewer than min_rows rows is padded
        to min_rows (models/dense.py)."""
        self.min_dense_rows = min_rows
        for layer in self.layers:
            layer.min_dense_rows = min_rows

    def compute_logits(self, hidden: Tensor, rows_without_drafts: int | None = None) -> Tensor:
        """hidden [N, hidden] (rows of forward's output) -> float32 logits [N, vocab].

        rows_without_drafts: in a step that verifies drafts, the rows it would have without them
        (one per sampled request). The head is chosen by that count, so a draft's logits come
        from the head its lone decode would use: the quantized kernels are row-invariant
        (tests/engine_core/fused_cpu/test_row_invariance.py), so they are then the same bits. The
        dense head is not row-invariant across row counts, but calls of up to dense_head_chunk
        rows give each row its lone bits: the rows go in calls of that many where the step
        without drafts would be one call (each padded to a multiple of dense_head_multiple rows).
        A head of another dtype than hidden's (fp32 under bf16 activations) multiplies the rows
        converted to its own, and its logits are not rounded to the activations' dtype."""
        rows = hidden.shape[0] if rows_without_drafts is None else rows_without_drafts
        if self.lm_head_quantized is not None and rows <= self.lm_head_max_rows:
            return self.lm_head_quantized(hidden).float()
        head: Tensor = self.embed if self.lm_head is None else self.lm_head
        if self.bf16_head_kernel is not None and rows <= self.bf16_head_max_rows:
            return self.bf16_head_kernel(hidden, head)
        if self.widen_head:
            head = head.float()
        hidden = hidden.to(head.dtype)
        chunk, multiple = self.dense_head_chunk, self.dense_head_multiple
        if rows <= chunk < hidden.shape[0]:
            return torch.cat([dense.linear(part, head, multiple=multiple) for part in hidden.split(chunk)]).float()
        return dense.linear(hidden, head, min_rows=self.min_dense_rows, multiple=multiple).float()

    def weight_targets(self) -> dict[str, Tensor]:
        """Every checkpoint tensor the model expects, by HF name, mapped to the view of our
        parameter it fills (a row range of a fused weight, or the whole parameter)."""
        targets: dict[str, Tensor] = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        if self.lm_head is not None:
            targets["lm_head.weight"] = self.lm_head
        for i, layer in enumerate(self.layers):
            for hf_name, (attr, shard) in _LAYER_WEIGHTS.items():
                param = getattr(layer, attr)
                if param is None:
                    continue
                if shard is not None:
                    sizes = layer.shard_sizes[attr]
                    param = param.narrow(0, sum(sizes[:shard]), sizes[shard])
                targets[f"model.layers.{i}.{hf_name}"] = param
        return targets

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Copy (HF name, tensor) pairs into the parameters, casting to their dtype/device.
        Raises WeightError naming the tensor on anything unexpected, misshapen or missing."""
        targets = self.weight_targets()
        for name, tensor in weights:
            if _IGNORED_WEIGHTS.match(name) or (name == "lm_head.weight" and self.lm_head is None):
                continue  # a tied checkpoint may still store the (identical) output matrix
            target = targets.pop(name, None)
            if target is None:
                raise WeightError(f"unexpected weight {name} {tuple(tensor.shape)} (or given twice)")
            if target.shape != tensor.shape:
                raise WeightError(f"weight {name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
            target.copy_(tensor)
        if targets:
            listed = ", ".join(sorted(targets)[:8]) + (", ..." if len(targets) > 8 else "")
            raise WeightError(f"{len(targets)} weights missing from the checkpoint: {listed}")
