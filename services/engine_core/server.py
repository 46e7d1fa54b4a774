"""The engine-core process: a step loop fed by ZMQ.

One PULL input (EngineRequest / AbortRequest from tokenizer workers), one PUSH per
tokenizer worker. Each step's outputs go out as one EngineOutputs per worker that
has requests in the step. Inputs are drained before every step, so aborts apply
before the next forward; with nothing to do the loop blocks on the socket (no
spinning).

Liveness is reported by a separate heartbeat thread (torch releases the GIL during
a step), so a long step on a slow or busy machine is never mistaken for a dead
engine: the gateway fails requests only when the process is really gone.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import zmq

from services.engine_core.engine import LLMEngine
from services.engine_core.kv_event_publisher import KVEventPublisher
from shared.config import Config
from shared.errors import InvalidRequest
from shared.protocol import (
    FINISH_ABORT,
    AbortRequest,
    EngineInput,
    EngineOutput,
    EngineOutputs,
    EngineRequest,
    EngineStats,
    ErrorInfo,
    TokenizerVocab,
    decoder,
    encode,
)
from shared.zmq_utils import new_context, pull_socket, push_socket

log = logging.getLogger(__name__)

_COMPILE_POLL_MS = 2


class EngineCoreServer:
    def __init__(self, config: Config) -> None:
        serve = config.serve
        if not serve.tokenizer_addrs or not serve.engine_addrs:
            raise ValueError("engine core needs tokenizer_addrs and engine_addrs (see Config.with_default_addresses)")
        self.config = config
        self.index = serve.engine_index
        self.engine = LLMEngine(
            config.engine, engine_index=self.index, record_kv_events=serve.kv_events_endpoint is not None
        )
        self.ctx = new_context()
        self.kv_events = (
            KVEventPublisher(
                self.ctx,
                serve.kv_events_endpoint,
                serve.kv_events_replay_endpoint,
                self.index,
                serve.kv_events_topic,
                serve.kv_events_buffer_steps,
            )
            if serve.kv_events_endpoint
            else None
        )
        self.input = pull_socket(self.ctx, serve.engine_addrs[self.index])
        self.workers = [push_socket(self.ctx, addr) for addr in serve.tokenizer_addrs]
        self.decoder = decoder(EngineInput)
        # One handler per message type of EngineInput.
        self._handlers: dict[type, Callable[[Any], None]] = {
            EngineRequest: self._on_request,
            AbortRequest: self._on_abort,
            TokenizerVocab: self._on_vocab,
        }
        self.owner: dict[str, int] = {}
        """request id -> tokenizer worker index."""
        self.pending: dict[int, list[EngineOutput]] = defaultdict(list)
        self.latest_stats: EngineStats = self.engine.stats()
        """Replaced (never mutated) by the loop, read by the heartbeat thread."""
        self.running = True
        self._stopped = threading.Event()

    def stop(self, *_: object) -> None:
        self.running = False
        self._stopped.set()

    def _handle(self, raw: bytes | memoryview) -> None:
        try:
            msg = self.decoder.decode(raw)
        except Exception as e:  # a bad message must never take the engine down
            log.error("dropping undecodable message: %s", e)
            return
        self._handlers[type(msg)](msg)

    def _on_request(self, msg: EngineRequest) -> None:
        if not 0 <= msg.worker < len(self.workers):
            log.error("request %s names unknown worker %d", msg.request_id, msg.worker)
            return
        try:
            self.engine.add_request(
                msg.request_id,
                msg.prompt_token_ids,
                msg.sampling_params,
                msg.eos_token_ids or None,
                msg.arrival_time or None,
                msg.reasoning,
            )
            self.owner[msg.request_id] = msg.worker
        except InvalidRequest as e:
            self.pending[msg.worker].append(
                EngineOutput(
                    request_id=msg.request_id,
                    finish_reason=FINISH_ABORT,
                    num_prompt_tokens=len(msg.prompt_token_ids),
                    error=ErrorInfo.invalid(e),
                )
            )
        except Exception as e:
            log.exception("failed to add request %s", msg.request_id)
            self.pending[msg.worker].append(
                EngineOutput(
                    request_id=msg.request_id,
                    finish_reason=FINISH_ABORT,
                    error=ErrorInfo(message=f"internal error: {e}", status=500),
                )
            )

    def _on_abort(self, msg: AbortRequest) -> None:
        for out in self.engine.abort(msg.request_ids):
            self._route(out)

    def _on_vocab(self, msg: TokenizerVocab) -> None:
        self.engine.set_tokenizer_vocab(msg.tokenizer_json, msg.eos_token_ids)

    def _route(self, out: EngineOutput) -> None:
        worker = self.owner.get(out.request_id)
        if worker is None:
            return
        self.pending[worker].append(out)
        if out.finish_reason is not None:
            del self.owner[out.request_id]

    def _flush(self) -> None:
        self.latest_stats = self.engine.stats()
        if self.kv_events is not None:
            self.kv_events.publish(self.engine.block_manager.take_events())
        if not self.pending:
            return
        for worker, outs in self.pending.items():
            self.workers[worker].send(
                encode(EngineOutputs(engine_index=self.index, outputs=outs, stats=self.latest_stats)),
                copy=False,
            )
        self.pending.clear()

    def _heartbeat_loop(self) -> None:
        # Own sockets: ZMQ sockets must not be shared between threads.
        socks = [push_socket(self.ctx, addr) for addr in self.config.serve.tokenizer_addrs]
        try:
            while True:
                msg = encode(EngineOutputs(engine_index=self.index, outputs=[], stats=self.latest_stats))
                for sock in socks:
                    sock.send(msg)
                if self._stopped.wait(self.config.serve.heartbeat_s):
                    return
        finally:
            for sock in socks:
                sock.close(linger=0)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.input, zmq.POLLIN)
        replay = self.kv_events.replay if self.kv_events is not None else None
        if replay is not None:
            poller.register(replay, zmq.POLLIN)
        heartbeat_ms = int(self.config.serve.heartbeat_s * 1000)
        log.info("engine core %d ready on %s", self.index, self.config.serve.engine_addrs[self.index])
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        heartbeat.start()
        while self.running:
            if self.engine.only_compiling:  # poll the compile threads without spinning
                timeout = _COMPILE_POLL_MS
            else:
                timeout = 0 if self.engine.has_unfinished() else heartbeat_ms
            ready = dict(poller.poll(timeout))
            if replay is not None and replay in ready:
                self.kv_events.serve_replay()  # type: ignore[union-attr]
            if self.input in ready:
                while True:
                    try:
                        self._handle(self.input.recv(zmq.NOBLOCK, copy=False).buffer)
                    except zmq.Again:
                        break
            if self.engine.has_unfinished():
                try:
                    for out in self.engine.step():
                        self._route(out)
                except Exception:
                    # A failed step must not leave requests hanging: fail them all loudly.
                    log.exception("engine step failed; aborting all requests")
                    for out in self.engine.abort(list(self.owner)):
                        out.error = ErrorInfo(message="internal engine error", status=500)
                        self._route(out)
            self._flush()
        self._stopped.set()
        heartbeat.join()
        if self.kv_events is not None:
            self.kv_events.close()
        self.ctx.destroy(linger=0)


def freeze_startup_heap() -> None:
    """Move every object alive after start-up out of the garbage collector's sight.

    The imported modules (torch and the rest) and the model are ~170k tracked objects that
    live as long as the process, and Python's collector walks all of them at every collection
    of its oldest generation: ~190 ms on the shared 2-core machine, a stall of every stream.
    Those collections come once the objects created since the last one reach a quarter of the
    heap, and the suffix proposer's tries add up to 24 objects per token (a stall every ~2k
    tokens served). Frozen (as vLLM's engine core does), they are never walked again, and a
    collection costs what the objects created while serving do."""
    gc.collect()
    gc.freeze()


def main(config: Config, started: float | None = None) -> None:
    """started: time.monotonic() when the process started, to log where start-up time goes."""
    imported = time.monotonic()
    server = EngineCoreServer(config)
    freeze_startup_heap()
    if started is not None:
        log.info(
            "engine core %d started in %.1fs: %.1fs of imports, %.1fs to load the model and allocate the KV cache",
            server.index,
            time.monotonic() - started,
            imported - started,
            time.monotonic() - imported,
        )
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    server.run()
