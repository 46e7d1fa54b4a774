"""`novainfer serve --speculative-method ngram` through the official `openai` client: the
output is the non-speculative engine's, token for token, and the speculation metrics move,
for plain and for structured-output requests (JSON schema, tool calls)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from novainfer.llm import LLM
from shared.config import EngineConfig
from shared.protocol import SamplingParams
from tests.e2e.conftest import Server, start_server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
CODE = "def area(w, h):\n    return w * h\n\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n"
EDIT = [{"role": "user", "content": f"Rename w to width and h to height in this code:\n\n{CODE}"}]


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        str(tmp_path_factory.mktemp("spec")),
        "--speculative-method",
        "ngram",
        "--num-speculative-tokens",
        "5",
        "--metrics-compat",
        "vllm",
        "--exact",  # greedy output equal to the offline engine's needs batch-invariant kernels
        # Always k drafts: the tests check that drafts are proposed and accepted, which the
        # adaptive length (timing-dependent) may legitimately skip for a request.
        "--no-speculative-adaptive-draft-length",
    )
    yield s
    s.stop()
    assert s.proc.returncode == 0


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM(config=EngineConfig(kv_cache_bytes=64 << 20, exact=True))


def test_ngram_serves_the_non_speculative_output(spec_server: Server, offline: LLM, tmp_path: Path) -> None:
    client = openai.OpenAI(base_url=spec_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    greedy = SamplingParams(max_tokens=60, temperature=0)
    want = offline.chat(EDIT, greedy, use_tqdm=False)[0].outputs[0]
    resp = client.chat.completions.create(model=MODEL, messages=EDIT, max_tokens=60, temperature=0)
    assert resp.choices[0].message.content == want.text
    assert resp.choices[0].finish_reason == want.finish_reason
    assert resp.usage.completion_tokens == len(want.token_ids)

    # Streamed, with a stop string inside what speculation accepts in one step.
    stop = want.text.split("height")[0][-6:] if "height" in want.text else want.text[20:26]
    stopped = offline.chat(EDIT, SamplingParams(max_tokens=60, temperature=0, stop=[stop]), use_tqdm=False)
    chunks = client.chat.completions.create(
        model=MODEL, messages=EDIT, max_tokens=60, temperature=0, stop=[stop], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == stopped[0].outputs[0].text

    # n > 1 with a seed: each sample as without speculation.
    seeded = SamplingParams(max_tokens=30, temperature=0.8, n=2, seed=5)
    want_n = [o.text for o in offline.chat(EDIT, seeded, use_tqdm=False)[0].outputs]
    resp = client.chat.completions.create(model=MODEL, messages=EDIT, max_tokens=30, temperature=0.8, n=2, seed=5)
    assert [c.message.content for c in resp.choices] == want_n

    with urllib.request.urlopen(spec_server.base_url + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    drafts = [line for line in metrics.splitlines() if line.startswith("vllm:spec_decode_num_draft_tokens_total")]
    accepted = [line for line in metrics.splitlines() if line.startswith("novainfer_spec_decode_num_accepted_tokens")]
    assert drafts and float(drafts[0].split()[-1]) > 0
    assert accepted and float(accepted[0].split()[-1]) > 0


def _counter(base_url: str, name: str) -> float:
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(name) and not line.startswith("#"))


PARTS = "\n".join(
    f"| {i} | {item} | {qty} |"
    for i, (item, qty) in enumerate([("bolt", 4), ("nut", 9), ("washer", 2), ("hinge", 7)] * 2)
)
PARTS_SCHEMA = {
    "type": "object",
    "properties": {
        "parts": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "item": {"type": "string"}, "qty": {"type": "integer"}},
                "required": ["id", "item", "qty"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["parts"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}


def test_structured_outputs_speculate_and_match_the_plain_server(spec_server: Server, server: Server) -> None:
    """A JSON-schema response and tool calls (required and named), greedy and seeded: the same
    from the speculating server as from the plain one, and the structured requests' drafts
    are accepted (the table repeats its field names)."""
    clients = [
        openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
        for s in (spec_server, server)
    ]
    table = [{"role": "user", "content": f"Turn this table into JSON.\n\n| id | item | qty |\n{PARTS}"}]
    cities = [{"role": "user", "content": "Get the weather in Paris, Rome, Oslo, Paris, Rome and Oslo."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "parts", "schema": PARTS_SCHEMA}}
    named = {"type": "function", "function": {"name": "get_weather"}}
    requests = [
        {"messages": table, "response_format": fmt, "max_tokens": 64, "temperature": 0},
        {"messages": table, "response_format": fmt, "max_tokens": 40, "temperature": 0.7, "seed": 3},
        {"messages": cities, "tools": [WEATHER_TOOL], "tool_choice": "required", "max_tokens": 64, "temperature": 0},
        {"messages": cities, "tools": [WEATHER_TOOL], "tool_choice": named, "max_tokens": 40, "temperature": 0},
    ]
    accepted = _counter(spec_server.base_url, "novainfer_spec_decode_num_accepted_tokens_total")
    for body in requests:
        got, want = (c.chat.completions.create(model=MODEL, **body) for c in clients)  # type: ignore[call-overload]
        g, w = got.choices[0], want.choices[0]
        assert g.message.content == w.message.content
        assert g.finish_reason == w.finish_reason
        assert got.usage.completion_tokens == want.usage.completion_tokens
        calls = [(t.function.name, t.function.arguments) for t in g.message.tool_calls or []]
        assert calls == [(t.function.name, t.function.arguments) for t in w.message.tool_calls or []]
        if "response_format" in body and g.finish_reason == "stop":
            assert isinstance(json.loads(g.message.content or "")["parts"], list)
        if "tools" in body and g.finish_reason != "length":
            assert calls and all(name == "get_weather" for name, _ in calls)
    assert _counter(spec_server.base_url, "novainfer_spec_decode_num_accepted_tokens_total") > accepted
