"""vllm-router (PyPI: a Rust router with a cache-aware policy) in front of NovaInfer
instances on loopback; used by test_router.py and benchmarks/scale_out.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.e2e.conftest import free_port

# The console script sits next to this interpreter when PATH does not name the venv.
ROUTER = shutil.which("vllm-router") or shutil.which("vllm-router", path=str(Path(sys.executable).parent))


@contextmanager
def run_router(worker_urls: list[str], policy: str, log_dir: Path, health_interval_s: int = 1) -> Iterator[str]:
    """Start vllm-router with `policy` over the workers; yields its base URL."""
    if ROUTER is None:
        raise RuntimeError("vllm-router is not installed (pip install vllm-router)")
    port = free_port()
    log_path = log_dir / f"router-{policy}-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                ROUTER,
                "--host=127.0.0.1",
                f"--port={port}",
                f"--policy={policy}",
                f"--health-check-interval-secs={health_interval_s}",
                "--worker-urls",
                *worker_urls,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError("vllm-router exited: " + log_path.read_text()[-2000:])
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
