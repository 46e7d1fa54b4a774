"""Fault injection on the real processes: kill -9 an engine core or a tokenizer worker under
load. Every request it had started ends with an error within 1 s, the queued ones complete
after the restart, the gateway stays up (503 + Retry-After meanwhile), the service answers
again, and nothing is left behind. A crash loop stops the service loudly."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import Server, processes_with, start_server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
RESTART_TIMEOUT_S = 120


def children_of(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def get(url: str) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)


async def kill_under_load(server: Server, victim: int) -> None:
    client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
    long = {"model": MODEL, "prompt": "Tell me a story.", "max_tokens": 4000, "extra_body": {"ignore_eos": True}}
    streams = [await client.completions.create(stream=True, **long) for _ in range(4)]
    for s in streams:
        await s.__anext__()  # every stream has started
    # --max-num-seqs 4: these wait in the engine's queue, not started.
    queued = [
        asyncio.create_task(client.completions.create(model=MODEL, prompt=f"Count to {i}:", max_tokens=8))
        for i in range(4)
    ]
    await asyncio.sleep(0.5)

    async def drain(stream: openai.AsyncStream) -> float:
        with pytest.raises(openai.APIError, match="crashed"):
            async for _ in stream:
                pass
        return time.monotonic()

    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    ends = await asyncio.gather(*(drain(s) for s in streams))
    assert max(ends) - t0 < 1.0, f"in-flight requests took {max(ends) - t0:.2f}s to fail"

    status, _ = await asyncio.to_thread(get, server.base_url + "/health")
    assert status == 503  # the restart takes seconds: it is still under way
    refused = urllib.request.Request(
        server.base_url + "/v1/completions", data=b'{"prompt": "hi", "max_tokens": 2}', method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as exc:
        await asyncio.to_thread(urllib.request.urlopen, refused, timeout=10)
    assert exc.value.code == 503 and exc.value.headers["Retry-After"]

    done = await asyncio.wait_for(asyncio.gather(*queued), RESTART_TIMEOUT_S)
    assert all(r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8 for r in done), [
        (r.choices[0], r.usage) for r in done
    ]
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while (await asyncio.to_thread(get, server.base_url + "/health"))[0] != 200:
        assert time.monotonic() < deadline, "the service did not come back"
        await asyncio.sleep(0.5)
    again = await client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, extra_body={"ignore_eos": True})
    assert again.usage.completion_tokens == 4


def stop_and_check(server: Server) -> None:
    server.stop()
    assert server.proc.returncode == 0
    time.sleep(0.5)
    assert processes_with(server.run_dir) == [], "orphan processes left"


def test_engine_kill_under_load(tmp_path) -> None:
    server = start_server(str(tmp_path), "--max-num-seqs", "4")
    try:
        (engine,) = server.pids("services.engine_core")
        asyncio.run(kill_under_load(server, engine))
        assert engine not in server.pids("services.engine_core")
    finally:
        stop_and_check(server)


def test_tokenizer_worker_kill_under_load(tmp_path) -> None:
    server = start_server(str(tmp_path), "--max-num-seqs", "4", "--num-tokenizer-workers", "1")
    try:
        (pool,) = server.pids("services.tokenizer_pool")
        # The worker process itself, spawned by its pool (next to multiprocessing's resource tracker).
        (worker,) = [p for p in children_of(pool) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        asyncio.run(kill_under_load(server, worker))
    finally:
        stop_and_check(server)


def test_crash_loop_stops_the_service(tmp_path) -> None:
    server = start_server(str(tmp_path), "--max-restarts", "1", "--restart-window-s", "600")
    try:
        for _ in range(2):
            deadline = time.monotonic() + RESTART_TIMEOUT_S
            while not server.pids("services.engine_core"):
                assert time.monotonic() < deadline
                time.sleep(0.2)
            os.kill(server.pids("services.engine_core")[0], signal.SIGKILL)
            time.sleep(1)
        server.proc.wait(60)
        assert server.proc.returncode == 1, "the launcher must stop loudly after too many crashes"
        time.sleep(0.5)
        assert processes_with(server.run_dir) == [], "orphan processes left"
    finally:
        server.stop()
