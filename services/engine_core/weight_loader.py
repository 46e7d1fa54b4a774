"""Build the model for `--model` and fill its weights: GGUF, HF safetensors, or random.

Every source is turned into (HF parameter name, tensor) pairs and handed to
CausalLM.load_weights, which owns the mapping to fused parameters and the checks.
A GGUF file is dequantized to float32 once and cached on disk as safetensors (reading
its metadata and dequantizing take seconds; the cache loads in a fraction of that).
With int4 quantization (the CPU default for a Q4_0/Q4_1 GGUF, see run_mode.py) the layers also
get int4 copies of their matrices for small CPU steps (models/int4.py): the same weights as a
4-bit GGUF's, or lossy for other checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from services.engine_core.model_config import ModelConfig
from services.engine_core.models import CausalLM, build_model, int4
from services.engine_core.models.int4 import Int4Layer, Int4Weight
from services.engine_core.run_mode import resolve_quantization
from shared.config import EngineConfig, resolve_cache_dir
from shared.model_files import ModelFiles, ModelFormat, resolve_model
from shared.model_info import max_model_len

if TYPE_CHECKING:
    from gguf import GGUFReader

log = logging.getLogger(__name__)

INIT_STD = 0.02
# Past this, a float32 copy of a GGUF's weights costs more disk than re-dequantizing costs time.
GGUF_CACHE_MAX_BYTES = 4 << 30
_CACHE_CONFIG_KEY = "novainfer.model_config"
_CACHE_TYPES_KEY = "novainfer.gguf_layer_types"
# Bumped when the cache's content changes, so older caches are rebuilt rather than misread.
_CACHE_VERSION = 3  # 3: ModelConfig without token ids
# GGUF types of at most ~4.5 bits per weight: int4 copies of these lose little the file held.
FOUR_BIT_GGUF_TYPES = frozenset(
    {
        "Q4_0",
        "Q4_1",
        "Q4_K",
        "Q3_K",
        "Q2_K",
        "IQ4_NL",
        "IQ4_XS",
        "IQ3_XXS",
        "IQ3_S",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ2_S",
        "IQ1_S",
        "IQ1_M",
        "TQ1_0",
        "TQ2_0",
    }
)

# llama.cpp tensor names -> HF names ("{}" is the layer index).
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


def load_model(
    engine_config: EngineConfig, device: torch.device, dtype: torch.dtype, weight_dtype: torch.dtype | None = None
) -> tuple[CausalLM, ModelConfig]:
    """The model in `dtype` on `device` (its large matrices in weight_dtype if given: CausalLM),
    with int4 copies of its layer matrices where the (resolved) quantization says so:
    run_mode.resolve_quantization, once the checkpoint's weight types are known."""
    weight_dtype = weight_dtype or dtype
    files = resolve_model(engine_config.model)
    layer_types: frozenset[str] = frozenset()
    cache_dir = resolve_cache_dir(engine_config.cache_dir)
    if files.format is ModelFormat.GGUF:
        cfg, layer_types, weights = _gguf_weights(files.path, cache_dir)
    else:
        cfg = ModelConfig.from_hf_config(files.hf_config())
    quantization = resolve_quantization(engine_config, device, layer_types)
    if engine_config.int4_lm_head and quantization != "int4":
        raise ValueError("--int4-lm-head needs int4 quantization (--quantization int4, or auto on a Q4_0/Q4_1 GGUF)")
    # The RoPE table needs no more rows than the context every process enforces.
    model = build_model(
        cfg, dtype=dtype, device=device, max_positions=max_model_len(engine_config, files), weight_dtype=weight_dtype
    )
    if files.format is ModelFormat.GGUF:
        model.load_weights(weights)
    elif files.format is ModelFormat.HF_DIR:
        model.load_weights(_safetensors_weights(files))
    else:
        init_random_weights(model, engine_config.seed)
    if quantization == "int4":
        # Packing costs about as long as loading the rest (0.6 s for SmolLM2): a GGUF's int4
        # copies are cached beside its dequantized weights, keyed by the file, the dense dtype
        # they are packed from and the CPU capability torch's kernels run at (its packed layout
        # is that capability's: the same bytes mean other weights to its AVX2 and AVX-512 kernels).
        is_gguf = files.format is ModelFormat.GGUF
        variant = f"int4-{weight_dtype}|{torch.backends.cpu.get_cpu_capability()}"
        int4_cache = _gguf_cache_path(files.path, cache_dir, variant) if is_gguf else None
        _add_int4_copies(model, layer_types, int4_cache)
        if engine_config.int4_lm_head:
            if not model.quantize_lm_head(4):
                log.warning("the LM head's shape does not fit the int4 kernel: it stays dense")
        else:
            model.quantize_lm_head(8)
    return model.eval(), cfg


def _add_int4_copies(model: CausalLM, layer_types: frozenset[str], cache_path: str | None) -> None:
    if cache_path is None or not _read_int4_cache(model, cache_path):
        if not model.quantize_int4():
            log.warning("int4 weights do not fit this model's matrix shapes: running dense weights only")
            return
        if cache_path is not None:
            _write_int4_cache(model, cache_path)
    rows = model.layers[0].int4_max_rows
    if layer_types and layer_types <= FOUR_BIT_GGUF_TYPES:
        log.info(
            "int4 copies of the layers' %s weights for steps of up to %d rows", "/".join(sorted(layer_types)), rows
        )
    else:
        log.warning(
            "int4 copies for steps of up to %d rows re-quantize %s weights: lossy",
            rows,
            "/".join(sorted(layer_types)) or "the checkpoint's",
        )


@torch.no_grad()
def init_random_weights(model: CausalLM, seed: int) -> None:
    """Normal(0, INIT_STD) matrices, unit norms, zero biases: realistic shapes and magnitudes
    for performance work, drawn in place in the parameters' own dtype and device."""
    device = model.embed.device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm"):
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, INIT_STD, generator=gen)


def _safetensors_weights(files: ModelFiles) -> Iterator[tuple[str, torch.Tensor]]:
    index = os.path.join(files.path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(files.path, "model.safetensors")):
        names = ["model.safetensors"]
    else:
        names = sorted(n for n in os.listdir(files.path) if n.endswith(".safetensors"))
    for name in names:
        with safe_open(os.path.join(files.path, name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has keys() but is not iterable
                yield key, f.get_tensor(key)


# --- GGUF ---------------------------------------------------------------------------


def _gguf_cache_path(path: str, cache_dir: str, variant: str = "") -> str:
    """Where a conversion of the GGUF file at path is cached: keyed by the file's identity, the
    cache format and torch's version (packed layouts are the kernels'), and variant."""
    stat = os.stat(path)
    source = f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}|v{_CACHE_VERSION}"
    if variant:
        source += f"|{variant}|torch {torch.__version__}"
    key = hashlib.sha256(source.encode()).hexdigest()
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(cache_dir, f"{stem}-{key[:16]}{'-' + variant.split('-')[0] if variant else ''}.safetensors")


def _gguf_weights(path: str, cache_dir: str) -> tuple[ModelConfig, frozenset[str], Iterator[tuple[str, torch.Tensor]]]:
    """The config, the GGUF types of the layer matrices, and the weights (HF names, float32),
    from the cache when it is fresh."""
    cache_path = _gguf_cache_path(path, cache_dir)
    if os.path.isfile(cache_path):
        try:
            return _read_gguf_cache(cache_path)
        except Exception as e:  # a truncated or foreign file: rebuild it
            log.warning("ignoring unreadable GGUF cache %s: %s", cache_path, e)

    import gguf  # only the uncached path pays for it

    reader = gguf.GGUFReader(path)
    cfg = ModelConfig.from_gguf(reader)
    layer_types = frozenset(
        t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2
    )
    weights = _dequantize_gguf(reader, cfg)
    if sum(t.n_elements for t in reader.tensors) * 4 > GGUF_CACHE_MAX_BYTES:
        return cfg, layer_types, weights
    tensors = dict(weights)
    _write_gguf_cache(cache_path, cfg, layer_types, tensors)
    return cfg, layer_types, iter(tensors.items())


def _dequantize_gguf(reader: GGUFReader, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf.quants import dequantize

    for t in reader.tensors:
        array = dequantize(t.data, t.tensor_type)
        # Unquantized tensors come back as read-only views of the memory-mapped file.
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy()).float()
        name = _hf_name(t.name)
        if cfg.architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_heads if name.endswith("q_proj.weight") else cfg.num_kv_heads
            tensor = _unpermute_rope(tensor, heads)
        yield name, tensor


def _hf_name(gguf_name: str) -> str:
    """The HF name of a llama.cpp tensor; an unknown one passes through, so the model's
    load_weights reports it as unexpected under its own name."""
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    m = _GGUF_LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}"
    return gguf_name


def _unpermute_rope(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert_hf_to_gguf permutation of llama q/k rows (it interleaves
    each head's two RoPE halves); the inverse is transformers' reverse_permute."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _read_gguf_cache(path: str) -> tuple[ModelConfig, frozenset[str], Iterator[tuple[str, torch.Tensor]]]:
    f = safe_open(path, framework="pt")
    metadata = f.metadata()
    cfg = ModelConfig.from_json(metadata[_CACHE_CONFIG_KEY])
    layer_types = frozenset(filter(None, metadata[_CACHE_TYPES_KEY].split(",")))

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for key in f.keys():  # noqa: SIM118 - safe_open has keys() but is not iterable
            yield key, f.get_tensor(key)

    return cfg, layer_types, weights()


def _read_int4_cache(model: CausalLM, path: str) -> bool:
    """Give the layers the int4 copies cached at path; False (nothing changed) if there are none."""
    if not os.path.isfile(path):
        return False
    try:
        with safe_open(path, framework="pt") as f:
            copies = [
                Int4Layer(
                    *(
                        Int4Weight(f.get_tensor(f"{i}.{name}.packed"), f.get_tensor(f"{i}.{name}.scales_zeros"))
                        for name in Int4Layer._fields
                    )
                )
                for i in range(len(model.layers))
            ]
    except Exception as e:  # a truncated or foreign file: pack again (and rewrite it)
        log.warning("ignoring unreadable int4 cache %s: %s", path, e)
        return False
    for layer, copy in zip(model.layers, copies, strict=True):
        layer.int4, layer.int4_max_rows = copy, int4.max_rows(layer.qkv_weight.dtype)
    return True


def _write_int4_cache(model: CausalLM, path: str) -> None:
    tensors = {}
    for i, layer in enumerate(model.layers):
        assert layer.int4 is not None
        for name, weight in zip(Int4Layer._fields, layer.int4, strict=True):
            tensors[f"{i}.{name}.packed"] = weight.packed
            tensors[f"{i}.{name}.scales_zeros"] = weight.scales_zeros
    save_atomically(path, tensors, {}, "int4 weight copies")


def _write_gguf_cache(
    path: str, cfg: ModelConfig, layer_types: frozenset[str], tensors: dict[str, torch.Tensor]
) -> None:
    metadata = {_CACHE_CONFIG_KEY: cfg.to_json(), _CACHE_TYPES_KEY: ",".join(sorted(layer_types))}
    save_atomically(path, tensors, metadata, "dequantized GGUF weights")


def save_atomically(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str], what: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)  # atomic: concurrent engines never read a half-written cache
    except OSError as e:
        log.warning("could not cache %s at %s: %s", what, path, e)
        if os.path.exists(tmp):
            os.remove(tmp)
