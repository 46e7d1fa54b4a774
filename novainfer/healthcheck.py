"""`python -m novainfer.healthcheck`: the container image's HEALTHCHECK.

A NovaInfer container runs one of: the all-in-one `novainfer serve` (the image's CMD), the
gateway, a tokenizer pool or an engine core (deploy/docker-compose.yml). The first two serve
HTTP, and healthy is a 200 from their /health, which the gateway gives only while every
tokenizer worker and engine core has reported recently. The other two serve no HTTP: the
gateway's /health already covers them, and their own liveness is their process running,
which the container runtime watches; for them this exits 0.

Which service runs, and on which port, is read from the command line of the container's main
process (PID 1; `--pid` names another), also past an init such as `docker run --init`'s,
through the parser that process used, so its `--port` flag or NOVAINFER_PORT is followed.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from shared.config import Config, config_from_args, parse_config

_TIMEOUT_S = 4.0
_HTTP_SERVICE = "services.gateway"
_SHELLS = {"sh", "bash", "dash"}


def _service_config(cmdline: Sequence[str]) -> Config | None:
    """The config of the HTTP-serving command in cmdline, or None when it serves no HTTP."""
    cmdline = list(cmdline)
    if cmdline and Path(cmdline[0]).name in _SHELLS and cmdline[1:2] == ["-c"] and len(cmdline) > 2:  # sh -c "..."
        cmdline = shlex.split(cmdline[2])
    for i, word in enumerate(cmdline):
        if Path(word).name == "novainfer" and cmdline[i + 1 : i + 2] == ["serve"]:
            from novainfer.cli import build_parser

            return config_from_args(build_parser().parse_args(cmdline[i + 1 :]))
        if word == "-m" and cmdline[i + 1 : i + 2] == [_HTTP_SERVICE]:
            return parse_config(cmdline[i + 2 :])
    return None


def health_url(cmdline: Sequence[str]) -> str | None:
    config = _service_config(cmdline)
    if config is None:
        return None
    host = config.serve.host
    if host in ("", "0.0.0.0", "::"):  # listening everywhere: loopback reaches it
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.serve.port}/health"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m novainfer.healthcheck", description="Exit 0 when this container's service is healthy."
    )
    parser.add_argument("--pid", type=int, default=1, help="the service's process (default: 1, a container's main one)")
    args = parser.parse_args(argv)
    cmdline = Path(f"/proc/{args.pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    url = health_url(cmdline)
    if url is None:
        return 0
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError as e:
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
