"""One typed configuration object, built from CLI flags and NOVAINFER_* env vars.

Every process (gateway, tokenizer workers, engine cores, the launcher) parses the
same `Config`, so addresses and limits cannot drift between them. Precedence:
CLI flag > environment variable > default.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import itertools
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args, get_origin, get_type_hints

import msgspec

ENV_PREFIX = "NOVAINFER_"
BUNDLED_MODEL = "smollm2"
DEFAULT_CACHE_DIR = "~/.cache/novainfer"


def resolve_cache_dir(cache_dir: str | None = None) -> str:
    """The cache directory every process uses for EngineConfig.cache_dir (None: the default)."""
    return os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)


class EngineConfig(msgspec.Struct, kw_only=True):
    model: str = BUNDLED_MODEL
    """GGUF file, HF directory (config.json + safetensors), a config JSON (random weights), or 'smollm2'."""
    served_model_name: str | None = None
    """The model name clients send and /v1/models lists; default derived from --model."""
    tokenizer: str | None = None
    """Tokenizer source (GGUF file or HF directory); default: the model's own, or the bundled
    model's for a random-weight config that has none."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: bfloat16 on CUDA, and on a CPU with native bf16 dot products (AVX512_BF16 or AMX),
    else float32 (services/engine_core/run_mode.py)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    """auto: triton on CUDA, torch on CPU."""
    block_size: int = 16
    """Tokens per KV-cache block (the unit of paging and prefix caching)."""
    kv_cache_bytes: int = 1 << 30
    """KV-cache budget on CPU, in bytes."""
    gpu_memory_utilization: float = 0.90
    """Fraction of GPU memory the engine may use in total (weights, activations, KV cache)."""
    max_num_seqs: int = 128
    """Requests in one engine step (and the largest CUDA graph)."""
    max_num_batched_tokens: int = 1024
    """Tokens in one engine step: the prefill chunk size."""
    max_model_len: int | None = None
    """Defaults to the model's context length."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of prompt prefixes seen before."""
    num_threads: int | None = None
    """torch CPU threads; defaults to the cores this process may run on."""
    seed: int = 0
    """Seed for random weights and for sampling without a request seed."""
    enforce_eager: bool = False
    """Disable CUDA graphs."""
    int4_lm_head: bool = False
    """With int4 quantization (auto on a 4-bit GGUF, or --quantization int4): the LM head (the
    largest matrix, 49152 x 576 in SmolLM2, read whole every decode step) gets an int4 copy for
    the steps the int4 layers serve instead of the int8 one; re-quantized from the checkpoint's (Q8_0 in
    the bundled GGUF), so lossy: see docs/benchmarks.md."""
    compile_decode: bool = False
    """CPU only: run pure-decode steps through torch.compile'd (Inductor C++) layers, compiled at
    start-up for each batch size of the CUDA-graph ladder (1, 2, 4, 8, 16, 32, ... max_num_seqs) and
    cached on disk under cache_dir. Fewer, fused ops per token; output then differs from the exact
    fp32 eager mode in the last bits (greedy output may diverge after many tokens)."""
    fused_cpu_decode: bool = True
    """CPU, bf16 + int4 (the default fast mode): run each pure-decode step the int4 copies serve
    (up to 8 requests with AMX, 16 without) as one call into fused C++ kernels
    (services/engine_core/fused_cpu/: RMSNorm, RoPE + KV write, SiLU x mul, paged attention
    around torch's int4 matmuls) instead of ~900 eager ops. Built with the system C++ compiler
    at the first start and cached under cache_dir; without a compiler the engine warns and runs
    the eager path. Never used by --exact."""
    quantization: Literal["auto", "none", "int4"] = "auto"
    """auto: int4 on a CPU when the checkpoint's layer matrices are 4-bit GGUF (Q4_0/Q4_1, repacked
    as the file stores them), else none (a float checkpoint is not re-quantized unless asked: that
    is lossy). int4: steps of up to 8 rows (over bf16 on a CPU with AMX; else 16: models/int4.py)
    use int4 weight-only copies of the layer matrices, and steps of up to 128 logits rows an int8
    copy of the LM head (CPU only; ~1.8x single-stream decode; greedy output then depends
    on the batch)."""
    exact: bool = False
    """The exact mode: float32, no int4, no compiled decode. Greedy output is token for token
    transformers' and independent of the batch (what the parity tests run); on a CPU about 1.5x
    slower per token than the default. Conflicts with a --dtype or --quantization that says otherwise."""
    tool_call_parser: Literal["auto", "hermes", "llama3"] = "auto"
    """How chat outputs are parsed for tool calls under tool_choice auto: hermes
    (<tool_call> tags: Hermes, Qwen2.5/3, and the default tool prompt of templates without
    tools), llama3 (a bare JSON call); auto: chosen from the chat template."""
    reasoning_parser: Literal["auto", "deepseek_r1", "qwen3", "none"] = "auto"
    """How chat outputs are split into reasoning_content and content: qwen3 (a <think>...</think>
    block the model opens), deepseek_r1 (the output starts inside the thinking), none; auto:
    from the chat template (none when it has no <think>). Constraints and tool parsing apply
    to the answer only."""
    grammar_compile_timeout_s: float = 10.0
    """A structured-output grammar (JSON schema, regex, EBNF) that takes longer than this to
    compile fails its request with a 400; the engine keeps serving everyone else."""
    grammar_cache_mb: int = 256
    """Memory for compiled grammars, reused by requests with the same schema (LRU)."""
    grammar_compile_threads: int = 2
    """Threads compiling grammars beside the engine's step loop."""
    cache_dir: str | None = None
    """Where slow conversions (the tokenizer built from GGUF metadata, int4 weights, the fused CPU
    kernels) are cached; default ~/.cache/novainfer (resolve_cache_dir)."""
    speculative_method: Literal["none", "ngram", "suffix"] = "none"
    """Model-free speculative decoding: ngram proposes the continuation of the latest earlier
    occurrence of the request's last n tokens in its own prompt and output; suffix proposes
    from a suffix tree over the request and recent outputs. Drafts are verified in the normal
    batch, so greedy output is unchanged and sampled output keeps its distribution."""
    num_speculative_tokens: int = 4
    """Draft tokens proposed (and verified) per request per step when speculating: the most,
    with adaptive draft lengths."""
    speculative_adaptive_draft_length: bool = True
    """Choose each request's draft length per step (0 to num_speculative_tokens) from its
    acceptance rate and the measured cost of verification rows, for the most tokens per
    second; off: always num_speculative_tokens (until acceptance stays low)."""
    ngram_prompt_lookup_min: int = 2
    """Shortest suffix n-gram the ngram proposer looks up."""
    ngram_prompt_lookup_max: int = 4
    """Longest suffix n-gram the ngram proposer looks up (tried first)."""
    suffix_max_tree_depth: int = 24
    """Suffix speculation: longest substring (match plus proposal) its suffix trees hold."""
    suffix_cache_max_tokens: int = 65536
    """Suffix speculation: output tokens of finished requests kept as a corpus for later ones
    (oldest requests evicted whole), beside the running requests' outputs; 0: each request
    proposes from its own tokens only. Memory is at most about 2 KB per token at depth 24."""
    suffix_max_spec_factor: float = 1.0
    """Suffix speculation: a match of m tokens proposes at most factor * m tokens."""
    suffix_min_token_prob: float = 0.1
    """Suffix speculation: stop a proposal where its estimated probability falls below this."""

    def __post_init__(self) -> None:
        if self.exact:
            conflicts = [
                f"--{flag} {value}"
                for flag, value, allowed in (
                    ("dtype", self.dtype, ("auto", "float32")),
                    ("quantization", self.quantization, ("auto", "none")),
                )
                if value not in allowed
            ]
            conflicts += [
                f"--{flag}"
                for flag, on in (("compile-decode", self.compile_decode), ("int4-lm-head", self.int4_lm_head))
                if on
            ]
            if conflicts:
                raise ValueError(f"--exact runs float32 without int4 or compilation: drop {', '.join(conflicts)}")
        if self.speculative_method != "none" and not 1 <= self.num_speculative_tokens <= 32:
            raise ValueError(f"num_speculative_tokens must be in [1, 32], got {self.num_speculative_tokens}")
        if not 1 <= self.ngram_prompt_lookup_min <= self.ngram_prompt_lookup_max:
            raise ValueError(
                "need 1 <= ngram_prompt_lookup_min <= ngram_prompt_lookup_max, got "
                f"{self.ngram_prompt_lookup_min} and {self.ngram_prompt_lookup_max}"
            )
        if self.suffix_max_tree_depth < 2:
            raise ValueError(f"suffix_max_tree_depth must be at least 2, got {self.suffix_max_tree_depth}")
        if self.suffix_cache_max_tokens < 0:
            raise ValueError(f"suffix_cache_max_tokens must be >= 0, got {self.suffix_cache_max_tokens}")
        if not self.suffix_max_spec_factor > 0:
            raise ValueError(f"suffix_max_spec_factor must be > 0, got {self.suffix_max_spec_factor}")
        if not 0.0 <= self.suffix_min_token_prob <= 1.0:
            raise ValueError(f"suffix_min_token_prob must be in [0, 1], got {self.suffix_min_token_prob}")


class ServeConfig(msgspec.Struct, kw_only=True):
    host: str = "127.0.0.1"
    """Address the HTTP API listens on (0.0.0.0 for every interface)."""
    port: int = 8000
    """Port of the HTTP API; also names the default run_dir, so one port is one service."""
    api_key: str | None = None
    """Bearer token required on /v1/*; unset: no auth."""
    max_queued_requests: int = 512
    """Requests in flight past which the gateway answers 429."""
    max_body_bytes: int = 4 << 20
    """Largest request body the gateway accepts (413 past it)."""
    num_tokenizer_workers: int = 0
    """0: sized to the machine."""
    num_engines: int = 1
    """Engine-core replicas (data parallel) the launcher starts."""
    engine_routing: Literal["prefix-affinity", "round-robin"] = "prefix-affinity"
    """How the gateway spreads requests over several engines: to the engine that served the
    longest shared prompt prefix unless it is much busier (prefix-affinity), or in turn."""
    run_dir: str | None = None
    """Where ipc:// sockets live when addresses are not given; default $TMPDIR/novainfer-PORT."""
    gateway_addr: str | None = None
    """The gateway's input socket (tokenizer workers push to it)."""
    tokenizer_addrs: list[str] = []
    """One input socket per tokenizer worker (gateway and engines push to them)."""
    engine_addrs: list[str] = []
    """One input socket per engine-core replica (tokenizer workers push to them)."""
    engine_index: int = 0
    """Which of engine_addrs this engine-core process binds."""
    worker_index: int | None = None
    """Run only this tokenizer worker (for compose); None runs all workers of tokenizer_addrs."""
    heartbeat_s: float = 1.0
    """How often each engine core tells the gateway it is alive."""
    engine_timeout_s: float = 10.0
    """No heartbeat for this long: the engine is considered dead."""
    max_restarts: int = 5
    """Child processes (engine cores, tokenizer workers, the gateway) the launcher restarts within
    restart_window_s; one more crash and it stops the whole service loudly (exit code 1)."""
    restart_window_s: float = 300.0
    """The window max_restarts counts crashes in."""
    restart_wait_s: float = 60.0
    """A request that needs an engine core or tokenizer worker which is restarting (the launcher
    saw it die) waits this long for it to come back, then gets 503 + Retry-After. The bundled
    model's engine restarts in about 10 s on 2 busy CPU cores."""
    drain_timeout_s: float = 25.0
    """On SIGTERM the gateway refuses new requests (503) and lets in-flight ones finish for up to
    this long before it fails them and exits."""
    log_level: str = "INFO"
    """DEBUG, INFO, WARNING or ERROR."""
    kv_events_endpoint: str | None = None
    """Publish KV-cache events in vLLM's format on this ZMQ PUB address (e.g. tcp://*:5557), for
    KV-aware routers; engine i uses port + i (ipc://: a _dp<i> suffix). Unset: no events."""
    kv_events_replay_endpoint: str | None = None
    """ZMQ ROUTER address where subscribers fetch missed event batches from a sequence number
    (vLLM's replay protocol); engine i uses port + i."""
    kv_events_topic: str = ""
    """Topic frame of every published event batch."""
    kv_events_buffer_steps: int = 10000
    """Event batches kept for replay."""
    responses_store_size: int = 1000
    """Responses the gateway keeps for previous_response_id and GET/DELETE /v1/responses/{id}
    (least recently used dropped first; in this gateway process's memory, lost on restart; 0: none)."""
    metrics_compat: Literal["none", "vllm"] = "none"
    """vllm: /metrics also exports vLLM's series (vllm:num_requests_waiting, vllm:kv_cache_usage_perc, ...)
    for tools that hard-code them (Inference Gateway endpoint picker, KEDA, dashboards)."""


class Config(msgspec.Struct, kw_only=True):
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    serve: ServeConfig = msgspec.field(default_factory=ServeConfig)

    def model_name(self) -> str:
        if self.engine.served_model_name:
            return self.engine.served_model_name
        if self.engine.model == BUNDLED_MODEL:
            return "SmolLM2-135M-Instruct"
        return os.path.basename(os.path.normpath(self.engine.model))

    def with_default_addresses(self) -> Config:
        """Fill unset socket addresses with ipc:// paths under run_dir (the one-machine default)."""
        serve = self.serve
        # Keyed by port, so services started separately with the same flags agree.
        run_dir = serve.run_dir or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"novainfer-{serve.port}")
        n_workers = len(serve.tokenizer_addrs) or serve.num_tokenizer_workers or default_tokenizer_workers()
        return msgspec.structs.replace(
            self,
            serve=msgspec.structs.replace(
                serve,
                run_dir=run_dir,
                num_tokenizer_workers=n_workers,
                gateway_addr=serve.gateway_addr or f"ipc://{run_dir}/gateway",
                tokenizer_addrs=serve.tokenizer_addrs or [f"ipc://{run_dir}/tokenizer-{i}" for i in range(n_workers)],
                engine_addrs=serve.engine_addrs or [f"ipc://{run_dir}/engine-{i}" for i in range(serve.num_engines)],
            ),
        )


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_tokenizer_workers() -> int:
    # The engine wants most cores on CPU; tokenization is light.
    return max(1, min(4, available_cores() // 2))


def _flag(section: str, name: str) -> str:
    del section  # flags are flat: field names are unique across sections
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _sections() -> dict[str, type[msgspec.Struct]]:
    return {"engine": EngineConfig, "serve": ServeConfig}


def _parse_value(tp: Any, raw: str) -> Any:
    origin = get_origin(tp)
    args = [a for a in get_args(tp) if a is not type(None)]
    if origin is Literal:
        if raw not in args:
            raise ValueError(f"{raw!r} is not one of {', '.join(map(str, args))}")
        return raw
    if origin is list:
        return [_parse_value(args[0], p.strip()) for p in raw.split(",") if p.strip()]
    if args and origin is not list and len(args) == 1:  # Optional[X]
        if raw.lower() in ("", "none", "null"):
            return None
        return _parse_value(args[0], raw)
    if tp is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    if tp is int:
        return int(raw)
    if tp is float:
        return float(raw)
    return raw


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings under a class's fields (Python keeps none at run time, so they are read
    from the source); {} where the source is not available."""
    try:
        body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
    except (OSError, TypeError, IndexError, AttributeError):
        return {}
    docs = {}
    for field, doc in itertools.pairwise(body):
        if (
            isinstance(field, ast.AnnAssign)
            and isinstance(field.target, ast.Name)
            and isinstance(doc, ast.Expr)
            and isinstance(doc.value, ast.Constant)
            and isinstance(doc.value.value, str)
        ):
            docs[field.target.id] = " ".join(doc.value.value.split())
    return docs


def add_config_args(parser: argparse.ArgumentParser, exclude: Sequence[str] = ()) -> None:
    """Add one flag per config field; defaults stay None so env vars can fill the gaps.
    Each flag's help is the field's docstring, its default and its env var."""
    for section, cls in _sections().items():
        group = parser.add_argument_group(section)
        hints = get_type_hints(cls)
        docs = field_docs(cls)
        defaults = cls()
        for name in cls.__struct_fields__:
            if name in exclude:
                continue
            tp = hints[name]
            flag = _flag(section, name)
            default = getattr(defaults, name)
            shown = "unset" if default is None or default == [] else default
            doc = docs.get(name, "").replace("%", "%%")  # argparse formats help with %
            help_text = f"{doc} (default: {shown}; env {_env(name)})".lstrip()
            if tp is bool:
                group.add_argument(
                    flag,
                    dest=name,
                    default=None,
                    action=argparse.BooleanOptionalAction,
                    help=help_text,
                )
            else:
                # Literal fields list their values, and argparse refuses others before anything starts.
                choices = get_args(tp) if get_origin(tp) is Literal else None
                group.add_argument(
                    flag,
                    dest=name,
                    default=None,
                    type=str,
                    metavar=name.upper(),
                    choices=choices,
                    help=help_text if choices is None else f"{{{','.join(choices)}}} {help_text}",
                )


def config_from_args(args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    values = vars(args) if args is not None else {}
    sections: dict[str, Any] = {}
    for section, cls in _sections().items():
        hints = get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for name in cls.__struct_fields__:
            raw = values.get(name)
            if raw is None and _env(name) in env:
                raw = env[_env(name)]
            if raw is None:
                continue
            try:
                kwargs[name] = raw if isinstance(raw, bool) else _parse_value(hints[name], raw)
            except ValueError as e:
                raise SystemExit(f"invalid value for {name} ({_flag(section, name)}): {e}") from e
        try:
            sections[section] = cls(**kwargs)
        except ValueError as e:  # a field-combination check in __post_init__
            raise SystemExit(f"invalid {section} configuration: {e}") from e
    return Config(**sections)


def parse_config(argv: Sequence[str] | None = None, description: str = "") -> Config:
    parser = argparse.ArgumentParser(description=description)
    add_config_args(parser)
    return config_from_args(parser.parse_args(argv))


def config_to_args(config: Config) -> list[str]:
    """The CLI flags that rebuild `config` in a child process (the launcher passes them on)."""
    argv: list[str] = []
    for section, cls in _sections().items():
        obj = getattr(config, section)
        for name in cls.__struct_fields__:
            value = getattr(obj, name)
            if value == getattr(cls(), name):
                continue
            flag = _flag(section, name)
            if isinstance(value, bool):
                argv.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, list):
                argv += [flag, ",".join(str(v) for v in value)]
            elif value is None:
                argv += [flag, "none"]
            else:
                argv += [flag, str(value)]
    return argv
