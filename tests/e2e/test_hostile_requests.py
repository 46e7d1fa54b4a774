"""Hostile requests against the real processes: each is a 4xx in OpenAI's shape, and none of
them fails another user's request running next to it."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"

HOSTILE: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 5, "stop_token_ids": [1000000000], "min_tokens": 2}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 5, "stop_token_ids": [49152], "min_tokens": 2}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 5, "stop_token_ids": [2**63 - 1], "min_tokens": 2}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2**64}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 10**30}),
    ("/v1/completions", {"prompt": "Hi", "seed": 2**64}),
    ("/v1/completions", {"prompt": [2**64]}),
    ("/v1/completions", {"prompt": [10**9]}),
    ("/v1/completions", {"prompt": "Hi", "stop_token_ids": [2**64]}),
    ("/detokenize", {"tokens": [2**64]}),
    ("/detokenize", {"tokens": [10**9]}),
]


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(url, json=body) as r:
        return r.status, await r.json(content_type=None)


async def test_hostile_requests_fail_alone(server: Server) -> None:
    client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    normal = [
        asyncio.create_task(
            client.completions.create(
                model=MODEL, prompt=f"Count to {i}:", max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
            )
        )
        for i in range(8)
    ]
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(post(session, server.base_url + path, body) for path, body in HOSTILE))
        seeded = await post(
            session, server.base_url + "/v1/completions", {"prompt": "Hi", "seed": 2**63 - 1, "n": 2, "max_tokens": 2}
        )
    for (path, body), (status, resp) in zip(HOSTILE, results, strict=True):
        assert 400 <= status < 500, (path, body, resp)
        assert set(resp["error"]) == {"message", "type", "param", "code"}, resp
    assert seeded[0] == 200 and len(seeded[1]["choices"]) == 2
    for resp in await asyncio.gather(*normal):
        assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 24


def test_logprobs_stop_at_the_text(server: Server) -> None:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say OK."}], max_tokens=64, temperature=0, logprobs=True
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"  # ended by EOS, whose text is not shown
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
