"""The launched service through the official `openai` client, as users drive it."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from novainfer.llm import LLM
from shared.config import EngineConfig
from shared.model_files import bundled_model_path
from shared.protocol import SamplingParams
from tests.e2e.conftest import Server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
async def aclient(server: Server) -> openai.AsyncOpenAI:
    # Per test: pytest-asyncio gives each test its own event loop, and the client's
    # connection pool belongs to one loop.
    async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def metrics(server: Server) -> dict[str, float]:
    with urllib.request.urlopen(server.base_url + "/metrics") as r:
        text = r.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + (
                "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name") + "}"
                if len(s.labels) > 1
                else ""
            )
            values[key] = values.get(key, 0.0) + s.value
    return values


def post(server: Server, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(
        server.base_url + path,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_greedy_chat_equals_offline_engine_and_transformers(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=40, temperature=0)
    text = resp.choices[0].message.content
    assert "Paris" in text

    llm = LLM(config=EngineConfig(kv_cache_bytes=64 << 20, exact=True))  # as the session server
    offline = llm.chat(QUESTION, SamplingParams(max_tokens=40, temperature=0), use_tqdm=False)[0].outputs[0]
    assert text == offline.text
    assert resp.choices[0].finish_reason == offline.finish_reason
    assert resp.usage.completion_tokens == len(offline.token_ids)

    from transformers import AutoModelForCausalLM

    path = bundled_model_path()
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    prompt = llm.tokenizer.apply_chat_template(QUESTION)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    hf_tokens = out[0, len(prompt) :].tolist()
    assert offline.token_ids == hf_tokens[: len(offline.token_ids)]


async def test_stream_equals_non_stream(aclient: openai.AsyncOpenAI) -> None:
    full = await aclient.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    stream = await aclient.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage, roles = [], None, None, []
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == full.choices[0].message.content
    assert roles == ["assistant"]
    assert finish == full.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_prompt_forms(client: openai.OpenAI) -> None:
    resp = client.completions.create(
        model=MODEL, prompt=["The capital of France is", "1, 2, 3,"], max_tokens=8, temperature=0, echo=True
    )
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.choices[0].text.startswith("The capital of France is")
    assert resp.choices[1].text.startswith("1, 2, 3,")
    ids = client.completions.create(model=MODEL, prompt=[504, 3575, 282, 4649, 314], max_tokens=4, temperature=0)
    assert ids.usage.prompt_tokens == 5 and ids.usage.completion_tokens == 4
    assert ids.choices[0].finish_reason == "length"


def test_n_and_seed(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=1.0, n=3, seed=7)
    again = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=1.0, n=3, seed=7)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.message.content for c in resp.choices] == [c.message.content for c in again.choices]


async def test_64_concurrent_streams(aclient: openai.AsyncOpenAI) -> None:
    prompts = [f"Count from {i} to {i + 5}:" for i in range(8)]
    refs = {}
    for p in prompts:
        r = await aclient.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0)
        refs[p] = r.choices[0].text

    async def one(p: str) -> tuple[str, str]:
        stream = await aclient.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0, stream=True)
        return p, "".join([c.choices[0].text async for c in stream if c.choices])

    results = await asyncio.gather(*(one(prompts[i % 8]) for i in range(64)))
    for p, text in results:
        assert text == refs[p]


async def test_disconnect_and_cancel_free_blocks(server: Server, aclient: openai.AsyncOpenAI) -> None:
    long = dict(
        model=MODEL, prompt="Tell me a long story.", max_tokens=2000, temperature=0, extra_body={"ignore_eos": True}
    )
    stream = await aclient.completions.create(stream=True, **long)
    async for chunk in stream:
        request_id = chunk.id
        break
    status, _ = post(server, f"/v1/requests/{request_id}/cancel", b"")
    assert status == 200
    finish = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "abort"

    stream = await aclient.completions.create(stream=True, **long)
    n = 0
    async for _ in stream:
        n += 1
        if n == 3:
            break
    await stream.close()  # the client goes away mid-stream

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = metrics(server)
        running = sum(v for k, v in m.items() if k.startswith("novainfer_num_requests_running"))
        usage = sum(v for k, v in m.items() if k.startswith("novainfer_kv_cache_usage_ratio"))
        if running == 0 and usage == 0:
            break
        await asyncio.sleep(0.5)
    assert running == 0 and usage == 0, (running, usage)


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": MODEL, "messages": QUESTION, "temperature": -1}, 400, "temperature"),
        ({"model": MODEL, "messages": QUESTION, "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": "nope", "messages": QUESTION}, 404, None),
        ({"model": MODEL}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi " * 9000}]}, 400, None),
    ],
)
def test_bad_input_gets_openai_error(server: Server, body: dict, status: int, param: str | None) -> None:
    code, payload = post(server, "/v1/chat/completions", json.dumps(body).encode())
    assert code == status
    err = payload["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param
    with urllib.request.urlopen(server.base_url + "/health") as r:
        assert r.status == 200


def test_too_long_prompt_names_limit(server: Server) -> None:
    code, payload = post(
        server, "/v1/completions", json.dumps({"model": MODEL, "prompt": "hi " * 9000, "max_tokens": 4}).encode()
    )
    assert code == 400 and "8192" in payload["error"]["message"]


def test_malformed_json(server: Server) -> None:
    code, payload = post(server, "/v1/chat/completions", b"{not json")
    assert code == 400 and payload["error"]["type"] == "invalid_request_error"


def test_metrics_move(server: Server, client: openai.OpenAI) -> None:
    before = metrics(server)
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0)
    after = metrics(server)

    def total(m: dict[str, float], prefix: str) -> float:
        return sum(v for k, v in m.items() if k.startswith(prefix))

    assert total(after, "novainfer_generation_tokens_total") >= total(before, "novainfer_generation_tokens_total") + 5
    assert total(after, "novainfer_prompt_tokens_total") > total(before, "novainfer_prompt_tokens_total")
    assert total(after, "novainfer_e2e_request_latency_seconds_count") > total(
        before, "novainfer_e2e_request_latency_seconds_count"
    )
