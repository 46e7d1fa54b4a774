"""The model's own tokenizer and chat template, fast to load.

transformers builds a GGUF model's tokenizer from its metadata in ~4 s, and importing
transformers alone costs ~1-2 s per process. So transformers runs once per tokenizer
source (a cache miss): it writes the fast tokenizer's tokenizer.json plus the chat
template and special tokens into a cache directory. Every later load reads that with
the `tokenizers` library directly and renders the chat template with a jinja2
environment configured as transformers configures its own, so the ids are the same.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import msgspec
import tokenizers

from services.tokenizer_pool.tool_prompt import messages_for_template, template_renders_tools
from shared.config import BUNDLED_MODEL, EngineConfig, resolve_cache_dir
from shared.errors import InvalidRequest
from shared.model_files import ModelFiles, ModelFormat, bundled_model_path, resolve_model
from shared.model_info import eos_token_ids, max_model_len, model_info
from shared.protocol import ChatMessage

log = logging.getLogger(__name__)

# Bump when the cached layout or its meaning changes.
_CACHE_FORMAT = 1
_META_FILE = "novainfer_tokenizer.json"
_TOKENIZER_FILE = "tokenizer.json"
# Files of an HF directory that change what its tokenizer does.
_HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPIECE_SPACE = "\u2581"


@dataclass(frozen=True)
class TokenizerSource:
    path: str
    """A .gguf file or an HF directory."""
    gguf: bool


class Tokenizer:
    """encode / decode / chat template / per-token bytes for one model."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_token_ids: Sequence[int],
        max_model_len: int,
        vocab_size: int | None = None,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.eos_token_ids = list(eos_token_ids)
        self.max_model_len = max_model_len
        self._backend_size = backend.get_vocab_size(with_added_tokens=True)
        self.vocab_size = vocab_size or self._backend_size
        """Valid prompt token ids are below this (the model's embedding size)."""
        self.chat_template = chat_template
        # The template sees bos_token, eos_token, ... as transformers passes them.
        self.special_tokens = dict(special_tokens or {})
        added = backend.get_added_tokens_decoder()
        self._added = {i: t.content for i, t in added.items()}
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        # The decoder's JSON names its parts (to_str() would serialize the whole vocabulary).
        decoder_json = backend.decoder.__getstate__().decode() if backend.decoder is not None else ""
        self._byte_level = '"ByteLevel"' in decoder_json
        self._spiece = "ByteFallback" in decoder_json or "Metaspace" in decoder_json
        self._bytes_cache: dict[int, bytes] = {}
        # ByteFallback decodes a run of <0xNN> tokens as one unit and turns every token of an
        # invalid run into U+FFFD, so a later byte token can change the text of earlier ones.
        byte_ids = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256)) if self._spiece else ()
        self.byte_fallback_ids = frozenset(i for i in byte_ids if i is not None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # Random-weight models can sample ids the tokenizer lacks: they decode to nothing.
        # (transformers' clean_up_tokenization_spaces is not applied: it would make a
        # stream's text depend on tokens not yet generated.)
        if token_ids and (min(token_ids) < 0 or max(token_ids) >= self._backend_size):
            token_ids = [t for t in token_ids if 0 <= t < self._backend_size]
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def is_silent(self, token_id: int, skip_special_tokens: bool) -> bool:
        """Whether decode() drops this token entirely."""
        if not 0 <= token_id < self._backend_size:
            return True
        return skip_special_tokens and token_id in self.special_ids

    def render_chat(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """tools: OpenAI function tools, rendered by the template if it has a tool section,
        else by the default tool prompt (see tool_prompt.py). template_kwargs: extra template
        variables (the request's chat_template_kwargs, e.g. Qwen3's enable_thinking)."""
        if not self.chat_template:
            raise InvalidRequest("this model has no chat template: use the completions API", param="messages")
        chat = [
            {k: v for k, v in msgspec.structs.asdict(m).items() if v is not None}
            if isinstance(m, ChatMessage)
            else dict(m)
            for m in messages
        ]
        chat, template_tools = messages_for_template(
            chat, [dict(t) for t in tools] if tools else None, template_renders_tools(self.chat_template)
        )
        variables = {
            **self.special_tokens,
            **(template_kwargs or {}),
            "messages": chat,
            "tools": template_tools,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return _compile_template(self.chat_template).render(**variables)
        except jinja2.TemplateError as e:  # e.g. raise_exception('roles must alternate'): bad input
            raise InvalidRequest(f"chat template: {e}", param="messages") from e

    def apply_chat_template(
        self, messages: Sequence[ChatMessage | Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        # As transformers: the template writes the special tokens itself.
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (b'' for ids the tokenizer lacks)."""
        cached = self._bytes_cache.get(token_id)
        if cached is None:
            cached = self._bytes_cache[token_id] = self._compute_bytes(token_id)
        return cached

    def token_text(self, token_id: int) -> str:
        """A token as logprobs show it; a partial UTF-8 sequence reads `bytes:\\xe2\\x80` as OpenAI's."""
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def _compute_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self.backend.id_to_token(token_id) if 0 <= token_id < self._backend_size else None
        if piece is None:
            return b""
        if self._byte_level:
            decode_map = _byte_level_decoder()
            if all(c in decode_map for c in piece):
                return bytes(decode_map[c] for c in piece)
        if self._spiece:
            match = _BYTE_TOKEN.match(piece)
            if match:
                return bytes([int(match.group(1), 16)])
            return piece.replace(_SPIECE_SPACE, " ").encode()
        return self.decode([token_id], skip_special_tokens=False).encode()


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table, inverted."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class _GenerationTag(jinja2.ext.Extension):
    # transformers' {% generation %} marks assistant spans for training masks; rendering ignores it.
    tags = {"generation"}  # noqa: RUF012 - jinja2.ext.Extension declares tags as a plain class attribute

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes HTML characters, which chat templates must not do.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    # Mirrors transformers.utils.chat_template_utils._cached_compile_jinja_template.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


# --- locating the tokenizer and caching it ----------------------------------------------


def tokenizer_source(engine_config: EngineConfig, model: ModelFiles) -> TokenizerSource:
    """Where the tokenizer comes from: --tokenizer, else the model, else the bundled model's."""
    if engine_config.tokenizer:
        if engine_config.tokenizer == BUNDLED_MODEL:
            return TokenizerSource(bundled_model_path(), gguf=True)
        path = os.path.abspath(os.path.expanduser(engine_config.tokenizer))
        if os.path.isfile(path) and path.endswith(".gguf"):
            return TokenizerSource(path, gguf=True)
        if os.path.isdir(path):
            if any(os.path.isfile(os.path.join(path, f)) for f in _HF_TOKENIZER_FILES):
                return TokenizerSource(path, gguf=False)
            ggufs = [f for f in os.listdir(path) if f.endswith(".gguf")]
            if len(ggufs) == 1:
                return TokenizerSource(os.path.join(path, ggufs[0]), gguf=True)
        raise FileNotFoundError(
            f"tokenizer {engine_config.tokenizer!r}: expected a .gguf file or a directory with tokenizer files"
        )
    if model.format is ModelFormat.GGUF:
        return TokenizerSource(os.path.abspath(model.path), gguf=True)
    if model.format is ModelFormat.HF_DIR:
        return TokenizerSource(os.path.abspath(model.path), gguf=False)
    return TokenizerSource(bundled_model_path(), gguf=True)  # random weights: no tokenizer of its own


def _cache_key(source: TokenizerSource) -> str:
    files = [source.path] if source.gguf else [os.path.join(source.path, f) for f in _HF_TOKENIZER_FILES]
    stats = [(f, st.st_size, st.st_mtime_ns) for f in files if (st := _stat(f)) is not None]
    # A new transformers may convert differently: its version is part of the key.
    raw = json.dumps([_CACHE_FORMAT, importlib.metadata.version("transformers"), stats])
    name = os.path.basename(source.path.rstrip("/")) or "tokenizer"
    return f"{name}-{hashlib.sha256(raw.encode()).hexdigest()[:16]}"


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def cache_root(cache_dir: str | None) -> str:
    return os.path.join(resolve_cache_dir(cache_dir), "tokenizers")


def cached_tokenizer_dir(source: TokenizerSource, cache_dir: str | None) -> str:
    """The cache entry for source, building it (with transformers) if missing."""
    root = cache_root(cache_dir)
    os.makedirs(root, exist_ok=True)
    entry = os.path.join(root, _cache_key(source))
    if os.path.isfile(os.path.join(entry, _META_FILE)):
        return entry
    # Several workers start at once: one converts, the others wait and reuse its result.
    with open(entry + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(entry, _META_FILE)):
            tmp = tempfile.mkdtemp(dir=root, prefix=".building-")
            try:
                _build_cache_entry(source, tmp)
                shutil.rmtree(entry, ignore_errors=True)  # a half-written entry from a crash
                os.rename(tmp, entry)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _build_cache_entry(source: TokenizerSource, dest: str) -> None:
    log.info("building the tokenizer of %s with transformers (cached afterwards)", source.path)
    from transformers import AutoTokenizer  # slow import: only on a cache miss

    if source.gguf:
        directory, name = os.path.split(source.path)
        hf = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    else:
        hf = AutoTokenizer.from_pretrained(source.path)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{source.path}: transformers built no fast tokenizer for it")
    backend.save(os.path.join(dest, _TOKENIZER_FILE))
    template = hf.chat_template
    if isinstance(template, dict):  # several named templates: the default one serves chat
        template = template.get("default")
    meta = {
        "format": _CACHE_FORMAT,
        "source": source.path,
        "chat_template": template,
        "special_tokens": {k: v for k, v in hf.special_tokens_map.items() if isinstance(v, str)},
        "eos_token_id": hf.eos_token_id,
    }
    with open(os.path.join(dest, _META_FILE), "w") as f:
        json.dump(meta, f)


def load_tokenizer(engine_config: EngineConfig) -> Tokenizer:
    model = resolve_model(engine_config.model)
    source = tokenizer_source(engine_config, model)
    entry = cached_tokenizer_dir(source, engine_config.cache_dir)
    with open(os.path.join(entry, _META_FILE)) as f:
        meta = json.load(f)
    backend = tokenizers.Tokenizer.from_file(os.path.join(entry, _TOKENIZER_FILE))
    own_tokenizer = not engine_config.tokenizer and model.format is not ModelFormat.CONFIG_JSON
    tokenizer_eos = meta.get("eos_token_id")
    return Tokenizer(
        backend,
        eos_token_ids=eos_token_ids(model, tokenizer_eos if isinstance(tokenizer_eos, int) else None, own_tokenizer),
        max_model_len=max_model_len(engine_config, model),
        vocab_size=model_info(model).vocab_size,
        chat_template=meta.get("chat_template"),
        special_tokens=meta.get("special_tokens"),
    )
