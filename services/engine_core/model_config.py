"""The architecture facts the model code needs, read from an HF config.json or GGUF metadata.
(The facts the tokenizer pool needs too, context length and EOS ids, are shared/model_info.py's.)

One flat record for the whole Llama family: Qwen2 differs from Llama only by a bias on
the q/k/v projections, Qwen3 only by an RMSNorm on each query/key head. Anything the
model code does not implement (sliding windows, other RoPE scalings, biases elsewhere)
is rejected here, so a model never loads and then silently computes something else.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gguf import GGUFReader

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    """None (plain RoPE) or {'rope_type': 'llama3', factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings}."""
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    """Bias on the q/k/v projections (Qwen2); o_proj never has one."""
    qk_norm: bool
    """RMSNorm over head_dim on each query and key head before RoPE (Qwen3)."""

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}: supported are {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls(**json.loads(text))

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> ModelConfig:
        arch = _hf_architecture(d)
        _reject(d.get("hidden_act", "silu") != "silu", f"hidden_act {d.get('hidden_act')!r} (only silu)")
        _reject(bool(d.get("mlp_bias")), "mlp_bias")
        _reject(bool(d.get("use_sliding_window")), "sliding-window attention")
        _reject("sliding_attention" in (d.get("layer_types") or []), "sliding-window attention layers")
        if arch == "qwen2":
            attention_bias = True  # Qwen2 always has q/k/v biases; its config has no flag
        else:
            # Llama/Qwen3's flag would also put a bias on o_proj, which no published model uses.
            _reject(bool(d.get("attention_bias")), f"attention_bias on {arch}")
            attention_bias = False

        # transformers >= 5 nests rope_theta into rope_parameters; published configs use the
        # older rope_theta + rope_scaling pair.
        rope = d.get("rope_parameters")
        if rope is not None:
            theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
            scaling = rope
        else:
            theta = float(d.get("rope_theta", 10000.0))
            scaling = d.get("rope_scaling")
        _reject(float((rope or {}).get("partial_rotary_factor", 1.0)) != 1.0, "partial rotary")

        num_heads = int(d["num_attention_heads"])
        return cls(
            architecture=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // num_heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=_rope_scaling(scaling),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            qk_norm=arch == "qwen3",
        )

    @classmethod
    def from_gguf(cls, reader: GGUFReader) -> ModelConfig:
        """From a gguf.GGUFReader's metadata ('{arch}.*' and 'tokenizer.ggml.*' keys)."""

        def get(key: str, default: Any = None) -> Any:
            field = reader.get_field(key)
            return default if field is None else field.contents()

        arch = get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported GGUF architecture {arch!r}: supported are {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        tensor_names = {t.name for t in reader.tensors}
        # llama.cpp bakes Llama-3.1-style scaling into a rope_freqs tensor, not metadata.
        _reject("rope_freqs.weight" in tensor_names, "GGUF rope_freqs (Llama 3.1+ RoPE scaling)")
        _reject(get(f"{arch}.rope.scaling.type", "none") != "none", "GGUF RoPE scaling")
        vocab = get(f"{arch}.vocab_size")
        if vocab is None:
            embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
            vocab = int(embd.shape[-1])  # GGUF lists dims innermost first
        hidden = int(get(f"{arch}.embedding_length"))
        num_heads = int(get(f"{arch}.attention.head_count"))
        return cls(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get(f"{arch}.feed_forward_length")),
            num_layers=int(get(f"{arch}.block_count")),
            num_heads=num_heads,
            num_kv_heads=int(get(f"{arch}.attention.head_count_kv", num_heads)),
            head_dim=int(get(f"{arch}.attention.key_length", hidden // num_heads)),
            rms_norm_eps=float(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=None,
            max_position_embeddings=int(get(f"{arch}.context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias=arch == "qwen2",
            qk_norm=arch == "qwen3",
        )


def _reject(condition: bool, what: str) -> None:
    if condition:
        raise ValueError(f"unsupported model feature: {what}")


def _hf_architecture(d: dict[str, Any]) -> str:
    model_type = d.get("model_type")
    if model_type in SUPPORTED_ARCHITECTURES:
        return model_type
    for name in d.get("architectures") or []:
        if name in _HF_ARCHITECTURES:
            return _HF_ARCHITECTURES[name]
    raise ValueError(
        f"unsupported architecture (model_type={model_type!r}, "
        f"architectures={d.get('architectures')}): supported are {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ValueError(f"unsupported RoPE scaling {rope_type!r}: supported are none and llama3")
    missing = [k for k in _LLAMA3_ROPE_KEYS if k not in scaling]
    if missing:
        raise ValueError(f"llama3 RoPE scaling lacks {', '.join(missing)}")
    return {"rope_type": "llama3", **{k: scaling[k] for k in _LLAMA3_ROPE_KEYS}}
