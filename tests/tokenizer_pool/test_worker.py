"""The tokenizer pool as a real process, with this test playing gateway and engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq

from services.tokenizer_pool.tokenizer import Tokenizer
from services.tokenizer_pool.worker import TokenizerWorker
from shared import zmq_utils
from shared.config import Config, ServeConfig
from shared.protocol import (
    AbortRequest,
    ChatMessage,
    DetokenizeRequest,
    DetokenizeResult,
    EngineInput,
    EngineOutput,
    EngineOutputs,
    EngineRequest,
    EngineStats,
    GatewayInput,
    GatewayOutputs,
    GenerateRequest,
    SamplingParams,
    TokenizeRequest,
    TokenizeResult,
    TokenizerVocab,
    WorkerHeartbeat,
    decoder,
    encode,
)

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 60.0  # generous: the machine is shared


class Harness:
    def __init__(self, run_dir: Path, cache_dir: str) -> None:
        self.ctx = zmq_utils.new_context()
        gateway, tokenizer, engine = (f"ipc://{run_dir}/{n}" for n in ("gateway", "tokenizer-0", "engine-0"))
        self.gateway_in = zmq_utils.pull_socket(self.ctx, gateway)
        self.engine_in = zmq_utils.pull_socket(self.ctx, engine)
        self.to_worker = zmq_utils.push_socket(self.ctx, tokenizer)
        self.gateway_decoder = decoder(GatewayInput)
        self.engine_decoder = decoder(EngineInput)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.tokenizer_pool",
                "--gateway-addr",
                gateway,
                "--tokenizer-addrs",
                tokenizer,
                "--engine-addrs",
                engine,
                "--cache-dir",
                cache_dir,
                "--heartbeat-s",
                "0.2",
                "--log-level",
                "WARNING",
            ],
            cwd=ROOT,
            env=env,
        )

    vocab: TokenizerVocab | None = None

    def send(self, msg: msgspec.Struct | bytes) -> None:
        self.to_worker.send(msg if isinstance(msg, bytes) else encode(msg))

    def _recv(self, sock: zmq.Socket, dec: msgspec.msgpack.Decoder) -> msgspec.Struct:
        if not sock.poll(TIMEOUT_S * 1000):
            raise TimeoutError("no message from the tokenizer worker")
        return dec.decode(sock.recv())

    def from_gateway_side(self, heartbeats: bool = False) -> msgspec.Struct:
        while True:
            msg = self._recv(self.gateway_in, self.gateway_decoder)
            if heartbeats or not isinstance(msg, WorkerHeartbeat):
                return msg

    def from_engine_side(self) -> msgspec.Struct:
        while True:
            msg = self._recv(self.engine_in, self.engine_decoder)
            if isinstance(msg, TokenizerVocab):  # sent once at start-up, before any request
                self.vocab = msg
                continue
            return msg

    def outputs(self, request_id: str, ids: list[int], **fields: object) -> None:
        self.send(
            EngineOutputs(engine_index=0, outputs=[EngineOutput(request_id=request_id, new_token_ids=ids, **fields)])
        )

    def children(self, workers_only: bool = False) -> list[int]:
        """Child pids of the pool process (workers: the spawned ones, not the resource tracker)."""
        kids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) != self.proc.pid:
                    continue
                if not workers_only or b"spawn_main" in cmdline:
                    kids.append(int(entry))
        return kids

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.ctx.destroy(linger=0)


@pytest.fixture(scope="module")
def pool(
    tmp_path_factory: pytest.TempPathFactory, smol_tokenizer: Tokenizer, tokenizer_cache_dir: str
) -> Iterator[Harness]:
    # smol_tokenizer has filled the cache, so the worker starts in well under a second.
    harness = Harness(tmp_path_factory.mktemp("run"), tokenizer_cache_dir)
    yield harness
    harness.close()


def test_heartbeat(pool: Harness) -> None:
    beat = pool.from_gateway_side(heartbeats=True)
    assert isinstance(beat, WorkerHeartbeat)
    assert beat.worker == 0 and beat.max_model_len == 8192 and beat.timestamp > 0


def test_generate_roundtrip(pool: Harness, smol_tokenizer: Tokenizer) -> None:
    pool.send(
        GenerateRequest(
            request_id="g1",
            prompt="The capital of France is",
            sampling_params=SamplingParams(max_tokens=5),
            echo=True,
            arrival_time=3.0,
        )
    )
    req = pool.from_engine_side()
    assert isinstance(req, EngineRequest)
    # the vocabulary for structured outputs reached the engine before the first request
    assert pool.vocab is not None and pool.vocab.eos_token_ids == [2]
    assert pool.vocab.tokenizer_json == smol_tokenizer.backend.to_str()
    assert req.prompt_token_ids == smol_tokenizer.encode("The capital of France is")
    assert (req.worker, req.eos_token_ids, req.arrival_time) == (0, [2], 3.0)

    paris, dot = smol_tokenizer.encode(" Paris."), smol_tokenizer.encode(" Yes")
    stats = EngineStats(num_running=1)
    pool.outputs("g1", paris, num_prompt_tokens=len(req.prompt_token_ids), first_scheduled_time=4.0)
    first = pool.from_gateway_side()
    assert isinstance(first, GatewayOutputs) and len(first.deltas) == 1
    assert first.deltas[0].text == " Paris." and first.deltas[0].prompt_text == "The capital of France is"
    assert first.deltas[0].first_scheduled_time == 4.0
    pool.send(
        EngineOutputs(
            engine_index=0,
            stats=stats,
            outputs=[EngineOutput(request_id="g1", new_token_ids=[*dot, 2], finish_reason="stop", stop_token_id=2)],
        )
    )
    last = pool.from_gateway_side()
    assert isinstance(last, GatewayOutputs) and last.stats == stats
    delta = last.deltas[0]
    assert (delta.text, delta.finish_reason, delta.prompt_text) == (" Yes", "stop", None)
    assert delta.num_output_tokens == len(paris) + len(dot) + 1
    assert delta.num_prompt_tokens == len(req.prompt_token_ids)


def test_chat_request_uses_template(pool: Harness, smol_tokenizer: Tokenizer) -> None:
    messages = [ChatMessage(role="user", content="Hi!")]
    pool.send(GenerateRequest(request_id="c1", messages=messages, sampling_params=SamplingParams()))
    req = pool.from_engine_side()
    assert isinstance(req, EngineRequest)
    assert req.prompt_token_ids == smol_tokenizer.apply_chat_template(messages)
    pool.send(AbortRequest(request_ids=["c1"]))  # client went away: forwarded to the engine
    assert pool.from_engine_side() == AbortRequest(request_ids=["c1"])


def test_stop_string_aborts_in_engine(pool: Harness, smol_tokenizer: Tokenizer) -> None:
    pool.send(
        GenerateRequest(request_id="s1", prompt="Count:", sampling_params=SamplingParams(stop=["three"], max_tokens=50))
    )
    assert isinstance(pool.from_engine_side(), EngineRequest)
    pool.outputs("s1", smol_tokenizer.encode(" one two three four"))
    delta = pool.from_gateway_side().deltas[0]
    assert (delta.text, delta.finish_reason, delta.stop_reason) == (" one two ", "stop", "three")
    assert pool.from_engine_side() == AbortRequest(request_ids=["s1"])
    # Outputs the engine produced before it heard are dropped: the next message is about s2.
    pool.outputs("s1", smol_tokenizer.encode(" five"))
    pool.send(TokenizeRequest(request_id="s2", prompt="x"))
    assert isinstance(pool.from_gateway_side(), TokenizeResult)


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        (dict(prompt_token_ids=[5] * 8192), "maximum context length is 8192"),
        (
            dict(prompt_token_ids=[5] * 8000, sampling_params=SamplingParams(max_tokens=500)),
            "you requested 8500 tokens (8000 in the prompt, 500 in the completion)",
        ),
        (dict(prompt_token_ids=[1, 49152]), "out of vocabulary"),
        (dict(prompt=""), "empty"),
        (dict(prompt="a", sampling_params=SamplingParams(temperature=-1)), "temperature"),
        (dict(), "exactly one"),
    ],
)
def test_bad_requests_get_400(pool: Harness, request_fields: dict, message: str) -> None:
    pool.send(GenerateRequest(request_id="bad", **{"sampling_params": SamplingParams(), **request_fields}))
    out = pool.from_gateway_side()
    assert isinstance(out, GatewayOutputs)
    delta = out.deltas[0]
    assert delta.request_id == "bad" and delta.error is not None and delta.finish_reason == "abort"
    assert delta.error.status == 400 and message in delta.error.message


def test_tokenize_and_detokenize(pool: Harness, smol_tokenizer: Tokenizer) -> None:
    pool.send(TokenizeRequest(request_id="t1", prompt="Hello world"))
    result = pool.from_gateway_side()
    assert result == TokenizeResult(request_id="t1", token_ids=smol_tokenizer.encode("Hello world"), max_model_len=8192)
    pool.send(DetokenizeRequest(request_id="d1", token_ids=[*result.token_ids, 2]))
    assert pool.from_gateway_side() == DetokenizeResult(request_id="d1", text="Hello world<|im_end|>")


def test_garbage_does_not_kill_worker(pool: Harness) -> None:
    pool.send(b"\x00\xffnot msgpack")
    pool.send(encode(WorkerHeartbeat(worker=9, timestamp=0.0)))  # valid msgpack, wrong message type
    pool.outputs("never-seen", [1, 2, 3])
    pool.send(TokenizeRequest(request_id="alive", prompt="ok"))
    result = pool.from_gateway_side()
    assert isinstance(result, TokenizeResult) and result.request_id == "alive"
    assert pool.proc.poll() is None


def test_sigterm_stops_everything(pool: Harness) -> None:
    assert pool.children(workers_only=True), "the pool runs its worker in a child process"
    children = pool.children()
    pool.proc.send_signal(signal.SIGTERM)
    assert pool.proc.wait(TIMEOUT_S) == 0
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)  # the resource tracker notices its parent is gone on its own
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]


def test_dead_worker_fails_the_pool(tmp_path: Path, smol_tokenizer: Tokenizer, tokenizer_cache_dir: str) -> None:
    harness = Harness(tmp_path, tokenizer_cache_dir)
    try:
        harness.from_gateway_side(heartbeats=True)
        (worker,) = harness.children(workers_only=True)
        os.kill(worker, signal.SIGKILL)
        assert harness.proc.wait(TIMEOUT_S) == 1
    finally:
        harness.close()


def test_a_bug_is_a_logged_500_not_a_400(
    tmp_path: Path, smol_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Only InvalidRequest blames the client: any other exception (here a ValueError from a
    library) answers 500 and is logged with its traceback."""
    addrs = {n: f"ipc://{tmp_path}/{n}" for n in ("gateway", "tokenizer-0", "engine-0")}
    serve = ServeConfig(
        gateway_addr=addrs["gateway"], tokenizer_addrs=[addrs["tokenizer-0"]], engine_addrs=[addrs["engine-0"]]
    )
    ctx = zmq_utils.new_context()
    gateway_in = zmq_utils.pull_socket(ctx, addrs["gateway"])
    worker = TokenizerWorker(Config(serve=serve), 0, tokenizer=smol_tokenizer)
    try:

        def broken(*args: object, **kwargs: object) -> list[int]:
            raise ValueError("a bug deep in a library")

        monkeypatch.setattr(smol_tokenizer, "encode", broken)
        worker.handle(encode(GenerateRequest(request_id="r", prompt="hi", sampling_params=SamplingParams())))
        assert gateway_in.poll(TIMEOUT_S * 1000)
        out = decoder(GatewayInput).decode(gateway_in.recv())
        assert isinstance(out, GatewayOutputs)
        error = out.deltas[0].error
        assert error is not None and error.status == 500 and "a bug deep in a library" in error.message
        assert any(r.exc_info for r in caplog.records)  # logged with its traceback
    finally:
        worker.close()
        ctx.destroy(linger=0)
