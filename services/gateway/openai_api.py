"""OpenAI request bodies: decoding, validation, and their translation into GenerateRequests.

Bodies are decoded straight into msgspec Structs, so a wrong type is reported with the
path of the offending field; every field is optional and nullable because OpenAI
clients send `null` for unset parameters. A field this module does not know is a 400
("Unrecognized request argument supplied", as OpenAI answers), never silently ignored; the
README lists what is understood. Message objects also accept the fields OpenAI returns on an
assistant message (`refusal`, `annotations`, `audio`), so a client can send a reply back
as the next turn's history. Structured outputs and tools are parsed in structured_outputs.py
and tools.py.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from services.gateway.structured_outputs import (
    StructuredOutputError,
    StructuredOutputFields,
    grammar_spec,
    logit_bias,
)
from services.gateway.tools import Tool, ToolChoice, ToolError, plan_tools
from shared.errors import InvalidRequest
from shared.protocol import ChatMessage, ErrorInfo, GenerateRequest, SamplingParams

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Int = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
"""Every integer a client sends: the wire protocol is msgpack, which cannot carry more than
64 bits, so a larger number is the client's error (400) rather than an encoding crash (500)."""
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_ID_PREFIX = re.compile(r"[a-z]+[-_]")
"""The kind of a response id, with its separator: cmpl-, chatcmpl-, resp_."""


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {message, type, param, code}}: the gateway's
    own refusals (401, 404, 413, 429, 503) and errors reported by the workers and engines."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    @classmethod
    def invalid(cls, e: InvalidRequest) -> ApiError:
        return cls(400, e.message, param=e.param, code=e.code)

    @classmethod
    def from_info(cls, info: ErrorInfo) -> ApiError:
        headers = {"Retry-After": str(info.retry_after)} if info.retry_after is not None else None
        return cls(info.status, info.message, param=info.param, code=info.code, headers=headers)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.Response(
            body=msgspec.json.encode(self.body()),
            status=self.status,
            headers=self.headers,
            content_type="application/json",
        )


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class _SamplingFields(StructuredOutputFields, kw_only=True):
    model: str | None = None
    max_tokens: Int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int | None = None
    min_p: float | None = None
    n: Int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Int] | None = None
    seed: Int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: Int | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    user: str | None = None
    no_stop_trim: bool | None = None
    return_hidden_states: bool | None = None


class CompletionBody(_SamplingFields, kw_only=True, forbid_unknown_fields=True):
    prompt: Any = None
    """str, list[str], list[int] or list[list[int]]: one msgspec union cannot hold them all."""
    echo: bool | None = None
    logprobs: Int | None = None


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class MessageFunctionCall(msgspec.Struct):
    name: str
    arguments: str


class MessageToolCall(msgspec.Struct):
    id: str
    function: MessageFunctionCall
    type: Literal["function"] = "function"


class Message(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: str
    content: str | list[ContentPart] | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    refusal: str | None = None
    """Returned by OpenAI on assistant messages; echoed back by clients, not part of the prompt."""
    annotations: list[Any] | None = None
    """Likewise (URL citations); not part of the prompt."""
    audio: Any = None
    """Likewise; audio is not supported, so anything but null is a 400."""
    function_call: Any = None
    """Likewise (deprecated); anything but null is a 400: use tool_calls."""


class ChatBody(_SamplingFields, kw_only=True, forbid_unknown_fields=True):
    messages: list[Message]
    max_completion_tokens: Int | None = None
    logprobs: bool | None = None
    top_logprobs: Int | None = None
    add_generation_prompt: bool | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: Any = None
    function_call: Any = None
    chat_template_kwargs: dict[str, Any] | None = None
    continue_final_message: bool | None = None
    separate_reasoning: bool | None = None
    stream_reasoning: bool | None = None
    include_reasoning: bool | None = None


ROUTER_FIELD_DEFAULTS = {
    "no_stop_trim": False,
    "return_hidden_states": False,
    "continue_final_message": False,
    "separate_reasoning": True,
    "stream_reasoning": True,
    "include_reasoning": True,
}
"""SGLang/vLLM extension fields that off-the-shelf routers (vllm-router, SGLang's router)
re-serialize into every body they forward, set to these defaults. The defaults are what
NovaInfer does anyway, so they are accepted; any other value is a feature NovaInfer does not
have, hence a 400 rather than a silent no-op."""


def _check_router_fields(req: _SamplingFields) -> None:
    for name, default in ROUTER_FIELD_DEFAULTS.items():
        value = getattr(req, name, None)
        if value is not None and value != default:
            raise InvalidRequest(f"{name}: {str(value).lower()} is not supported", param=name)


_TEMPLATE_RESERVED = {"messages", "tools", "documents", "add_generation_prompt"}


class TokenizeBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None


class DetokenizeBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    tokens: list[Int]
    model: str | None = None


@dataclass
class Job:
    """One validated generation request, fanned out into its child engine requests."""

    request_id: str
    chat: bool
    created: int
    model: str
    stream: bool
    include_usage: bool
    n: int
    num_prompts: int
    echo: bool
    logprobs: int | None
    children: list[GenerateRequest]
    client_chosen_id: bool = False
    """The id came from the client's X-Request-Id, so it must not change."""

    def rename(self) -> None:
        """A new random id (children ids follow); their routing to workers and engines changes."""
        prefix = _ID_PREFIX.match(self.request_id)
        assert prefix is not None, self.request_id
        self.request_id = request_id(prefix.group(), None)
        for i, child in enumerate(self.children):
            child.request_id = f"{self.request_id}-{i}"


_PATH = re.compile(r"at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]*)`")
_UNKNOWN = re.compile(r"^Object contains unknown field `([^`]*)`(?: - at `\$\.?([^`]*)`)?$")


def _error_param(message: str) -> str | None:
    """The parameter a msgspec ValidationError is about, as a JSON path without the `$.`."""
    path = _PATH.search(message)
    missing = _MISSING.search(message)
    parts = [m.group(1) for m in (path, missing) if m is not None and m.group(1)]
    return ".".join(parts) or None


def decode_body(body: bytes, cls: type[msgspec.Struct]) -> Any:
    try:
        return msgspec.json.decode(body, type=cls)
    except msgspec.ValidationError as e:
        unknown = _UNKNOWN.match(str(e))
        if unknown is not None:
            where, name = unknown.group(2), unknown.group(1)
            param = f"{where}.{name}" if where else name
            raise InvalidRequest(f"Unrecognized request argument supplied: {param}", param=param) from None
        raise InvalidRequest(f"invalid request: {e}", param=_error_param(str(e))) from None
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # msgspec's guard against deep nesting, which a 2 KB body can reach
        raise InvalidRequest("the request body is nested too deeply") from None


def check_model(model: str | None, served: str) -> None:
    if model is not None and model != served:
        raise ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else stop


def _sampling_params(body: _SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    try:
        spec = grammar_spec(body)
        bias = logit_bias(body)
    except StructuredOutputError as e:
        raise InvalidRequest(str(e), param=e.param) from None

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=pick(body.temperature, 1.0),
        top_p=pick(body.top_p, 1.0),
        top_k=pick(body.top_k, 0),
        min_p=pick(body.min_p, 0.0),
        repetition_penalty=pick(body.repetition_penalty, 1.0),
        presence_penalty=pick(body.presence_penalty, 0.0),
        frequency_penalty=pick(body.frequency_penalty, 0.0),
        seed=body.seed,
        stop=_stop_list(body.stop),
        stop_token_ids=pick(body.stop_token_ids, []),
        include_stop_str_in_output=pick(body.include_stop_str_in_output, False),
        ignore_eos=pick(body.ignore_eos, False),
        min_tokens=pick(body.min_tokens, 0),
        logprobs=logprobs,
        skip_special_tokens=pick(body.skip_special_tokens, True),
        n=pick(body.n, 1),
        logit_bias=bias,
        structured_output=spec,
    )


def _validate(params: SamplingParams, renames: dict[str, str]) -> None:
    """SamplingParams.validate, with its parameter names as this endpoint spells them."""
    try:
        params.validate()
    except InvalidRequest as e:
        if e.param in renames:
            param = renames[e.param]
            raise InvalidRequest(e.message.replace(e.param, param, 1), param=param, code=e.code) from None
        raise


def _children(request_id: str, params: SamplingParams, prompts: list[dict[str, Any]]) -> list[GenerateRequest]:
    """n children per prompt, choice index = prompt index * n + i, as OpenAI numbers choices."""
    children = []
    samples = params.fan_out()
    for p, prompt in enumerate(prompts):
        for i, sp in enumerate(samples):
            index = p * params.n + i
            children.append(GenerateRequest(request_id=f"{request_id}-{index}", sampling_params=sp, **prompt))
    return children


def _prompts(raw: Any) -> list[dict[str, Any]]:
    """The completions `prompt` as GenerateRequest prompt fields, one dict per prompt."""

    def is_tokens(x: Any) -> bool:
        return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    def checked(ids: list[int]) -> list[int]:
        # The vocabulary is checked by the tokenizer worker; this only keeps the ids encodable.
        bad = next((t for t in ids if not 0 <= t <= INT64_MAX), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is out of vocabulary", param="prompt")
        return ids

    if isinstance(raw, str):
        return [{"prompt": raw}]
    if isinstance(raw, list) and raw:
        if all(isinstance(p, str) for p in raw):
            return [{"prompt": p} for p in raw]
        if is_tokens(raw):
            return [{"prompt_token_ids": checked(raw)}]
        if all(is_tokens(p) and p for p in raw):
            return [{"prompt_token_ids": checked(p)} for p in raw]
    if raw is None:
        raise InvalidRequest("prompt is required", param="prompt")
    raise InvalidRequest(
        "prompt must be a string, a list of strings, a list of token ids or a list of "
        "token-id lists, and must not be empty",
        param="prompt",
    )


def request_id(prefix: str, client_id: str | None) -> str:
    """The response id (prefix ends with its separator, as in "chatcmpl-" or "resp_"): the
    client's X-Request-Id when it sends one (so that it can cancel a non-streaming request it
    has no response for yet), else a random one."""
    if client_id is None:
        return f"{prefix}{uuid.uuid4().hex}"
    if not _CLIENT_REQUEST_ID.fullmatch(client_id):
        raise InvalidRequest("X-Request-Id must be 1-128 characters of [A-Za-z0-9._:-]", param="X-Request-Id")
    return f"{prefix}{client_id}"


def _check_stream_options(req: _SamplingFields) -> None:
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options"
        )


def parse_completion(body: bytes, served_model: str, client_id: str | None = None) -> Job:
    req: CompletionBody = decode_body(body, CompletionBody)
    check_model(req.model, served_model)
    _check_stream_options(req)
    _check_router_fields(req)
    if req.echo and req.logprobs is not None:
        # OpenAI would return the prompt tokens' logprobs; the engine does not compute them.
        raise InvalidRequest("echo together with logprobs is not supported", param="logprobs")
    prompts = _prompts(req.prompt)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's completions default
    params = _sampling_params(req, max_tokens, req.logprobs)
    _validate(params, {})
    job_id = request_id("cmpl-", client_id)
    echo = bool(req.echo)
    children = _children(job_id, params, prompts)
    for child in children:
        child.echo = echo
    return Job(
        request_id=job_id,
        chat=False,
        created=int(time.time()),
        model=served_model,
        stream=bool(req.stream),
        include_usage=_include_usage(req),
        n=params.n,
        num_prompts=len(prompts),
        echo=echo,
        logprobs=req.logprobs,
        children=children,
        client_chosen_id=client_id is not None,
    )


def chat_messages(messages: list[Message]) -> list[ChatMessage]:
    if not messages:
        raise InvalidRequest("messages must not be empty", param="messages")
    out = []
    for i, m in enumerate(messages):
        role = CHAT_ROLES.get(m.role)
        if role is None:
            raise InvalidRequest(
                f"unsupported role {m.role!r}; use system, developer, user, assistant or tool",
                param=f"messages[{i}].role",
            )
        if m.audio is not None:
            raise InvalidRequest("audio is not supported", param=f"messages[{i}].audio")
        if m.function_call is not None:
            raise InvalidRequest("function_call is deprecated: use tool_calls", param=f"messages[{i}].function_call")
        if isinstance(m.content, list):
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise InvalidRequest(
                        f"unsupported content part {part.type!r}; only text parts are supported",
                        param=f"messages[{i}].content",
                    )
            content = "".join(part.text for part in m.content if part.text is not None)
        else:
            content = m.content or ""  # assistant turns may carry null content
        if role == "tool" and not m.tool_call_id:
            raise InvalidRequest("a tool message needs tool_call_id", param=f"messages[{i}].tool_call_id")
        if m.tool_calls and role != "assistant":
            raise InvalidRequest("only assistant messages carry tool_calls", param=f"messages[{i}].tool_calls")
        out.append(
            ChatMessage(
                role=role,
                content=content,
                tool_calls=[msgspec.to_builtins(c) for c in m.tool_calls] if m.tool_calls else None,
                tool_call_id=m.tool_call_id if role == "tool" else None,
            )
        )
    return out


def parse_chat(body: bytes, served_model: str, client_id: str | None = None) -> Job:
    return chat_job(decode_body(body, ChatBody), served_model, client_id, "chatcmpl-")


def chat_job(req: ChatBody, served_model: str, client_id: str | None, id_prefix: str) -> Job:
    """A chat request as engine requests: the one path /v1/chat/completions and /v1/responses
    (which translates its body into a ChatBody) share."""
    check_model(req.model, served_model)
    _check_stream_options(req)
    _check_router_fields(req)
    messages = chat_messages(req.messages)
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    try:
        tools = plan_tools(req)
    except ToolError as e:
        raise InvalidRequest(str(e), param=e.param) from None
    params = _sampling_params(req, max_tokens, logprobs)
    if tools.grammar is not None:
        if params.structured_output is not None:
            raise ApiError(
                400, f"tool_choice {tools.choice} cannot be combined with response_format", param="tool_choice"
            )
        params = msgspec.structs.replace(params, structured_output=tools.grammar)
    renames = {"logprobs": "top_logprobs"}
    if req.max_completion_tokens is not None:
        renames["max_tokens"] = "max_completion_tokens"
    _validate(params, renames)
    reserved = sorted(_TEMPLATE_RESERVED & set(req.chat_template_kwargs or ()))
    if reserved:
        raise InvalidRequest(
            f"chat_template_kwargs must not set {', '.join(reserved)}: they are request fields",
            param="chat_template_kwargs",
        )
    job_id = request_id(id_prefix, client_id)
    add_generation_prompt = True if req.add_generation_prompt is None else req.add_generation_prompt
    children = _children(job_id, params, [{"messages": messages}])
    for child in children:
        child.add_generation_prompt = add_generation_prompt
        child.tools, child.tool_choice, child.tool_name = tools.tools, tools.choice, tools.name
        child.parallel_tool_calls = req.parallel_tool_calls is not False
        child.chat_template_kwargs = req.chat_template_kwargs or None
    return Job(
        request_id=job_id,
        chat=True,
        created=int(time.time()),
        model=served_model,
        stream=bool(req.stream),
        include_usage=_include_usage(req),
        n=params.n,
        num_prompts=1,
        echo=False,
        logprobs=logprobs,
        children=children,
        client_chosen_id=client_id is not None,
    )


def _include_usage(req: _SamplingFields) -> bool:
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)
