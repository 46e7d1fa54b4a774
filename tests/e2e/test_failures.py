"""Fault injection on the real processes: kill -9 an engine core or a tokenizer worker under
load. Every request it had started ends with an error within 1 s, the queued ones complete
after the restart, the gateway stays up (/health 503 meanwhile, new requests wait for the
restart), the service answers again, and nothing is left behind. A crash loop stops the service loudly."""

from __future__ import annotations

import asyncio
import os
import re
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
ALIVE_AFTER_S = 2.0
"""A stream still yielding this long after its engine was killed is on the other engine."""


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
    assert status == 503  # the restart takes seconds: it is still under way (load balancers route away)
    # A request that arrives meanwhile waits for the restart (--restart-wait-s) rather than failing.
    arrived = asyncio.create_task(
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, extra_body={"ignore_eos": True})
    )

    done = await asyncio.wait_for(asyncio.gather(*queued), RESTART_TIMEOUT_S)
    assert all(r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8 for r in done), [
        (r.choices[0], r.usage) for r in done
    ]
    assert (await asyncio.wait_for(arrived, RESTART_TIMEOUT_S)).usage.completion_tokens == 3
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
            while 0 not in engine_pids(server) and server.proc.poll() is None:
                assert time.monotonic() < deadline, "the engine was not restarted"
                time.sleep(0.2)
            if server.proc.poll() is not None:
                break  # a restarted engine that died on its own is a crash too
            os.kill(engine_pids(server)[0], signal.SIGKILL)
            time.sleep(1)
        server.proc.wait(60)
        assert server.proc.returncode == 1, "the launcher must stop loudly after too many crashes"
        time.sleep(0.5)
        assert processes_with(server.run_dir) == [], "orphan processes left"
    finally:
        server.stop()


def engine_index(pid: int) -> int | None:
    """The --engine-index of an engine-core process; None for another (or gone) process."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return int(args[args.index(b"--engine-index") + 1])
    except (OSError, ValueError):
        return None


def engine_pids(server: Server) -> dict[int, int]:
    """engine index -> pid of the engine-core processes."""
    out = {}
    for pid in server.pids("services.engine_core"):
        index = engine_index(pid)
        if index is not None:
            out[index] = pid
    return out


async def kill_one_of_two_engines(server: Server, victim: int) -> None:
    client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
    # Distinct prompts and equal load: the router spreads them over both engines.
    streams = [
        await client.completions.create(
            model=MODEL, prompt=f"Story {i}:", max_tokens=4000, stream=True, extra_body={"ignore_eos": True}
        )
        for i in range(4)
    ]
    for s in streams:
        await s.__anext__()

    async def follow(stream: openai.AsyncStream) -> tuple[str, float]:
        """'failed' (with the time) for a stream of the killed engine, 'alive' for one that keeps going.

        Alive means a chunk arrived well after the kill: chunks produced before it may sit in
        the gateway's and the client's buffers, so a count of chunks says nothing (a fast
        engine streams dozens of tokens while the four requests are being opened)."""
        try:
            async for _ in stream:
                if time.monotonic() - t0 > ALIVE_AFTER_S:
                    await stream.close()
                    return "alive", time.monotonic()
        except openai.APIError as e:
            assert "crashed" in str(e), e
            return "failed", time.monotonic()
        raise AssertionError("a stream ended without an error or [DONE]")

    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    ends = await asyncio.gather(*(follow(s) for s in streams))
    failed = [t for kind, t in ends if kind == "failed"]
    assert failed and len(failed) < len(ends), ends  # both engines had streams
    assert max(failed) - t0 < 1.0, f"in-flight requests took {max(failed) - t0:.2f}s to fail"

    status, _ = await asyncio.to_thread(get, server.base_url + "/health")
    assert status == 503  # engine 0 is restarting
    # The other engine takes every new request: no 503 (max_retries=0 would raise it).
    served = await asyncio.gather(
        *(
            client.completions.create(model=MODEL, prompt=f"New {i}", max_tokens=4, extra_body={"ignore_eos": True})
            for i in range(4)
        )
    )
    assert all(r.usage.completion_tokens == 4 for r in served)

    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while (await asyncio.to_thread(get, server.base_url + "/health"))[0] != 200:
        assert time.monotonic() < deadline, "the killed engine did not rejoin"
        await asyncio.sleep(0.5)
    # It rejoined: the least busy engine gets new conversations, so both serve again.
    again = await asyncio.gather(
        *(
            client.completions.create(model=MODEL, prompt=f"Again {i}", max_tokens=8, extra_body={"ignore_eos": True})
            for i in range(4)
        )
    )
    assert all(r.usage.completion_tokens == 8 for r in again)
    with urllib.request.urlopen(server.base_url + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    restarted = re.search(
        r'^novainfer_prefix_cache_queries_total\{engine="0"[^}]*\} (\S+)$',
        metrics,
        re.MULTILINE,
    )
    assert restarted and float(restarted[1]) > 0, "the restarted engine served nothing"


def test_one_of_two_engines_killed_under_load(tmp_path) -> None:
    server = start_server(str(tmp_path), "--num-engines", "2", "--num-threads", "1", "--max-num-seqs", "4")
    try:
        engines = engine_pids(server)
        assert sorted(engines) == [0, 1]
        asyncio.run(kill_one_of_two_engines(server, engines[0]))
        after = engine_pids(server)
        assert after[1] == engines[1] and after[0] != engines[0]
    finally:
        stop_and_check(server)
