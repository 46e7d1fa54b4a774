"""The model facts both the tokenizer pool and the engine core depend on, resolved in one
place so the two processes cannot disagree: the context length (`max_model_len`), the
vocabulary size (to validate prompt token ids) and the token ids that end generation
(`eos_token_ids`).

GGUF metadata is read with a minimal header parser: gguf.GGUFReader also indexes
every tensor and takes ~2 s on the bundled model, while the key/value section
alone parses in milliseconds.
"""

from __future__ import annotations

import functools
import json
import logging
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

from shared.config import EngineConfig
from shared.model_files import ModelFiles, ModelFormat, resolve_model

log = logging.getLogger(__name__)

# GGUF value type -> struct format (little-endian); 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING = 8
_GGUF_ARRAY = 9
# Arrays longer than this (the vocabulary, the merges) are skipped; only their length is kept.
_GGUF_MAX_ARRAY = 64
_U64 = struct.Struct("<Q")

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")
_DEFAULT_CONTEXT = 2048


@dataclass(frozen=True)
class GGUFArray:
    """A long GGUF array: its items are not read."""

    length: int


@dataclass(frozen=True)
class ModelInfo:
    context_length: int
    """The model's own (max_position_embeddings or the GGUF context_length)."""
    vocab_size: int | None
    """The embedding size: token ids at or above it would crash the engine. None: unknown."""
    eos_token_ids: list[int]
    """See eos_token_ids()."""


def read_gguf_metadata(path: str) -> dict[str, Any]:
    """The key/value metadata of a GGUF file (v2+); long arrays become GGUFArray."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        (version,) = struct.unpack_from("<I", mm, 4)
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        (n_kv,) = struct.unpack_from("<Q", mm, 16)
        pos = 24
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = _gguf_string(mm, pos)
            (vtype,) = struct.unpack_from("<I", mm, pos)
            meta[key], pos = _gguf_value(mm, pos + 4, vtype)
        return meta


def _gguf_string(mm: mmap.mmap, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", mm, pos)
    return mm[pos + 8 : pos + 8 + n].decode("utf-8", errors="replace"), pos + 8 + n


def _gguf_value(mm: mmap.mmap, pos: int, vtype: int) -> tuple[Any, int]:
    if vtype in _GGUF_SCALARS:
        fmt = _GGUF_SCALARS[vtype]
        return struct.unpack_from(fmt, mm, pos)[0], pos + struct.calcsize(fmt)
    if vtype == _GGUF_STRING:
        return _gguf_string(mm, pos)
    if vtype != _GGUF_ARRAY:
        raise ValueError(f"unknown GGUF value type {vtype}")
    itype, count = struct.unpack_from("<IQ", mm, pos)
    pos += 12
    if count > _GGUF_MAX_ARRAY:
        if itype in _GGUF_SCALARS:
            return GGUFArray(count), pos + count * struct.calcsize(_GGUF_SCALARS[itype])
        if itype == _GGUF_STRING:  # the vocabulary, the merges: hop over each string's bytes
            for _ in range(count):
                pos += 8 + _U64.unpack_from(mm, pos)[0]
            return GGUFArray(count), pos
        for _ in range(count):  # other variable-size items: walk them
            _, pos = _gguf_value(mm, pos, itype)
        return GGUFArray(count), pos
    items = []
    for _ in range(count):
        item, pos = _gguf_value(mm, pos, itype)
        items.append(item)
    return items, pos


def _ids(value: Any) -> list[int]:
    """eos_token_id fields are an int, a list of ints, or absent."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _unique(ids: list[int]) -> list[int]:
    return list(dict.fromkeys(ids))


def _gguf_info(path: str) -> ModelInfo:
    st = os.stat(path)
    return _gguf_info_of(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _gguf_info_of(path: str, _mtime_ns: int, _size: int) -> ModelInfo:
    """Read once per process (every process asks several times) and file version."""
    meta = read_gguf_metadata(path)
    arch = meta.get("general.architecture", "llama")
    context = meta.get(f"{arch}.context_length") or _DEFAULT_CONTEXT
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = tokens.length if isinstance(tokens, GGUFArray) else len(tokens or []) or None
    # transformers' GenerationConfig for a GGUF stops at tokenizer.ggml.eos_token_id only;
    # end-of-turn / end-of-message tokens (llama.cpp's EOG set) end a turn just the same.
    eos = _unique(
        [
            meta[k]
            for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
            if k in meta
        ]
    )
    return ModelInfo(context_length=int(context), vocab_size=vocab, eos_token_ids=eos)


def _text_config(config: dict) -> dict:
    # Multimodal configs nest the language model's settings.
    nested = config.get("text_config")
    return {**config, **nested} if isinstance(nested, dict) else config


def _hf_info(model: ModelFiles) -> ModelInfo:
    config = _text_config(model.hf_config())
    context = next((config[k] for k in _CONTEXT_KEYS if isinstance(config.get(k), int)), None)
    if context is None:
        log.warning("%s names no context length; assuming %d", model.path, _DEFAULT_CONTEXT)
        context = _DEFAULT_CONTEXT
    eos = _ids(config.get("eos_token_id"))
    if model.format is ModelFormat.HF_DIR:
        gen_path = os.path.join(model.path, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                # transformers' generate() reads the generation config, not config.json.
                eos = _ids(json.load(f).get("eos_token_id")) or eos
    vocab = config.get("vocab_size")
    return ModelInfo(
        context_length=int(context), vocab_size=vocab if isinstance(vocab, int) else None, eos_token_ids=eos
    )


def model_info(model: ModelFiles) -> ModelInfo:
    if model.format is ModelFormat.GGUF:
        return _gguf_info(model.path)
    return _hf_info(model)


def max_model_len(config: EngineConfig, model: ModelFiles | None = None) -> int:
    """The context length every process enforces: --max-model-len, capped at the model's own
    (RoPE tables and trained positions end there)."""
    own = model_info(model or resolve_model(config.model)).context_length
    return min(config.max_model_len or own, own)


def eos_token_ids(model: ModelFiles, tokenizer_eos: int | None = None, own_tokenizer: bool = True) -> list[int]:
    """The token ids that end generation: the model's (GGUF: eos, eot and eom; HF: the
    generation config's list, else config.json's) and, as vLLM adds it, the tokenizer's own
    EOS, unless the tokenizer is borrowed from another model that names EOS ids of its own."""
    eos = list(model_info(model).eos_token_ids)
    if tokenizer_eos is not None and (own_tokenizer or not eos) and tokenizer_eos not in eos:
        eos.append(tokenizer_eos)
    return eos
