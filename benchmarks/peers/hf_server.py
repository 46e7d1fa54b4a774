"""A minimal OpenAI-compatible server around transformers' `generate`, as a benchmark peer.

Static batching, deliberately simple: one background thread takes every request queued
at that moment (up to --max-batch), left-pads them into one batch and runs one
`model.generate` call until every row is done; requests arriving meanwhile wait for the
next batch. Tokens are streamed per decode step through a streamer. This is what a
plain "transformers behind an HTTP server" deployment does; it is not continuous
batching.

Why not `transformers serve --continuous-batching` (transformers 5.24): it does not load
a local GGUF (its loader reads `config.architectures`, which a GGUF config lacks), and
its continuous-batching manager, driven directly on this CPU with the GGUF-loaded
model, had not produced 4 x 16 tokens after minutes (see docs/benchmarks_serving.md).

Endpoints: /health, /v1/models, /v1/completions and /v1/chat/completions (stream or
not; `ignore_eos`, `max_tokens`, `temperature`, `stream_options.include_usage`).

    .venv/bin/python benchmarks/peers/hf_server.py --port 8001 [--threads 2] [--max-batch 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
from aiohttp import web
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from shared.model_files import bundled_model_path


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    ignore_eos: bool
    temperature: float
    loop: asyncio.AbstractEventLoop
    # Token ids (int), then None at the end; filled from the generation thread.
    out: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)
    generated: int = 0
    done: bool = False
    cancelled: bool = False  # the client went away: stop spending decode steps on it


class BatchState(LogitsProcessor, BaseStreamer):
    """Per-row bookkeeping of one generate call: forbids EOS for ignore_eos rows, and
    delivers each step's tokens to their requests, ending each at its own max_tokens."""

    def __init__(self, jobs: list[Job], eos_ids: set[int]) -> None:
        self.jobs = jobs
        self.eos_ids = sorted(eos_ids)
        self.prompt_seen = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, job in enumerate(self.jobs):
            if job.ignore_eos and self.eos_ids:
                scores[i, self.eos_ids] = -float("inf")
        return scores

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands the streamer the prompt
            self.prompt_seen = True
            return
        for job, tok in zip(self.jobs, value.view(-1).tolist(), strict=False):
            if job.done:
                continue
            if job.cancelled:
                self.finish(job)
                continue
            job.generated += 1
            job.loop.call_soon_threadsafe(job.out.put_nowait, int(tok))
            if job.generated >= job.max_tokens or (not job.ignore_eos and tok in self.eos_ids):
                self.finish(job)

    def finish(self, job: Job) -> None:
        job.done = True
        job.loop.call_soon_threadsafe(job.out.put_nowait, None)

    def end(self) -> None:
        for job in self.jobs:
            if not job.done:
                self.finish(job)


class AllDone(StoppingCriteria):
    """Stops the batch once every request has what it asked for (rows differ in max_tokens)."""

    def __init__(self, state: BatchState) -> None:
        self.state = state

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **_: Any) -> torch.BoolTensor:
        done = all(j.done for j in self.state.jobs)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool)


class Generator:
    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_batch: int, threads: int | None) -> None:
        self.model = model
        self.threads = threads
        self.tok = tokenizer
        self.max_batch = max_batch
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.queue: queue.Queue[Job] = queue.Queue()
        threading.Thread(target=self._loop, daemon=True, name="generate").start()

    def _loop(self) -> None:
        if self.threads:  # OpenMP settings are per thread: set them where generate runs
            torch.set_num_threads(self.threads)
        while True:
            jobs = [self.queue.get()]
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            state = BatchState(jobs, self.eos_ids)
            try:
                self._generate(jobs, state)
            except Exception as e:  # a failed batch fails its requests, not the server
                print(f"generate failed: {e!r}", file=sys.stderr, flush=True)
            state.end()

    @torch.inference_mode()
    def _generate(self, jobs: list[Job], state: BatchState) -> None:
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, j in enumerate(jobs):
            ids[i, width - len(j.prompt_ids) :] = torch.tensor(j.prompt_ids)
            mask[i, width - len(j.prompt_ids) :] = 1
        # One batch has one sampling mode: greedy unless every request asked to sample.
        sample = all(j.temperature > 0 for j in jobs)
        kwargs: dict[str, Any] = {"do_sample": sample}
        if sample:
            kwargs.update(temperature=jobs[0].temperature, top_p=1.0, top_k=0)
        self.model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max(j.max_tokens for j in jobs),
            pad_token_id=self.pad_id,
            logits_processor=LogitsProcessorList([state]),
            streamer=state,
            stopping_criteria=StoppingCriteriaList([AllDone(state)]),
            **kwargs,
        )


def sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


class Server:
    def __init__(self, gen: Generator, model_name: str) -> None:
        self.gen = gen
        self.model_name = model_name

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model_name, "object": "model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await request.json()
        tok = self.gen.tok
        if chat:
            ids = tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True)
            if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
        else:
            prompt = body.get("prompt", "")
            ids = tok(prompt if isinstance(prompt, str) else prompt[0])["input_ids"]
        job = Job(
            list(ids),
            int(body.get("max_tokens") or 16),
            bool(body.get("ignore_eos", False)),
            float(body.get("temperature", 1.0)),
            asyncio.get_running_loop(),
        )
        self.gen.queue.put(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def usage(n: int) -> dict[str, int]:
            return {
                "prompt_tokens": len(job.prompt_ids),
                "completion_tokens": n,
                "total_tokens": len(job.prompt_ids) + n,
            }

        def choice(text: str, finish: str | None, delta: bool) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text, "finish_reason": finish}
            key = "delta" if delta else "message"
            return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}

        out_ids: list[int] = []
        finish = "length"
        if not body.get("stream"):
            while (t := await job.out.get()) is not None:
                out_ids.append(t)
            if len(out_ids) < job.max_tokens:
                finish = "stop"
            text = tok.decode(out_ids, skip_special_tokens=True)
            return web.json_response(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": self.model_name,
                    "choices": [choice(text, finish, False)],
                    "usage": usage(len(out_ids)),
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        chunk_obj = obj + ".chunk" if chat else obj
        try:
            await self._stream(
                resp,
                job,
                out_ids,
                lambda d: {
                    "id": rid,
                    "object": chunk_obj,
                    "created": created,
                    "model": self.model_name,
                    "choices": [choice(d, None, True)],
                },
            )
        except (ConnectionError, asyncio.CancelledError):
            job.cancelled = True
            raise
        if len(out_ids) < job.max_tokens:
            finish = "stop"
        await resp.write(
            sse(
                {
                    "id": rid,
                    "object": chunk_obj,
                    "created": created,
                    "model": self.model_name,
                    "choices": [choice("", finish, True)],
                }
            )
        )
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(
                sse(
                    {
                        "id": rid,
                        "object": chunk_obj,
                        "created": created,
                        "model": self.model_name,
                        "choices": [],
                        "usage": usage(len(out_ids)),
                    }
                )
            )
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _stream(self, resp: web.StreamResponse, job: Job, out_ids: list[int], chunk: Any) -> None:
        sent = ""
        while (t := await job.out.get()) is not None:
            out_ids.append(t)
            # Re-decoding the whole output keeps multi-byte characters whole; outputs are short.
            text = self.gen.tok.decode(out_ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue
            delta, sent = text[len(sent) :], text
            await resp.write(sse(chunk(delta)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2)")
    p.add_argument("--served-model-name", default="SmolLM2-135M-Instruct")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or bundled_model_path()
    d, f = os.path.dirname(path), os.path.basename(path)
    # fp32 by default, as NovaInfer runs on CPU: the GGUF's Q4_1 weights are dequantized on load.
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=getattr(torch, args.dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=f)
    server = Server(Generator(model, tokenizer, args.max_batch, args.threads), args.served_model_name)
    app = web.Application(client_max_size=16 << 20)
    app.add_routes(
        [
            web.get("/health", server.health),
            web.get("/v1/models", server.models),
            web.post("/v1/completions", server.completions),
            web.post("/v1/chat/completions", server.chat),
        ]
    )
    print(f"hf_server: serving {args.served_model_name} at http://{args.host}:{args.port}/v1", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
