"""The image's HEALTHCHECK: which service a container runs, and the answer of its /health."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from novainfer.healthcheck import health_url, main


@pytest.mark.parametrize(
    ("cmdline", "url"),
    [
        (
            [
                "/opt/novainfer/bin/python",
                "/opt/novainfer/bin/novainfer",
                "serve",
                "--host",
                "0.0.0.0",
                "--port",
                "8000",
            ],
            "http://127.0.0.1:8000/health",
        ),
        (
            ["/sbin/docker-init", "--", "novainfer", "serve", "my-model", "--port", "9001"],
            "http://127.0.0.1:9001/health",
        ),
        (["/bin/sh", "-c", "novainfer serve --host 10.0.0.5 --port 9002"], "http://10.0.0.5:9002/health"),
        (["python", "-m", "services.gateway", "--host", "::", "--port", "9003"], "http://127.0.0.1:9003/health"),
        (["python", "-m", "services.tokenizer_pool"], None),
        (["python", "-m", "services.engine_core", "--port", "9004"], None),
        (["novainfer", "generate", "--prompt", "hi"], None),
    ],
)
def test_health_url_follows_the_service_command(cmdline: list[str], url: str | None) -> None:
    assert health_url(cmdline) == url


def test_port_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOVAINFER_PORT", "9100")
    assert health_url(["python", "-m", "services.gateway"]) == "http://127.0.0.1:9100/health"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def gateway_like() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Handler", (_Health,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()


def _service(port: int) -> subprocess.Popen[bytes]:
    """A process whose command line says it is the gateway on port (it only sleeps)."""
    return _started(
        [sys.executable, "-c", "import time; time.sleep(60)", "-m", "services.gateway", "--port", str(port)]
    )


def _started(argv: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv)
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    while cmdline.read_bytes().decode().split("\0")[:-1] != argv:  # until exec has replaced the fork
        time.sleep(0.01)
    return proc


def test_exit_code_follows_health(gateway_like: tuple[int, type[_Health]]) -> None:
    port, handler = gateway_like
    proc = _service(port)
    try:
        assert main(["--pid", str(proc.pid)]) == 0
        handler.status = 503
        assert main(["--pid", str(proc.pid)]) == 1
    finally:
        proc.kill()
        proc.wait()


def test_unreachable_is_unhealthy() -> None:
    with http.server.HTTPServer(("127.0.0.1", 0), _Health) as server:
        port = server.server_address[1]  # bound, then closed: nothing listens there
    proc = _service(port)
    try:
        assert main(["--pid", str(proc.pid)]) == 1
    finally:
        proc.kill()
        proc.wait()


def test_services_without_http_are_healthy_while_up() -> None:
    proc = _started([sys.executable, "-c", "import time; time.sleep(60)", "-m", "services.engine_core"])
    try:
        assert main(["--pid", str(proc.pid)]) == 0
    finally:
        proc.kill()
        proc.wait()
