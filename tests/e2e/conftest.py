"""Start the real service (`novainfer serve`: launcher, engine core, tokenizer pool,
gateway as separate processes) on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_with(marker: str) -> list[int]:
    """pids whose command line contains marker (our children carry the run dir)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            pids.append(int(pid))
    return pids


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    run_dir: str
    api_key: str | None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self, module: str) -> list[int]:
        return [
            p for p in processes_with(self.run_dir) if module in open(f"/proc/{p}/cmdline").read().replace("\0", " ")
        ]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(tmp_dir: str, *extra: str, api_key: str | None = None) -> Server:
    port = free_port()
    run_dir = os.path.join(tmp_dir, f"run-{port}")
    cmd = [
        sys.executable,
        "-m",
        "novainfer.cli",
        "serve",
        "--port",
        str(port),
        "--run-dir",
        run_dir,
        "--kv-cache-bytes",
        str(256 << 20),
        "--num-tokenizer-workers",
        "2",
        "--heartbeat-s",
        "0.5",
        *extra,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if api_key:
        env["NOVAINFER_API_KEY"] = api_key
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    server = Server(proc, port, run_dir, api_key)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"novainfer serve exited with {proc.returncode} during start-up")
        try:
            with urllib.request.urlopen(server.base_url + "/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError("novainfer serve was not ready in time")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # The exact mode: its greedy output is compared token for token with transformers and the
    # offline engine (test_openai_client.py); the default mode is served by test_run_mode.py.
    s = start_server(str(tmp_path_factory.mktemp("serve")), "--max-queued-requests", "256", "--exact")
    yield s
    s.stop()
    assert s.proc.returncode == 0
    time.sleep(0.5)
    assert processes_with(s.run_dir) == [], "orphan processes left after shutdown"
