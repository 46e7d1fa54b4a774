"""Fakes for the gateway tests: the real app on a real port, against fake tokenizer workers.

Each FakeWorker binds a tokenizer input (ipc:// in a temp dir), records every message
the gateway sends it, and answers GenerateRequests with scripted RequestDelta streams;
it also plays the engine by sending EngineStats with its heartbeats. Tests switch a
worker's `script` and its `alive` / `engine_alive` flags to act out each scenario.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
import zmq
import zmq.asyncio
from aiohttp import web

from services.gateway.app import RUNNER_OPTIONS, GatewayRunner, build_app
from services.gateway.serving import POOL_CLIENT
from shared.config import Config, EngineConfig, ServeConfig
from shared.protocol import (
    AbortRequest,
    DetokenizeRequest,
    DetokenizeResult,
    EngineStats,
    ErrorInfo,
    GatewayOutputs,
    GenerateRequest,
    RequestDelta,
    TextLogprob,
    TokenizeRequest,
    TokenizeResult,
    TokenizerInput,
    WorkerHeartbeat,
    decoder,
    encode,
)
from shared.zmq_utils import pull_socket, push_socket

MODEL = "test-model"
TOKENS = ["Hello", ",", " world"]
RUN_MODE = "bfloat16+int4+int8-lm-head+fused-decode"
"""What the CPU default reports for the bundled model (run_mode.describe; the gateway tests do not
import torch to derive it, tests/engine_core/test_run_mode.py checks describe gives it)."""
HEARTBEAT_S = 0.05
TIMEOUT_S = 2.0  # a fake worker that misses heartbeats this long is silent; 1 s flaked on a loaded 2-core machine

Script = Callable[["FakeWorker", GenerateRequest], Awaitable[None]]


def logprobs_for(req: GenerateRequest, token: str) -> list[TextLogprob] | None:
    k = req.sampling_params.logprobs
    if k is None:
        return None
    top = [(f"alt{j}", -1.0 - j, list(f"alt{j}".encode())) for j in range(k)]
    return [TextLogprob(token=token, logprob=-0.5, bytes=list(token.encode()), top=top)]


async def say_hello(worker: FakeWorker, req: GenerateRequest) -> None:
    """Up to three tokens, one delta each; 'length' when max_tokens cuts it short."""
    max_tokens = req.sampling_params.max_tokens or len(TOKENS)
    n = min(max_tokens, len(TOKENS))
    for i in range(n):
        last = i == n - 1
        worker.send(
            RequestDelta(
                request_id=req.request_id,
                text=TOKENS[i],
                token_ids=[100 + i],
                logprobs=logprobs_for(req, TOKENS[i]),
                num_prompt_tokens=5,
                num_cached_tokens=2,
                num_output_tokens=i + 1,
                first_scheduled_time=time.time() if i == 0 else None,
                prompt_text=(req.prompt or "") if req.echo and i == 0 else None,
                finish_reason=("length" if max_tokens < len(TOKENS) else "stop") if last else None,
            )
        )
        await asyncio.sleep(0.005)


async def endless(worker: FakeWorker, req: GenerateRequest) -> None:
    """A token every 20 ms until the gateway aborts the request."""
    i = 0
    while req.request_id not in worker.aborted:
        i += 1
        worker.send(
            RequestDelta(request_id=req.request_id, text="x", token_ids=[7], num_prompt_tokens=5, num_output_tokens=i)
        )
        await asyncio.sleep(0.02)


async def silent(worker: FakeWorker, req: GenerateRequest) -> None:
    """Accepts the request and never answers (a stuck or dead engine)."""


async def prompt_too_long(worker: FakeWorker, req: GenerateRequest) -> None:
    worker.send(
        RequestDelta(
            request_id=req.request_id,
            finish_reason="abort",
            error=ErrorInfo(
                message="This model's maximum context length is 2048 tokens, but the prompt has 5000 tokens",
                param="messages",
                code="context_length_exceeded",
            ),
        )
    )


async def fail_after_one(worker: FakeWorker, req: GenerateRequest) -> None:
    worker.send(
        RequestDelta(request_id=req.request_id, text="Hi", token_ids=[1], num_prompt_tokens=5, num_output_tokens=1)
    )
    await asyncio.sleep(0.02)
    worker.send(
        RequestDelta(
            request_id=req.request_id,
            finish_reason="abort",
            error=ErrorInfo(message="internal engine error", status=500),
        )
    )


class FakeWorker:
    def __init__(self, index: int, ctx: zmq.asyncio.Context, addr: str, gateway_addr: str) -> None:
        self.index = index
        self.input = pull_socket(ctx, addr)
        self.output = push_socket(ctx, gateway_addr)
        self.decoder = decoder(TokenizerInput)
        self.script: Script = say_hello
        self.alive = True
        """False: no heartbeats and no tokenize / detokenize answers (a dead worker)."""
        self.engine_alive = True
        """False: no engine stats (a dead engine behind a live worker)."""
        self.generates: list[GenerateRequest] = []
        self.aborted: set[str] = set()
        self.abort_messages: list[list[str]] = []
        self.rpcs_dropped: list[str] = []
        """Tokenize / detokenize requests that reached it while dead."""
        self.tasks: list[asyncio.Task[None]] = []

    def send(self, *deltas: RequestDelta) -> None:
        self.output.send(encode(GatewayOutputs(worker=self.index, deltas=list(deltas))))

    async def run(self) -> None:
        self.tasks.append(asyncio.create_task(self._heartbeats()))
        while True:
            msg = self.decoder.decode(await self.input.recv())
            if isinstance(msg, GenerateRequest):
                self.generates.append(msg)
                self.tasks.append(asyncio.create_task(self.script(self, msg)))
            elif isinstance(msg, AbortRequest):
                self.abort_messages.append(msg.request_ids)
                self.aborted.update(msg.request_ids)
            elif isinstance(msg, (TokenizeRequest, DetokenizeRequest)) and not self.alive:
                self.rpcs_dropped.append(msg.request_id)
            elif isinstance(msg, TokenizeRequest):
                ids = [len(w) for w in (msg.prompt or "").split()]
                self.output.send(encode(TokenizeResult(request_id=msg.request_id, token_ids=ids, max_model_len=2048)))
            elif isinstance(msg, DetokenizeRequest):
                self.output.send(
                    encode(DetokenizeResult(request_id=msg.request_id, text=" ".join(map(str, msg.token_ids))))
                )

    async def _heartbeats(self) -> None:
        while True:
            if self.alive:
                self.output.send(encode(WorkerHeartbeat(worker=self.index, timestamp=time.time(), max_model_len=2048)))
                if self.engine_alive:
                    stats = EngineStats(
                        engine_index=0,
                        timestamp=time.time(),
                        run_mode=RUN_MODE,
                        num_running=1,
                        num_waiting=2,
                        kv_usage=0.25,
                        prefix_queries_total=100,
                        prefix_hits_total=40,
                        preemptions_total=3,
                        steps_total=10,
                        last_step_time_s=0.01,
                        last_batch_size=4,
                        spec_num_drafts=5,
                        spec_num_draft_tokens=12,
                        spec_num_accepted_tokens=8,
                        spec_num_accepted_tokens_per_pos=[4, 3, 1],
                    )
                    self.output.send(encode(GatewayOutputs(worker=self.index, deltas=[], stats=stats)))
            await asyncio.sleep(HEARTBEAT_S)


@dataclass
class Gateway:
    url: str
    config: Config
    workers: list[FakeWorker]
    app: web.Application
    runner: web.AppRunner

    @property
    def generates(self) -> list[GenerateRequest]:
        return sorted((g for w in self.workers for g in w.generates), key=lambda g: g.request_id)

    def set_script(self, script: Script) -> None:
        for w in self.workers:
            w.script = script

    def aborted(self) -> set[str]:
        return set().union(*(w.aborted for w in self.workers))

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            await asyncio.sleep(0.01)

    async def post(
        self, path: str, body: Any = None, *, data: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        async with aiohttp.ClientSession() as s:
            payload = data if data is not None else msgspec.json.encode(body)
            async with s.post(self.url + path, data=payload, headers=headers) as r:
                raw = await r.read()
                return r.status, (msgspec.json.decode(raw) if raw[:1] == b"{" else raw), r

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        async with aiohttp.ClientSession() as s, s.get(self.url + path, headers=headers) as r:
            return r.status, await r.read()


GatewayFactory = Callable[..., Awaitable[Gateway]]


async def start_gateway(**serve: Any) -> tuple[Gateway, Callable[[], Awaitable[None]]]:
    """A gateway with two fake workers (keyword arguments override ServeConfig fields), and its stop."""
    # A short dir: ipc paths must fit in a unix socket address (~107 bytes).
    run_dir = tempfile.mkdtemp(prefix="ngw-", dir="/tmp")
    config = Config(
        engine=EngineConfig(served_model_name=MODEL),
        serve=ServeConfig(
            **{
                "gateway_addr": f"ipc://{run_dir}/gateway",
                "tokenizer_addrs": [f"ipc://{run_dir}/tok-0", f"ipc://{run_dir}/tok-1"],
                "engine_addrs": [f"ipc://{run_dir}/engine-0"],
                "heartbeat_s": HEARTBEAT_S,
                "engine_timeout_s": TIMEOUT_S,
                **serve,
            }
        ),
    )
    ctx = zmq.asyncio.Context()
    # The workers connect before the gateway binds; retry fast rather than zmq's 100 ms.
    ctx.setsockopt(zmq.RECONNECT_IVL, 5)
    workers = [
        FakeWorker(i, ctx, addr, config.serve.gateway_addr)  # type: ignore[arg-type]
        for i, addr in enumerate(config.serve.tokenizer_addrs)
    ]
    worker_tasks = [asyncio.create_task(w.run()) for w in workers]
    app = build_app(config)
    runner = GatewayRunner(app, **RUNNER_OPTIONS)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]

    async def stop() -> None:
        if runner.server is not None:  # not already stopped by the test
            await runner.cleanup()
        for task in worker_tasks + [t for w in workers for t in w.tasks]:
            task.cancel()
        for task in worker_tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        ctx.destroy(linger=0)
        shutil.rmtree(run_dir, ignore_errors=True)

    gw = Gateway(url=f"http://127.0.0.1:{port}", config=config, workers=workers, app=app, runner=runner)
    await gw.wait_for(lambda: app[POOL_CLIENT].health() is None)
    return gw, stop
