"""When the engine core dies, nothing hangs: in-flight requests get an error at once
and the launcher stops the whole service loudly, leaving no orphan processes."""

from __future__ import annotations

import os
import signal
import time

import openai
import pytest

from tests.e2e.conftest import processes_with, start_server

pytestmark = pytest.mark.slow


def test_engine_death_fails_requests_and_stops_service(tmp_path) -> None:
    server = start_server(str(tmp_path), "--engine-timeout-s", "3")
    try:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
        stream = client.completions.create(
            model="SmolLM2-135M-Instruct",
            prompt="Tell me a story.",
            max_tokens=4000,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        it = iter(stream)
        next(it)
        (engine_pid,) = server.pids("services.engine_core")
        os.kill(engine_pid, signal.SIGKILL)
        t0 = time.monotonic()
        # An SSE error event (openai.APIError) or a dropped connection (an httpx error): either ends the stream.
        with pytest.raises(Exception):  # noqa: B017
            for _ in it:
                pass
        assert time.monotonic() - t0 < 20, "the in-flight request hung after the engine died"
        server.proc.wait(60)
        assert server.proc.returncode == 1, "the launcher must stop loudly when a child dies"
        time.sleep(0.5)
        assert processes_with(server.run_dir) == [], "orphan processes left"
    finally:
        server.stop()
