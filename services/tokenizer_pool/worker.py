"""One tokenizer worker: tokenizes requests for the engines and detokenizes their outputs.

It owns a PULL input (tokenizer_addrs[index]) fed by the gateway and by every engine,
and PUSHes to the gateway and to each engine. Everything runs in one thread: a worker
is one core's worth of tokenization, and the pool scales by running more workers.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from services.tokenizer_pool.detokenizer import RequestStream
from services.tokenizer_pool.reasoning_parser import ReasoningParser, detect_family, reasoning_for_prompt
from services.tokenizer_pool.tokenizer import Tokenizer, load_tokenizer
from services.tokenizer_pool.tool_parser import ToolCallParser, ToolParserFamily
from services.tokenizer_pool.tool_parser import detect_family as detect_tool_family
from shared import zmq_utils
from shared.config import Config
from shared.errors import InvalidRequest, check_context_length
from shared.log_setup import setup_logging
from shared.protocol import (
    FINISH_ABORT,
    AbortRequest,
    DetokenizeRequest,
    DetokenizeResult,
    EngineOutputs,
    EngineRequest,
    ErrorInfo,
    GatewayOutputs,
    GenerateRequest,
    RequestDelta,
    TokenizeRequest,
    TokenizeResult,
    TokenizerInput,
    TokenizerVocab,
    WorkerHeartbeat,
    decoder,
    encode,
    shard,
)

log = logging.getLogger(__name__)

# Messages handled between two heartbeat checks, so a flood cannot silence the heartbeat.
_MAX_BATCH = 256


class TokenizerWorker:
    def __init__(self, config: Config, index: int, tokenizer: Tokenizer | None = None) -> None:
        serve = config.serve
        if not serve.gateway_addr or not serve.engine_addrs or index >= len(serve.tokenizer_addrs):
            raise ValueError("tokenizer worker needs gateway_addr, engine_addrs and its tokenizer_addrs entry")
        self.index = index
        self._heartbeat_s = serve.heartbeat_s
        self._ctx = zmq_utils.new_context()
        # Bind first: messages sent while the tokenizer loads wait in the socket.
        self._input = zmq_utils.pull_socket(self._ctx, serve.tokenizer_addrs[index])
        self._gateway = zmq_utils.push_socket(self._ctx, serve.gateway_addr)
        self._engines = [zmq_utils.push_socket(self._ctx, a) for a in serve.engine_addrs]
        self.tokenizer = tokenizer or load_tokenizer(config.engine)
        self._decoder = decoder(TokenizerInput)
        # One handler per message type of TokenizerInput.
        self._handlers: dict[type, Callable[[Any], None]] = {
            EngineOutputs: self._on_engine_outputs,
            GenerateRequest: self._on_generate,
            AbortRequest: self._on_abort,
            TokenizeRequest: self._on_tokenize,
            DetokenizeRequest: self._on_detokenize,
        }
        self._streams: dict[str, RequestStream] = {}
        self._tool_parsers: dict[str, ToolCallParser] = {}
        """Chat requests whose output is parsed for tool calls."""
        family = config.engine.tool_call_parser
        self._tool_family: ToolParserFamily = (
            detect_tool_family(self.tokenizer.chat_template) if family == "auto" else family
        )
        self._reasoning_parsers: dict[str, ReasoningParser] = {}
        """Chat requests whose output is split into reasoning and content."""
        reasoning = config.engine.reasoning_parser
        self._reasoning_family = (
            detect_family(self.tokenizer) if reasoning == "auto" else None if reasoning == "none" else reasoning
        )
        self._parent_pid = os.getppid()
        # Before any request: ZMQ keeps order per connection, so an engine knows the vocabulary
        # (for structured outputs) by the time this worker's first request reaches it.
        vocab = encode(
            TokenizerVocab(tokenizer_json=self.tokenizer.backend.to_str(), eos_token_ids=self.tokenizer.eos_token_ids)
        )
        for engine in self._engines:
            engine.send(vocab)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._input, zmq.POLLIN)
        next_heartbeat = 0.0
        try:
            while True:
                now = time.monotonic()
                if now >= next_heartbeat:
                    if os.getppid() != self._parent_pid:
                        log.error("tokenizer worker %d: parent died, exiting", self.index)
                        return
                    self._send_gateway(
                        WorkerHeartbeat(
                            worker=self.index, timestamp=time.time(), max_model_len=self.tokenizer.max_model_len
                        )
                    )
                    next_heartbeat = now + self._heartbeat_s
                if not poller.poll(int(max(0.0, next_heartbeat - time.monotonic()) * 1000)):
                    continue
                for _ in range(_MAX_BATCH):
                    try:
                        raw = self._input.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.handle(raw)
        finally:
            self.close()

    def close(self) -> None:
        self._ctx.destroy(linger=0)

    def handle(self, raw: bytes) -> None:
        """Handle one input message; nothing a peer sends may stop the worker."""
        try:
            msg = self._decoder.decode(raw)
        except msgspec.DecodeError as e:
            log.warning("tokenizer worker %d: dropping undecodable message: %s", self.index, e)
            return
        try:
            self._handlers[type(msg)](msg)
        except Exception:  # a bug for one message must not take the worker down
            log.exception("tokenizer worker %d: failed to handle %s", self.index, type(msg).__name__)

    # --- gateway -> worker ------------------------------------------------------------

    def _on_generate(self, req: GenerateRequest) -> None:
        try:
            if req.request_id in self._streams:
                raise RuntimeError(f"request id {req.request_id!r} is already in flight")
            req.sampling_params.validate()
            prompt_ids, prompt_text = self._prompt(req)
        except InvalidRequest as e:
            self._send_error(req.request_id, ErrorInfo.invalid(e))
            return
        except Exception as e:
            log.exception("tokenizer worker %d: request %s", self.index, req.request_id)
            self._send_error(req.request_id, ErrorInfo(message=f"tokenization failed: {e}", status=500))
            return
        engine = req.engine
        if engine is None or not 0 <= engine < len(self._engines):
            engine = shard(req.request_id, len(self._engines))
        self._streams[req.request_id] = RequestStream(
            req.request_id,
            self.tokenizer,
            req.sampling_params,
            num_prompt_tokens=len(prompt_ids),
            engine=engine,
            prompt_text=prompt_text if req.echo else None,
        )
        if req.messages is not None and req.tools and req.tool_choice != "none":
            self._tool_parsers[req.request_id] = ToolCallParser(
                req.tool_choice, self._tool_family, req.tool_name, max_calls=None if req.parallel_tool_calls else 1
            )
        reasoning = None
        if req.messages is not None:
            parser, reasoning = reasoning_for_prompt(self.tokenizer, self._reasoning_family, prompt_text)
            if parser is not None:
                self._reasoning_parsers[req.request_id] = parser
        self._engines[engine].send(
            encode(
                EngineRequest(
                    request_id=req.request_id,
                    prompt_token_ids=prompt_ids,
                    sampling_params=req.sampling_params,
                    worker=self.index,
                    eos_token_ids=self.tokenizer.eos_token_ids,
                    arrival_time=req.arrival_time,
                    reasoning=reasoning,
                )
            )
        )

    def _prompt(self, req: GenerateRequest) -> tuple[list[int], str]:
        """The prompt's token ids and its text (for echo), validated."""
        given = [x is not None for x in (req.prompt, req.prompt_token_ids, req.messages)]
        if sum(given) != 1:
            raise InvalidRequest("exactly one of prompt, prompt_token_ids and messages must be given")
        tok = self.tokenizer
        if req.prompt is not None:
            if not req.prompt:
                raise InvalidRequest("the prompt is empty", param="prompt")
            ids, text = tok.encode(req.prompt), req.prompt
        elif req.prompt_token_ids is not None:
            ids = req.prompt_token_ids
            self._check_ids(ids, "prompt")
            # Decoding the prompt is only worth it when it is echoed back.
            text = tok.decode(ids, skip_special_tokens=False) if req.echo else ""
        else:
            if not req.messages:
                raise InvalidRequest("messages is empty", param="messages")
            text = tok.render_chat(req.messages, req.add_generation_prompt, req.tools, req.chat_template_kwargs)
            ids = tok.encode(text, add_special_tokens=False)
        param = "messages" if req.messages is not None else "prompt"
        if not ids:
            raise InvalidRequest("the prompt is empty", param=param)
        check_context_length(len(ids), req.sampling_params.max_tokens, tok.max_model_len, param)
        return ids, text

    def _check_ids(self, ids: list[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.tokenizer.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is out of vocabulary (size {self.tokenizer.vocab_size})", param=param)

    def _on_tokenize(self, req: TokenizeRequest) -> None:
        try:
            if (req.prompt is None) == (req.messages is None):
                raise InvalidRequest("exactly one of prompt and messages must be given")
            if req.messages is not None:
                ids = self.tokenizer.apply_chat_template(req.messages, req.add_generation_prompt)
            else:
                ids = self.tokenizer.encode(req.prompt or "", req.add_special_tokens)
            result = TokenizeResult(
                request_id=req.request_id, token_ids=ids, max_model_len=self.tokenizer.max_model_len
            )
        except InvalidRequest as e:
            result = TokenizeResult(request_id=req.request_id, error=ErrorInfo.invalid(e))
        except Exception as e:
            log.exception("tokenizer worker %d: tokenize %s", self.index, req.request_id)
            result = TokenizeResult(
                request_id=req.request_id, error=ErrorInfo(message=f"tokenize failed: {e}", status=500)
            )
        self._send_gateway(result)

    def _on_detokenize(self, req: DetokenizeRequest) -> None:
        try:
            self._check_ids(req.token_ids, "tokens")
            result = DetokenizeResult(
                request_id=req.request_id, text=self.tokenizer.decode(req.token_ids, skip_special_tokens=False)
            )
        except InvalidRequest as e:
            result = DetokenizeResult(request_id=req.request_id, error=ErrorInfo.invalid(e))
        except Exception as e:
            log.exception("tokenizer worker %d: detokenize %s", self.index, req.request_id)
            result = DetokenizeResult(
                request_id=req.request_id, error=ErrorInfo(message=f"detokenize failed: {e}", status=500)
            )
        self._send_gateway(result)

    def _on_abort(self, msg: AbortRequest) -> None:
        self._abort_in_engines(msg.request_ids)

    def _abort_in_engines(self, request_ids: list[str]) -> None:
        by_engine: dict[int, list[str]] = defaultdict(list)
        unknown: list[str] = []
        for request_id in request_ids:
            stream = self._streams.pop(request_id, None)
            self._tool_parsers.pop(request_id, None)
            self._reasoning_parsers.pop(request_id, None)
            if stream is not None:
                by_engine[stream.engine].append(request_id)
            else:
                unknown.append(request_id)
        # Unknown here: finished already (engines ignore the abort), or sent to the previous
        # incarnation of this worker, which died (the gateway aborts its requests after a
        # restart): an engine may still be running them for nobody. Which one, only the dead
        # worker knew (the gateway picks engines), so every engine is told.
        if unknown:
            for engine in range(len(self._engines)):
                by_engine[engine] += unknown
        for engine, ids in by_engine.items():
            self._engines[engine].send(encode(AbortRequest(request_ids=ids)))

    # --- engine -> worker -------------------------------------------------------------

    def _on_engine_outputs(self, msg: EngineOutputs) -> None:
        deltas: list[RequestDelta] = []
        to_abort: list[str] = []
        for out in msg.outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted or stopped here; the engine had not heard yet
            try:
                delta = stream.process(out)
                reasoning = self._reasoning_parsers.get(out.request_id)
                if reasoning is not None:
                    reasoning.split(delta, stream)  # tool calls are parsed out of the answer only
                parser = self._tool_parsers.get(out.request_id)
                if parser is not None:
                    _parse_tool_calls(parser, delta)
            except Exception as e:
                log.exception("tokenizer worker %d: output of %s", self.index, out.request_id)
                delta = RequestDelta(
                    request_id=out.request_id,
                    finish_reason=FINISH_ABORT,
                    error=ErrorInfo(message=f"detokenization failed: {e}", status=500),
                )
                stream.abort_in_engine = out.finish_reason is None  # still running in the engine
                stream.finished = True
            deltas.append(delta)
            if stream.finished:
                if stream.abort_in_engine:
                    to_abort.append(out.request_id)
                else:
                    del self._streams[out.request_id]
                    self._tool_parsers.pop(out.request_id, None)
                    self._reasoning_parsers.pop(out.request_id, None)
        self._abort_in_engines(to_abort)
        if deltas or msg.stats is not None:
            self._send_gateway(GatewayOutputs(worker=self.index, deltas=deltas, stats=msg.stats))

    # --- sending ----------------------------------------------------------------------

    def _send_error(self, request_id: str, error: ErrorInfo) -> None:
        delta = RequestDelta(request_id=request_id, finish_reason=FINISH_ABORT, error=error)
        self._send_gateway(GatewayOutputs(worker=self.index, deltas=[delta]))

    def _send_gateway(self, msg: msgspec.Struct) -> None:
        self._gateway.send(encode(msg))


def _parse_tool_calls(parser: ToolCallParser, delta: RequestDelta) -> None:
    """Move the calls in delta's text into delta.tool_calls; a finished request that made
    calls finishes with tool_calls, as OpenAI's do."""
    text, calls = parser.feed(delta.text)
    if delta.finish_reason is not None:
        rest, more = parser.finish()
        text, calls = text + rest, calls + more
        if parser.num_calls and delta.finish_reason == "stop":
            delta.finish_reason = "tool_calls"
    delta.text = text
    delta.tool_calls = calls or None


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def run_worker(config: Config, index: int) -> None:
    """Process entry point (multiprocessing 'spawn' target)."""
    setup_logging(config, f"tokenizer-{index}")
    # The pool's parent handles Ctrl-C and stops workers with SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    worker = TokenizerWorker(config, index)
    log.info(
        "tokenizer worker %d ready on %s (max_model_len %d)",
        index,
        config.serve.tokenizer_addrs[index],
        worker.tokenizer.max_model_len,
    )
    worker.run()
