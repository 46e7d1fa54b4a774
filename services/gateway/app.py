"""The aiohttp application: routes, middlewares (metrics, errors, auth), start-up.

The gateway only parses HTTP, routes messages and formats responses; tokenization and
the model run in other processes, so the event loop never does GIL-heavy work.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST

from services.gateway import serving
from services.gateway.metrics import GatewayMetrics
from services.gateway.openai_api import ApiError
from services.gateway.openapi import openapi_spec
from services.gateway.pool_client import PoolClient
from services.gateway.responses_store import ResponseStore
from services.gateway.serving import MODEL_NAME, POOL_CLIENT, RESPONSE_STORE, json_response
from shared.config import Config
from shared.errors import InvalidRequest

log = logging.getLogger(__name__)

METRICS: web.AppKey[GatewayMetrics] = web.AppKey("metrics", GatewayMetrics)
STATIC_DIR = Path(__file__).parent / "static"
# handler_cancellation: a client that disconnects cancels its handler, whose cleanup
# aborts the engine requests (for non-streaming requests nothing else would notice).
# shutdown_timeout: what handlers get to write their last bytes once the drain is over.
RUNNER_OPTIONS: dict[str, Any] = {"handler_cancellation": True, "shutdown_timeout": 5.0, "access_log": None}
LINGER_S = 5.0
"""How long a connection closed after an unreadable body keeps discarding what the client still sends."""
CLIENT_CLOSED_REQUEST = 499  # nginx's code for "the client went away", used in metrics only

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _version() -> str:
    try:
        return importlib.metadata.version("novainfer")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without `pip install`
        return "unknown"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    resource = request.match_info.route.resource
    # The route template, not the path: request ids must not become label values.
    endpoint = resource.canonical if resource is not None else "unmatched"
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as e:
        status = e.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED_REQUEST
        raise
    finally:
        request.app[METRICS].count_http(endpoint, status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except InvalidRequest as e:
        return ApiError.invalid(e).response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        # 413's text names the limit; the others' reason ("Not Found") is the message.
        message = (e.text or e.reason) if e.status == 413 else e.reason
        return ApiError(e.status, message).response()
    except (HttpProcessingError, web.RequestPayloadError) as e:
        # A body aiohttp could not read: a Content-Encoding it does not match, a broken chunk.
        # Its parser stops at the error, so the rest of the body cannot be drained and aiohttp
        # closes the connection after the response: say so (Connection: close), or a client that
        # pools connections sends its next request on this one and gets a reset.
        resp = ApiError(400, f"the request body could not be read: {_http_error_message(e)}").response()
        resp.force_close()
        if isinstance(request.protocol, _OpenAIErrorRequestHandler):
            request.protocol.linger_on_close = True
        return resp
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return ApiError(500, "internal server error").response()


def _http_error_message(e: BaseException) -> str:
    if isinstance(e, HttpProcessingError):
        return e.message.splitlines()[0] if e.message else "bad request"
    cause = e.__cause__ or e.__context__  # RequestPayloadError wraps the parser's error
    return _http_error_message(cause) if isinstance(cause, HttpProcessingError) else str(e).strip()


class _OpenAIErrorRequestHandler(RequestHandler):
    """Answers requests that fail before any handler runs (malformed HTTP framing, a bad
    Content-Length, an unknown Content-Encoding) with OpenAI's error JSON, not aiohttp's text;
    and closes the connection after an unreadable body without destroying the answer."""

    linger_on_close = False
    """Set after a 400 for an unreadable body: the rest of that body may still be arriving."""

    def force_close(self) -> None:
        # Closing a socket with unread bytes in its receive buffer makes the kernel send a RST,
        # which can discard the 400 before the client reads it (a connection reset on a large
        # body). So, as HTTP servers do: half-close (FIN after the answer), discard what still
        # arrives (data_received ignores data once _force_close is set), and close when the
        # client does, or after LINGER_S.
        transport = self.transport
        if not self.linger_on_close or transport is None or transport.is_closing():
            super().force_close()
            return
        self._force_close = True
        if self._waiter:
            self._waiter.cancel()
        self.transport = None
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_S, transport.close)

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp's: a response started, the connection is broken
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
            text = HTTPStatus(status).phrase.lower()
        elif isinstance(exc, HttpProcessingError):
            log.info("malformed HTTP request from %s: %s", request.remote, exc)
            text = f"malformed HTTP request: {_http_error_message(exc)}"
        else:
            text = "malformed HTTP request"
        resp = ApiError(status, text).response()
        resp.force_close()
        return resp

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # After the 400 for an unreadable body, aiohttp's lingering read of the rest of it raises
        # the same payload error again and it closes the connection, as announced: not a bug.
        exc = kw.get("exc_info")
        if isinstance(exc, web.RequestPayloadError):
            log.debug("closed a connection after an unreadable request body: %s", exc)
            return
        super().log_exception(*args, **kw)


class _OpenAIErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _OpenAIErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """web.AppRunner whose connections answer framing errors in OpenAI's shape."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp has no option for the connection handler class; the subclass only adds __call__.
        server.__class__ = _OpenAIErrorServer
        return server


def _auth_middleware(api_key: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        # /health, /metrics, /version and the chat page stay open to probes and browsers.
        if request.path.startswith("/v1/") or request.path in ("/tokenize", "/detokenize"):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise ApiError(
                    401,
                    "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                    code="invalid_api_key",
                )
        return await handler(request)

    return auth


def build_app(config: Config) -> web.Application:
    """The gateway app; its tokenizer-pool client starts with the app and stops after it drained."""
    model_name = config.model_name()
    middlewares: list[Middleware] = [metrics_middleware, error_middleware]
    if config.serve.api_key:
        middlewares.append(_auth_middleware(config.serve.api_key))
    app = web.Application(middlewares=middlewares, client_max_size=config.serve.max_body_bytes)
    metrics = GatewayMetrics(
        model_name, vllm_compat=config.serve.metrics_compat == "vllm", block_size=config.engine.block_size
    )
    pool = PoolClient(config, metrics)
    app[METRICS] = metrics
    app[POOL_CLIENT] = pool
    app[MODEL_NAME] = model_name
    app[RESPONSE_STORE] = ResponseStore(config.serve.responses_store_size)
    started = int(time.time())

    async def pool_ctx(_: web.Application) -> AsyncIterator[None]:
        await pool.start()
        yield
        await pool.close()

    async def on_shutdown(_: web.Application) -> None:
        pool.begin_shutdown()

    app.cleanup_ctx.append(pool_ctx)
    app.on_shutdown.append(on_shutdown)

    def model_card() -> dict[str, Any]:
        return {
            "id": model_name,
            "object": "model",
            "created": started,
            "owned_by": "novainfer",
            "root": config.engine.model,
            "max_model_len": pool.max_model_len or None,
            "run_mode": pool.run_mode or None,
        }

    async def list_models(_: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [model_card()]})

    async def get_model(request: web.Request) -> web.Response:
        if request.match_info["model"] != model_name:
            raise ApiError(
                404, f"The model `{request.match_info['model']}` does not exist.", param="model", code="model_not_found"
            )
        return json_response(model_card())

    async def health(_: web.Request) -> web.Response:
        problem = pool.health()
        if problem is None:
            return json_response({"status": "ok"})
        return json_response({"status": "unavailable", "reason": problem}, status=503)

    async def metrics_endpoint(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def version(_: web.Request) -> web.Response:
        return json_response({"version": _version()})

    spec = openapi_spec(_version())

    async def openapi(_: web.Request) -> web.Response:
        return json_response(spec)

    async def index(_: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    app.add_routes(
        [
            web.post("/v1/completions", serving.completions),
            web.post("/v1/chat/completions", serving.chat_completions),
            web.post("/v1/responses", serving.create_response),
            web.get("/v1/responses/{response_id}", serving.get_response),
            web.delete("/v1/responses/{response_id}", serving.delete_response),
            web.get("/v1/responses/{response_id}/input_items", serving.list_input_items),
            web.get("/v1/models", list_models),
            web.get("/v1/models/{model}", get_model),
            web.post("/v1/requests/{request_id}/cancel", serving.cancel),
            web.post("/tokenize", serving.tokenize),
            web.post("/detokenize", serving.detokenize),
            web.get("/health", health),
            web.get("/metrics", metrics_endpoint),
            web.get("/version", version),
            web.get("/openapi.json", openapi),
            web.get("/", index),
            # The chat page's scripts, styles and vendored libraries (no CDN: it works offline).
            web.static("/static", STATIC_DIR),
        ]
    )
    return app


async def serve(config: Config) -> None:
    """Serve until SIGTERM/SIGINT, then drain: new requests and /health get 503 while the
    in-flight ones finish (up to --drain-timeout-s; what is left then fails with a 503), then
    stop listening and stop the tokenizer-pool client.

    Not web.run_app: it cancels its own task on a signal, which cuts the drain short.
    """
    app = build_app(config)
    pool = app[POOL_CLIENT]
    runner = GatewayRunner(app, handle_signals=False, **RUNNER_OPTIONS)
    await runner.setup()
    await web.TCPSite(runner, config.serve.host, config.serve.port).start()
    log.info(
        "gateway for %s on http://%s:%d (input %s, %d tokenizer workers)",
        config.model_name(),
        config.serve.host,
        config.serve.port,
        config.serve.gateway_addr,
        len(config.serve.tokenizer_addrs),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    pool.begin_shutdown()
    log.info("stopping: draining %d in-flight requests (up to %.0fs)", pool.num_in_flight, config.serve.drain_timeout_s)
    deadline = loop.time() + config.serve.drain_timeout_s
    while pool.num_in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if pool.num_in_flight:
        log.warning("drain timeout: failing %d requests still in flight", pool.num_in_flight)
        pool.fail_all("the server is shutting down")
    await runner.cleanup()


def run(config: Config) -> None:
    asyncio.run(serve(config))
