"""The handlers that talk to the workers: generation (stream or not), tokenize, cancel.

Whatever way a generation handler leaves (done, error, client gone, cancelled by
aiohttp when the client disconnects), `PoolClient.release` runs in its `finally` and
aborts the children that have not finished, so nothing is left running in an engine
for a client that stopped listening.
"""

from __future__ import annotations

import uuid
from typing import Any, Protocol

import msgspec
from aiohttp import web

from services.gateway.admission import DuplicateRequest, Overloaded
from services.gateway.liveness import ServiceUnavailable
from services.gateway.openai_api import (
    ApiError,
    DetokenizeBody,
    Job,
    TokenizeBody,
    chat_messages,
    check_model,
    decode_body,
    parse_chat,
    parse_completion,
)
from services.gateway.pool_client import PoolClient
from services.gateway.request_handle import RequestHandle
from services.gateway.responses import ResponseCollector, StreamEncoder
from services.gateway.responses_api import ResponseRequest, input_messages, parse_responses, responses_param
from services.gateway.responses_output import output_items, response_object, responses_usage, status_of
from services.gateway.responses_store import ResponseStore, StoredResponse
from services.gateway.responses_stream import ResponseEventStream
from shared.errors import InvalidRequest
from shared.protocol import DetokenizeRequest, RequestDelta, TokenizeRequest

POOL_CLIENT: web.AppKey[PoolClient] = web.AppKey("pool_client", PoolClient)
MODEL_NAME: web.AppKey[str] = web.AppKey("model_name", str)
RESPONSE_STORE: web.AppKey[ResponseStore] = web.AppKey("response_store", ResponseStore)

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), status=status, headers=headers, content_type="application/json")


# What aiohttp decodes (br and zstd only when their optional packages are installed, which
# aiohttp itself checks); it passes any other coding through undecoded, so that is refused here.
CONTENT_ENCODINGS = {"", "identity", "gzip", "x-gzip", "deflate", "br", "zstd"}


async def read_body(request: web.Request) -> bytes:
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in CONTENT_ENCODINGS:
        raise ApiError(415, f"unsupported Content-Encoding {encoding!r}; send gzip, deflate or none")
    return await request.read()


# A request refused because a worker or engine it was routed to is restarting gets a new
# random id (so a new route) this many times: with several, the others keep serving.
ROUTE_ATTEMPTS = 8


def unavailable(e: ServiceUnavailable) -> ApiError:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
    return ApiError(503, str(e), code="service_unavailable", headers=headers)


def _submit(pool: PoolClient, job: Job) -> RequestHandle:
    for attempt in range(ROUTE_ATTEMPTS):
        try:
            return pool.submit(job.request_id, job.children)
        except ServiceUnavailable as e:
            if e.retry_after is None or job.client_chosen_id or attempt == ROUTE_ATTEMPTS - 1:
                raise
            job.rename()
    raise AssertionError("unreachable")


async def completions(request: web.Request) -> web.StreamResponse:
    job = parse_completion(await read_body(request), request.app[MODEL_NAME], request.headers.get("X-Request-Id"))
    return await _generate(request, job)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    job = parse_chat(await read_body(request), request.app[MODEL_NAME], request.headers.get("X-Request-Id"))
    return await _generate(request, job)


def _start(pool: PoolClient, job: Job) -> RequestHandle:
    """Submit the job, its refusals as HTTP errors."""
    try:
        return _submit(pool, job)
    except Overloaded as e:
        raise ApiError(
            429, str(e), type_="requests", code="rate_limit_exceeded", headers={"Retry-After": "1"}
        ) from None
    except ServiceUnavailable as e:
        raise unavailable(e) from None
    except DuplicateRequest as e:
        raise InvalidRequest(str(e), param="X-Request-Id") from None


async def _generate(request: web.Request, job: Job) -> web.StreamResponse:
    pool = request.app[POOL_CLIENT]
    handle = _start(pool, job)
    try:
        if job.stream:
            return await _stream(request, job, handle, StreamEncoder(job))
        collector = ResponseCollector(job)
        while not collector.done:
            collector.add(await handle.next_batch())
        return json_response(collector.body(), headers={"X-Request-Id": job.request_id})
    finally:
        pool.release(handle)


class SseEncoder(Protocol):
    """Turns a request's deltas into SSE bytes: StreamEncoder, ResponseEventStream."""

    @property
    def done(self) -> bool: ...

    def feed(self, deltas: list[RequestDelta]) -> bytes: ...

    def end(self) -> bytes: ...


async def _stream(request: web.Request, job: Job, handle: RequestHandle, encoder: SseEncoder) -> web.StreamResponse:
    # Headers wait for the first output, so a request rejected before its first token
    # (e.g. a prompt that is too long) gets a real HTTP error, not a 200 stream.
    payload = encoder.feed(await handle.next_batch())
    resp = web.StreamResponse(headers={**SSE_HEADERS, "X-Request-Id": job.request_id})
    await resp.prepare(request)
    try:
        while True:
            if encoder.done:
                payload += encoder.end()
            await resp.write(payload)
            if encoder.done:
                break
            payload = encoder.feed(await handle.next_batch())
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client went away; release() aborts what is still running
    return resp


async def create_response(request: web.Request) -> web.StreamResponse:
    """POST /v1/responses: the chat path underneath, Response objects and events on top."""
    store = request.app[RESPONSE_STORE]
    try:
        req = parse_responses(
            await read_body(request), request.app[MODEL_NAME], request.headers.get("X-Request-Id"), store
        )
        pool = request.app[POOL_CLIENT]
        handle = _start(pool, req.job)
        try:
            if req.job.stream:
                events = ResponseEventStream(req)
                resp = await _stream(request, req.job, handle, events)
                if events.final is not None:
                    _store(store, req, events.final)
                return resp
            collector = ResponseCollector(req.job)
            while not collector.done:
                collector.add(await handle.next_batch())
            choice = collector.choices[0]
            body = response_object(
                req, status_of(choice.finish_reason), output_items(choice), responses_usage(collector.usage())
            )
            _store(store, req, body)
            return json_response(body, headers={"X-Request-Id": req.job.request_id})
        finally:
            pool.release(handle)
    except ApiError as e:  # the engine's errors name chat parameters (response_format, max_tokens)
        param = responses_param(e.param)
        if e.param and param and param != e.param:
            e.message = e.message.replace(e.param, param)
        e.param = param
        raise


def _store(store: ResponseStore, req: ResponseRequest, body: dict[str, Any]) -> None:
    if req.store:
        # The output, sent back as input, is the assistant turn of the conversation.
        conversation = req.conversation + input_messages(body["output"], "output")
        store.put(body["id"], StoredResponse(response=body, conversation=conversation, input_items=req.input_items))


def _stored(request: web.Request) -> StoredResponse:
    response_id = request.match_info["response_id"]
    stored = request.app[RESPONSE_STORE].get(response_id)
    if stored is None:
        raise ApiError(404, f"Response with id '{response_id}' not found.", code="response_not_found")
    return stored


async def get_response(request: web.Request) -> web.Response:
    if request.query.get("stream", "false").lower() not in ("false", "0"):
        raise InvalidRequest("stream is not supported when retrieving a stored response", param="stream")
    return json_response(_stored(request).response)


MAX_ITEMS_LIMIT = 100


async def list_input_items(request: web.Request) -> web.Response:
    """GET /v1/responses/{id}/input_items: a cursor page, newest first unless order=asc."""
    items = _stored(request).input_items
    query = request.query
    if query.getall("include", []) or query.getall("include[]", []):
        raise InvalidRequest("include is not supported", param="include", code="unsupported_parameter")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be asc or desc", param="order")
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_ITEMS_LIMIT:
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_ITEMS_LIMIT}", param="limit")
    ordered = items if order == "asc" else items[::-1]
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise InvalidRequest(f"no input item {after!r} in this response", param="after")
        ordered = ordered[ids.index(after) + 1 :]
    page = ordered[:limit]
    return json_response(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(ordered) > limit,
        }
    )


async def delete_response(request: web.Request) -> web.Response:
    stored = _stored(request)
    request.app[RESPONSE_STORE].delete(stored.response["id"])
    return json_response({"id": stored.response["id"], "object": "response", "deleted": True})


async def cancel(request: web.Request) -> web.Response:
    request_id = request.match_info["request_id"]
    pool = request.app[POOL_CLIENT]
    # The response id, or the X-Request-Id the client chose (the response id less its prefix).
    candidates = (request_id, f"cmpl-{request_id}", f"chatcmpl-{request_id}", f"resp_{request_id}")
    if not any(pool.abort(candidate) for candidate in candidates):
        raise ApiError(404, f"no request {request_id!r} is in flight", param="request_id", code="request_not_found")
    return json_response({"id": request_id, "object": "request.cancelled", "cancelled": True})


async def tokenize(request: web.Request) -> web.Response:
    body: TokenizeBody = decode_body(await read_body(request), TokenizeBody)
    check_model(body.model, request.app[MODEL_NAME])
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequest("give exactly one of prompt and messages", param="prompt")
    req = TokenizeRequest(
        request_id=f"tokenize-{uuid.uuid4().hex}",
        prompt=body.prompt,
        messages=chat_messages(body.messages) if body.messages is not None else None,
        add_special_tokens=True if body.add_special_tokens is None else body.add_special_tokens,
        add_generation_prompt=True if body.add_generation_prompt is None else body.add_generation_prompt,
    )
    try:
        result = await request.app[POOL_CLIENT].tokenize(req)
    except ServiceUnavailable as e:
        raise unavailable(e) from None
    if result.error is not None:
        raise ApiError.from_info(result.error)
    return json_response(
        {"count": len(result.token_ids), "max_model_len": result.max_model_len, "tokens": result.token_ids}
    )


async def detokenize(request: web.Request) -> web.Response:
    body: DetokenizeBody = decode_body(await read_body(request), DetokenizeBody)
    check_model(body.model, request.app[MODEL_NAME])
    req = DetokenizeRequest(request_id=f"detokenize-{uuid.uuid4().hex}", token_ids=body.tokens)
    try:
        result = await request.app[POOL_CLIENT].detokenize(req)
    except ServiceUnavailable as e:
        raise unavailable(e) from None
    if result.error is not None:
        raise ApiError.from_info(result.error)
    return json_response({"prompt": result.text})
