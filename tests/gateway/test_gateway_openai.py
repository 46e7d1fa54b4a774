"""Happy paths through the official openai client, sync and async."""

from __future__ import annotations

import asyncio

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.fakes import MODEL, RUN_MODE, TOKENS, Gateway

TEXT = "".join(TOKENS)


def sync_client(gw: Gateway, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=api_key, max_retries=0)


def async_client(gw: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)


async def test_chat_non_streaming_sync_client(gateway: Gateway) -> None:
    client = sync_client(gateway)
    resp = await asyncio.to_thread(
        client.chat.completions.create,
        model=MODEL,
        max_tokens=50,
        temperature=0.3,
        seed=1,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        ],
        extra_body={"top_k": 5},
    )
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == MODEL
    assert resp.created > 0
    choice = resp.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content == TEXT
    assert choice.finish_reason == "stop" and choice.logprobs is None
    assert resp.usage.prompt_tokens == 5 and resp.usage.completion_tokens == 3 and resp.usage.total_tokens == 8
    assert resp.usage.prompt_tokens_details.cached_tokens == 2
    (req,) = gateway.generates
    assert req.request_id == f"{resp.id}-0"
    assert [(m.role, m.content) for m in req.messages] == [("system", "Be brief."), ("user", "Hi there")]
    sp = req.sampling_params
    assert (sp.max_tokens, sp.temperature, sp.seed, sp.top_k, sp.n) == (50, 0.3, 1, 5, 1)


async def test_chat_streaming_async_client(gateway: Gateway) -> None:
    stream = await async_client(gateway).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == TEXT
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].choices[0].delta.content is None
    assert all(c.usage is None for c in chunks)
    assert gateway.generates[0].sampling_params.max_tokens is None  # chat default: up to the context


async def test_chat_max_completion_tokens_length_and_n(gateway: Gateway) -> None:
    resp = await async_client(gateway).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=2, n=3, seed=10
    )
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert all(c.message.content == "Hello," and c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.prompt_tokens == 5 and resp.usage.completion_tokens == 6
    reqs = gateway.generates
    assert [r.request_id for r in reqs] == [f"{resp.id}-{i}" for i in range(3)]
    assert [r.sampling_params.seed for r in reqs] == [10, 11, 12]
    assert all(r.sampling_params.n == 1 and r.sampling_params.max_tokens == 2 for r in reqs)


async def test_completions_prompts_times_n_ordering(gateway: Gateway) -> None:
    client = sync_client(gateway)
    resp = await asyncio.to_thread(client.completions.create, model=MODEL, prompt=["a", "b"], n=2, seed=7)
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion"
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert all(c.text == TEXT for c in resp.choices)
    reqs = gateway.generates
    assert [(r.request_id, r.prompt, r.sampling_params.seed) for r in reqs] == [
        (f"{resp.id}-0", "a", 7),
        (f"{resp.id}-1", "a", 8),
        (f"{resp.id}-2", "b", 7),
        (f"{resp.id}-3", "b", 8),
    ]
    # Each prompt is counted once however many choices it has.
    assert resp.usage.prompt_tokens == 10 and resp.usage.completion_tokens == 12
    assert resp.usage.prompt_tokens_details.cached_tokens == 4
    # Both workers got a share, and each child went to the worker its id shards to.
    from shared.protocol import shard

    for w in gateway.workers:
        assert all(shard(r.request_id, 2) == w.index for r in w.generates)


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
async def test_completions_token_prompts(gateway: Gateway, prompt: list, expected: list) -> None:
    resp = await async_client(gateway).completions.create(model=MODEL, prompt=prompt)
    assert len(resp.choices) == len(expected)
    assert [r.prompt_token_ids for r in gateway.generates] == expected
    assert gateway.generates[0].sampling_params.max_tokens == 16  # OpenAI's completions default


async def test_completions_stream_include_usage(gateway: Gateway) -> None:
    stream = await async_client(gateway).completions.create(
        model=MODEL, prompt="Say hi", stream=True, n=2, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 6 and last.usage.prompt_tokens == 5
    assert all(c.usage is None for c in body)
    for i in range(2):
        mine = [c.choices[0] for c in body if c.choices[0].index == i]
        assert "".join(c.text for c in mine) == TEXT
        assert mine[-1].finish_reason == "stop"


async def test_completions_echo_and_logprobs(gateway: Gateway) -> None:
    client = async_client(gateway)
    echoed = (await client.completions.create(model=MODEL, prompt="Say: ", echo=True)).choices[0]
    assert echoed.text == "Say: " + TEXT and echoed.logprobs is None
    resp = await client.completions.create(model=MODEL, prompt="Say: ", logprobs=2)
    lp = resp.choices[0].logprobs
    assert lp.tokens == TOKENS and lp.token_logprobs == [-0.5] * 3
    assert lp.top_logprobs == [{"alt0": -1.0, "alt1": -2.0}] * 3
    assert lp.text_offset == [0, 5, 6]
    (child,) = [g for g in gateway.generates if g.request_id == f"{resp.id}-0"]
    assert child.sampling_params.logprobs == 2 and not child.echo


async def test_completions_stream_echo_and_logprobs(gateway: Gateway) -> None:
    client = async_client(gateway)
    stream = await client.completions.create(model=MODEL, prompt="Say: ", echo=True, stream=True)
    assert [c.choices[0].text async for c in stream][0] == "Say: Hello"  # noqa: RUF015 - drains the stream
    stream = await client.completions.create(model=MODEL, prompt="Say: ", logprobs=1, stream=True)
    chunks = [c.choices[0] async for c in stream]
    assert [c.logprobs.text_offset for c in chunks if c.logprobs] == [[0], [5], [6]]


async def test_chat_logprobs_shape(gateway: Gateway) -> None:
    resp = await async_client(gateway).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], logprobs=True, top_logprobs=2
    )
    content = resp.choices[0].logprobs.content
    assert [c.token for c in content] == TOKENS
    assert content[0].logprob == -0.5 and content[0].bytes == list(b"Hello")
    assert [(t.token, t.logprob, t.bytes) for t in content[0].top_logprobs] == [
        ("alt0", -1.0, list(b"alt0")),
        ("alt1", -2.0, list(b"alt1")),
    ]
    assert gateway.generates[0].sampling_params.logprobs == 2


async def test_chat_stream_logprobs(gateway: Gateway) -> None:
    stream = await async_client(gateway).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], logprobs=True, stream=True
    )
    tokens = [c.choices[0].logprobs.content[0].token async for c in stream if c.choices[0].logprobs]
    assert tokens == TOKENS


async def test_models_version_tokenize_ui(gateway: Gateway) -> None:
    models = await async_client(gateway).models.list()
    assert [m.id for m in models.data] == [MODEL]
    status, body = await gateway.get(f"/v1/models/{MODEL}")
    assert status == 200 and b'"max_model_len":2048' in body
    assert f'"run_mode":"{RUN_MODE}"'.encode() in body  # the engine's resolved mode, as it reported it
    status, body = await gateway.get("/version")
    assert status == 200 and b"version" in body
    status, tok, _ = await gateway.post("/tokenize", {"prompt": "one three"})
    assert status == 200 and tok == {"count": 2, "max_model_len": 2048, "tokens": [3, 5]}
    status, detok, _ = await gateway.post("/detokenize", {"tokens": [3, 5]})
    assert status == 200 and detok == {"prompt": "3 5"}
    status, page = await gateway.get("/")
    assert status == 200 and b"/static/js/app.js" in page
    status, body = await gateway.get("/health")
    assert status == 200


async def test_metrics_parse_and_move(gateway: Gateway) -> None:
    def scrape(text: bytes) -> dict[tuple[str, tuple], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text.decode())
            for s in fam.samples
        }

    await async_client(gateway).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    await gateway.post("/v1/chat/completions", {"messages": []})
    status, text = await gateway.get("/metrics")
    assert status == 200
    m = scrape(text)
    model = ("model_name", MODEL)
    endpoint = ("endpoint", "/v1/chat/completions")
    assert m[("novainfer_http_requests_total", (endpoint, model, ("status", "200")))] == 1
    assert m[("novainfer_http_requests_total", (endpoint, model, ("status", "400")))] == 1
    assert m[("novainfer_generation_tokens_total", (model,))] == 3
    assert m[("novainfer_prompt_tokens_total", (model,))] == 5
    assert m[("novainfer_prompt_cached_tokens_total", (model,))] == 2
    assert m[("novainfer_time_to_first_token_seconds_count", (model,))] == 1
    assert m[("novainfer_inter_token_latency_seconds_count", (model,))] == 2
    assert m[("novainfer_e2e_request_latency_seconds_count", (model,))] == 1
    assert m[("novainfer_request_queue_time_seconds_count", (model,))] == 1
    assert m[("novainfer_requests_finished_total", (("finish_reason", "stop"), model))] == 1
    engine = (("engine", "0"), model)
    assert m[("novainfer_num_requests_waiting", engine)] == 2
    assert m[("novainfer_kv_cache_usage_ratio", engine)] == 0.25
    assert m[("novainfer_prefix_cache_hits_total", engine)] == 40
    assert m[("novainfer_num_preemptions_total", engine)] == 3
    assert m[("novainfer_component_up", (("component", "tokenizer_worker"), ("index", "1"), model))] == 1
    assert m[("novainfer_component_up", (("component", "engine"), ("index", "0"), model))] == 1

    await async_client(gateway).completions.create(model=MODEL, prompt="x")
    m2 = scrape((await gateway.get("/metrics"))[1])
    assert m2[("novainfer_generation_tokens_total", (model,))] == 6
    assert m2[("novainfer_http_requests_total", (("endpoint", "/v1/completions"), model, ("status", "200")))] == 1
