"""The wire protocol: every message that crosses a process boundary.

Data flows one way: gateway -> tokenizer worker -> engine core -> tokenizer worker
-> gateway. Each process has ONE input (a ZMQ PULL socket) and decodes it as the
tagged union named below, so adding a message type is a change to this file only.
Engine outputs are batched: one `EngineOutputs` per engine step per tokenizer
worker, carrying the new tokens of every request of that worker in that step.
"""

from __future__ import annotations

import json
import math
import zlib
from typing import Any, Literal

import msgspec

from shared.errors import InvalidRequest
from shared.json_schema_support import check_json_schema

# Finish reasons as the OpenAI API names them.
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"


GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]

MAX_GRAMMAR_SPEC_BYTES = 64 * 1024
"""A JSON schema, regex or grammar longer than this is refused before anything compiles it."""


class GrammarSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a request's output must match; the engine compiles it into a token mask.
    Its text is the compile-cache key, so equal specs compile once."""

    kind: GrammarKind
    spec: str = ""
    """json_schema: the schema as JSON text; choice: a JSON list of strings; regex: the
    pattern; grammar: EBNF (GBNF); json_object: unused (any JSON object)."""

    def validate(self) -> None:
        """Raise InvalidRequest for a spec the engine would refuse (cheap, no compilation)."""
        if len(self.spec.encode()) > MAX_GRAMMAR_SPEC_BYTES:
            raise InvalidRequest(f"the {self.kind} is longer than {MAX_GRAMMAR_SPEC_BYTES} bytes")
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.spec)
            except ValueError as e:
                raise InvalidRequest(f"the JSON schema is not valid JSON: {e}") from None
            try:
                check_json_schema(schema)
            except ValueError as e:  # what the schema uses that the grammar compiler cannot serve
                raise InvalidRequest(str(e)) from None
        elif self.kind == "choice":
            choices = json.loads(self.spec)
            if not choices or not all(isinstance(c, str) and c for c in choices):
                raise InvalidRequest("choice must be a non-empty list of non-empty strings")
        elif self.kind in ("regex", "grammar") and not self.spec:
            raise InvalidRequest(f"the {self.kind} is empty")


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    max_tokens: int | None = 16
    """None: up to the model's context length."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1: disabled."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    """None: no logprobs; k >= 0: the sampled token's logprob plus the top k alternatives."""
    skip_special_tokens: bool = True
    n: int = 1
    """Fanned out by the frontend (gateway / offline LLM) into n engine requests."""
    logit_bias: dict[int, float] | None = None
    """Token id -> bias added to its logit, in [-100, 100] (OpenAI's logit_bias)."""
    structured_output: GrammarSpec | None = None
    """Constrain the output to this grammar (response_format, structured_outputs, guided_*)."""

    def validate(self) -> None:
        """Raise InvalidRequest naming the offending parameter."""
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise InvalidRequest(f"{name} must be a finite number", param=name)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        if self.temperature < 0:
            raise InvalidRequest("temperature must be non-negative", param="temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
        if self.top_k < -1:
            raise InvalidRequest("top_k must be -1, 0 (disabled) or positive", param="top_k")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequest("min_p must be in [0, 1]", param="min_p")
        if self.repetition_penalty <= 0:
            raise InvalidRequest("repetition_penalty must be positive", param="repetition_penalty")
        if not -2 <= self.presence_penalty <= 2:
            raise InvalidRequest("presence_penalty must be in [-2, 2]", param="presence_penalty")
        if not -2 <= self.frequency_penalty <= 2:
            raise InvalidRequest("frequency_penalty must be in [-2, 2]", param="frequency_penalty")
        if self.min_tokens < 0:
            raise InvalidRequest("min_tokens must be non-negative", param="min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequest("min_tokens must not exceed max_tokens", param="min_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequest("logprobs must be in [0, 20]", param="logprobs")
        if not 1 <= self.n <= 128:
            raise InvalidRequest("n must be in [1, 128]", param="n")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidRequest("stop_token_ids must be non-negative", param="stop_token_ids")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must be non-empty", param="stop")
        if self.logit_bias is not None:
            if any(t < 0 for t in self.logit_bias):
                raise InvalidRequest("logit_bias keys must be non-negative token ids", param="logit_bias")
            if any(not -100 <= b <= 100 for b in self.logit_bias.values()):
                raise InvalidRequest("logit_bias values must be in [-100, 100]", param="logit_bias")
        if self.structured_output is not None:
            # The grammar decides where the output may end; min_tokens would fight it.
            if self.min_tokens:
                raise InvalidRequest("min_tokens cannot be combined with structured outputs", param="min_tokens")
            self.structured_output.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def fan_out(self) -> list[SamplingParams]:
        """The params of the n engine requests a request with n samples becomes (n=1 each;
        they share the prompt's KV through the prefix cache). Sample i is seeded seed + i,
        wrapped into the int64 range the wire carries, so the samples differ and stay
        reproducible."""
        if self.n == 1:
            return [self]
        one = msgspec.structs.replace(self, n=1)
        if self.seed is None:
            return [one] * self.n
        return [msgspec.structs.replace(one, seed=(self.seed + i + 2**63) % 2**64 - 2**63) for i in range(self.n)]


class ErrorInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Why a request failed: carried back to the gateway, answered in OpenAI's error shape."""

    message: str
    status: int = 400
    """The HTTP status: 400 for an InvalidRequest, 500 for a bug, 503 for a component that is down."""
    param: str | None = None
    code: str | None = None
    retry_after: int | None = None
    """Seconds after which a retry may succeed (a 503 for a restarting component): Retry-After."""

    @classmethod
    def invalid(cls, e: InvalidRequest) -> ErrorInfo:
        return cls(message=e.message, param=e.param, code=e.code)


class ChatMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str
    content: str
    tool_calls: list[dict[str, Any]] | None = None
    """An assistant turn's calls, OpenAI-shaped: {id, type: function, function: {name, arguments}}."""
    tool_call_id: str | None = None
    """A tool turn: the call it answers."""


class ReasoningTokens(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A reasoning model's thinking delimiters as token ids, for one request: the engine applies
    the request's grammar to the answer only (after `end`). Decided by the tokenizer worker
    from the tokenizer and the rendered prompt (services/tokenizer_pool/reasoning_parser.py)."""

    end: list[int]
    """The tokens of `</think>` (its standard encoding): the answer starts after their bytes,
    whatever tokens the model spells them in."""
    inside: bool = True
    """The output starts inside the thinking (the prompt opened it, or the model always thinks)."""
    start: int | None = None
    """When the output starts outside and the model may open its thinking: the single token of
    `<think>` (as its first output token); None: it may not (the grammar applies from the start)."""


class ToolCallDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A piece of one tool call as OpenAI streams it: id and name first, then argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


# --- gateway -> tokenizer worker ---------------------------------------------------


class GenerateRequest(msgspec.Struct, tag="generate", kw_only=True):
    """Exactly one of prompt, prompt_token_ids, messages is set."""

    request_id: str
    sampling_params: SamplingParams
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    echo: bool = False
    """Return the prompt text in the first output (for completions' echo)."""
    arrival_time: float = 0.0
    engine: int | None = None
    """The engine core the gateway chose (prefix affinity); None: the worker shards by request id."""
    tools: list[dict[str, Any]] | None = None
    """Chat tools, OpenAI-shaped ({type: function, function: {name, description, parameters}})."""
    tool_choice: Literal["none", "auto", "required", "named"] = "none"
    """none: tools are shown, never parsed; auto: the output is parsed for calls; required /
    named: the output is a grammar-forced call (a JSON array of {name, parameters} / the
    named function's arguments)."""
    tool_name: str | None = None
    """The function of tool_choice named."""
    parallel_tool_calls: bool = True
    """False: at most one call is returned (tool_choice auto drops later ones)."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Extra variables for the chat template (e.g. Qwen3's enable_thinking)."""


class AbortRequest(msgspec.Struct, tag="abort", kw_only=True):
    """Gateway -> tokenizer worker -> engine (client cancel/disconnect), or
    tokenizer worker -> engine (a stop string was hit)."""

    request_ids: list[str]


class TokenizeRequest(msgspec.Struct, tag="tokenize", kw_only=True):
    """For POST /tokenize; answered with TokenizeResult, never reaches the engine."""

    request_id: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(msgspec.Struct, tag="detokenize", kw_only=True):
    request_id: str
    token_ids: list[int]


# --- tokenizer worker -> engine core ------------------------------------------------


class EngineRequest(msgspec.Struct, tag="engine_request", kw_only=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    worker: int
    """Index into tokenizer_addrs: where this request's outputs go."""
    eos_token_ids: list[int] = []
    arrival_time: float = 0.0
    reasoning: ReasoningTokens | None = None
    """Set for a chat request under a reasoning parser: its grammar applies after the thinking."""


class TokenizerVocab(msgspec.Struct, tag="tokenizer_vocab", kw_only=True):
    """Sent once by each tokenizer worker to each engine at start-up (before any request):
    the tokenizer as a `tokenizers` JSON document, from which the engine builds the
    vocabulary its grammar compiler masks over."""

    tokenizer_json: str
    eos_token_ids: list[int] = []


# --- engine core -> tokenizer worker ------------------------------------------------


class TokenLogprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    """The top-k alternatives (token id, logprob), most likely first."""


class EngineOutput(msgspec.Struct, kw_only=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int] = []
    finish_reason: str | None = None
    """stop, length or abort; None while running."""
    stop_token_id: int | None = None
    """The EOS / stop token that finished it. It is the last of new_token_ids (it counts as
    an output token) but its text is never emitted."""
    logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    """Wall time the request was first scheduled (queue time = this - arrival_time); set once."""
    error: ErrorInfo | None = None
    """Set when the engine rejected the request (finish_reason is then abort)."""


class EngineStats(msgspec.Struct, kw_only=True):
    """Gauges and cumulative counters, so re-sending them is idempotent."""

    engine_index: int = 0
    timestamp: float = 0.0
    run_mode: str = ""
    """How the engine runs the model (run_mode.describe: 'bfloat16+int4', 'exact (float32)', ...)."""
    num_running: int = 0
    num_waiting: int = 0
    num_preempted: int = 0
    kv_usage: float = 0.0
    """Fraction of KV blocks in use."""
    num_blocks: int = 0
    prefix_queries_total: int = 0
    """Prompt tokens looked up in the prefix cache."""
    prefix_hits_total: int = 0
    """Prompt tokens found there."""
    preemptions_total: int = 0
    steps_total: int = 0
    last_step_time_s: float = 0.0
    last_batch_size: int = 0
    last_num_batched_tokens: int = 0
    spec_num_drafts: int = 0
    """Speculative decoding: verification rows that carried draft tokens."""
    spec_num_draft_tokens: int = 0
    """Draft tokens verified."""
    spec_num_accepted_tokens: int = 0
    """Draft tokens accepted (each one a token produced without a step of its own)."""
    spec_num_accepted_tokens_per_pos: list[int] = []
    """Accepted drafts by position in their row (index 0: first draft); one entry per
    speculative token; [] when speculation is off."""


class EngineOutputs(msgspec.Struct, tag="engine_outputs", kw_only=True):
    engine_index: int
    outputs: list[EngineOutput]
    stats: EngineStats | None = None


# --- tokenizer worker -> gateway ----------------------------------------------------


class TextLogprob(msgspec.Struct, array_like=True):
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]]


class RequestDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    request_id: str
    text: str = ""
    """New text since the previous delta; stop strings already removed."""
    token_ids: list[int] = []
    logprobs: list[TextLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    """The stop string or stop token id that finished it."""
    tool_calls: list[ToolCallDelta] | None = None
    """Tool calls found in the output (text then holds only what is not a call)."""
    reasoning_text: str = ""
    """Under a reasoning parser: new thinking text (text then holds only the answer)."""
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    """Cumulative."""
    num_reasoning_tokens: int = 0
    """Cumulative: under a reasoning parser, the output tokens of the thinking (its tags included)."""
    num_cached_tokens: int = 0
    prompt_text: str | None = None
    """Only in the first delta of an echo request."""
    first_scheduled_time: float | None = None
    error: ErrorInfo | None = None


class GatewayOutputs(msgspec.Struct, tag="gateway_outputs", kw_only=True):
    worker: int
    deltas: list[RequestDelta]
    stats: EngineStats | None = None


class TokenizeResult(msgspec.Struct, tag="tokenize_result", kw_only=True):
    request_id: str
    token_ids: list[int] = []
    max_model_len: int = 0
    error: ErrorInfo | None = None


class DetokenizeResult(msgspec.Struct, tag="detokenize_result", kw_only=True):
    request_id: str
    text: str = ""
    error: ErrorInfo | None = None


class WorkerHeartbeat(msgspec.Struct, tag="worker_heartbeat", kw_only=True):
    worker: int
    timestamp: float
    max_model_len: int = 0


# --- KV-cache events, in vLLM's format (engine core -> external routers) --------------
# Published on --kv-events-endpoint (ZMQ PUB, frames [topic, seq, payload]) for KV-aware
# routers such as llm-d's precise prefix scorer. Field names, order and struct options are
# vLLM's (vllm/distributed/kv_events.py, the array-like layout its subscribers decode), so
# their decoders read ours. A block hash here is the engine's chain id of a cached block
# (unique to its token content and its whole prefix, never reused), not a content hash.


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None
    """The engine index."""


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base of the KV-cache events; the tag is the class name, as in vLLM."""


class BlockStored(KVCacheEvent):
    """Full blocks newly cached, each the child of the previous (the first of parent_block_hash)."""

    block_hashes: list[int]
    parent_block_hash: int | None
    """None: the first block of a sequence."""
    token_ids: list[int]
    """block_size tokens per block, in block order."""
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    """Where the blocks live: GPU or CPU."""
    lora_name: str | None = None


class BlockRemoved(KVCacheEvent):
    """Blocks evicted from the prefix cache."""

    block_hashes: list[int]
    medium: str | None = None


class AllBlocksCleared(KVCacheEvent):
    """The whole prefix cache was dropped."""


KVCacheEvents = BlockStored | BlockRemoved | AllBlocksCleared


# --- launcher -> gateway ------------------------------------------------------------


class ComponentDown(msgspec.Struct, tag="component_down", kw_only=True):
    """A child process exited (the launcher saw it) and is being restarted. The gateway fails
    the requests it had started, parks those it had not (resubmitted once it reports again),
    and answers 503 for requests routed to it meanwhile."""

    component: str
    """"engine" or "tokenizer_worker"."""
    index: int
    reason: str
    timestamp: float
    """Wall time of the death: reports from the component older than this are the dead one's."""


# --- the union each process decodes its input as -------------------------------------

TokenizerInput = GenerateRequest | AbortRequest | TokenizeRequest | DetokenizeRequest | EngineOutputs
EngineInput = EngineRequest | AbortRequest | TokenizerVocab
GatewayInput = GatewayOutputs | TokenizeResult | DetokenizeResult | WorkerHeartbeat | ComponentDown

_encoder = msgspec.msgpack.Encoder()


def shard(key: str, n: int) -> int:
    """Stable routing of a request id to one of n workers or engines; every process agrees."""
    return zlib.crc32(key.encode()) % n if n > 1 else 0


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decoder(union: object) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(union)
