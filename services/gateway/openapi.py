"""The OpenAPI 3.1 description of the HTTP API, served at /openapi.json.

Request bodies are the msgspec structs the handlers decode (openai_api.py), turned into JSON
Schema by msgspec itself, so the description cannot drift from what the gateway accepts.
Success responses are described loosely (a JSON object, or an SSE stream); every error is
OpenAI's error object, which is the part clients and fuzzers check.
"""

from __future__ import annotations

from typing import Any

import msgspec

from services.gateway.openai_api import ChatBody, CompletionBody, DetokenizeBody, TokenizeBody
from services.gateway.responses_api import ResponsesBody

SCHEMAS = "#/components/schemas/{name}"


class ErrorObject(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    """Every 4xx and 5xx: {"error": {message, type, param, code}}, as OpenAI answers."""

    error: ErrorObject


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _operation(
    summary: str, body: dict[str, Any] | None = None, *, stream: bool = False, errors: tuple[int, ...] = ()
) -> dict[str, Any]:
    ok: dict[str, Any] = _json({"type": "object"})
    if stream:
        ok["text/event-stream"] = {"schema": {"type": "string"}}
    error = {"$ref": SCHEMAS.format(name="ErrorResponse")}
    responses: dict[str, Any] = {"200": {"description": "OK", "content": ok}}
    for status in errors:
        responses[str(status)] = {"description": _REASONS[status], "content": _json(error)}
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": True, "content": _json(body)}
    return op


_REASONS = {
    400: "Invalid request",
    401: "Missing or wrong API key (with --api-key)",
    404: "Unknown model or request",
    413: "Body over --max-body-bytes",
    415: "Unsupported Content-Encoding",
    429: "Too many requests in flight (Retry-After)",
    500: "Internal error",
    503: "A component is down or restarting, or the server is shutting down (Retry-After)",
}
_GENERATE_ERRORS = (400, 401, 404, 413, 415, 429, 500, 503)


def openapi_spec(version: str) -> dict[str, Any]:
    (completion, chat, responses, tokenize, detokenize, _), components = msgspec.json.schema_components(
        [CompletionBody, ChatBody, ResponsesBody, TokenizeBody, DetokenizeBody, ErrorResponse], ref_template=SCHEMAS
    )
    model_param = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    request_id = {"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"}}
    response_id = {"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}
    page = [
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
        {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}},
        {"name": "after", "in": "query", "schema": {"type": "string"}},
    ]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "NovaInfer",
            "version": version,
            "description": "OpenAI-compatible completions, chat completions and responses; vLLM's tokenize/detokenize.",
        },
        "paths": {
            "/v1/completions": {
                "post": _operation("Create a completion", completion, stream=True, errors=_GENERATE_ERRORS)
            },
            "/v1/chat/completions": {
                "post": _operation("Create a chat completion", chat, stream=True, errors=_GENERATE_ERRORS)
            },
            "/v1/responses": {
                "post": _operation("Create a response (Responses API)", responses, stream=True, errors=_GENERATE_ERRORS)
            },
            "/v1/responses/{response_id}": {
                "get": {**_operation("A stored response", errors=(400, 401, 404)), "parameters": [response_id]},
                "delete": {**_operation("Delete a stored response", errors=(401, 404)), "parameters": [response_id]},
            },
            "/v1/responses/{response_id}/input_items": {
                "get": {
                    **_operation("A stored response's input items", errors=(400, 401, 404)),
                    "parameters": [response_id, *page],
                }
            },
            "/v1/models": {"get": _operation("List the served model", errors=(401,))},
            "/v1/models/{model}": {
                "get": {**_operation("The served model", errors=(401, 404)), "parameters": [model_param]}
            },
            "/v1/requests/{request_id}/cancel": {
                "post": {
                    **_operation("Cancel a request in flight (its X-Request-Id)", errors=(401, 404)),
                    "parameters": [request_id],
                }
            },
            "/tokenize": {"post": _operation("Tokenize a prompt or chat", tokenize, errors=(400, 404, 413, 503))},
            "/detokenize": {"post": _operation("Detokenize token ids", detokenize, errors=(400, 404, 413, 503))},
            "/health": {
                "get": {
                    "summary": "Readiness: 200 when every component is up, else 503 (e.g. while one restarts)",
                    "responses": {
                        "200": {"description": "Up", "content": _json({"type": "object"})},
                        "503": {"description": "Not ready: {status, reason}", "content": _json({"type": "object"})},
                    },
                }
            },
            "/version": {"get": _operation("The server's version")},
        },
        "components": {"schemas": components},
    }
