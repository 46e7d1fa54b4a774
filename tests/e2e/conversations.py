"""Multi-turn conversations over distinct long prefixes, and the prefix-cache counters of
the instances that served them: the workload of the scale-out tests."""

from __future__ import annotations

import random
import re
import urllib.request

import openai

MODEL = "SmolLM2-135M-Instruct"
WORDS = ("river", "stone", "maple", "orbit", "lantern", "copper", "meadow", "violet", "harbor", "signal", "thunder")


def prefix_counters(base_urls: list[str]) -> tuple[float, float]:
    """(hits, queries) of the prefix caches, summed over the instances and their engines."""
    hits = queries = 0.0
    for url in base_urls:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        for kind, value in re.findall(
            r"^novainfer_prefix_cache_(hits|queries)_total\{[^}]*\} (\S+)$", text, re.MULTILINE
        ):
            if kind == "hits":
                hits += float(value)
            else:
                queries += float(value)
    return hits, queries


def run_conversations(base_url: str, num: int, turns: int, seed: int) -> int:
    """num conversations of `turns` turns, one after the other, each with its own ~100-word
    system prompt; every turn resends the whole history. Returns the requests that failed."""
    rng = random.Random(seed)
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    failed = 0
    for _ in range(num):
        system = " ".join(rng.choice(WORDS) for _ in range(100))
        messages = [{"role": "system", "content": system}]
        for t in range(turns):
            messages.append({"role": "user", "content": f"Turn {t}: " + " ".join(rng.choice(WORDS) for _ in range(12))})
            try:
                resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
            except openai.APIError:
                failed += 1
                break
            messages.append({"role": "assistant", "content": resp.choices[0].message.content or ""})
    return failed
