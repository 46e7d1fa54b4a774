"""`novainfer serve --speculative-method ngram` through the official `openai` client: the
output is the non-speculative engine's, token for token, and the speculation metrics move."""

from __future__ import annotations

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
