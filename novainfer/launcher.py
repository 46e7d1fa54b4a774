"""`novainfer serve`: start engine core(s), tokenizer pool and gateway, supervise them.

Each service is its own OS process (`python -m services.X`), given the same config
as CLI flags, so what runs here is exactly what the compose services run. The
children live in their own sessions so that Ctrl-C reaches only the launcher, which
then stops them in order: the gateway first (it drains in-flight requests), then the
tokenizer pool and the engines. If any child dies, the whole service stops loudly:
a half-alive service is worse than none.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import msgspec

from shared.config import Config, config_to_args

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0
DRAIN_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def _die_with_parent() -> None:
    # If the launcher is killed outright, the kernel still stops the children: no orphans.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Child:
    name: str
    proc: subprocess.Popen


class Launcher:
    def __init__(self, config: Config) -> None:
        self.config = config.with_default_addresses()
        self.children: list[Child] = []
        self._stopping = False

    @property
    def url(self) -> str:
        host = self.config.serve.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        return f"http://{shown}:{self.config.serve.port}"

    def _spawn(self, name: str, module: str, extra: list[str]) -> None:
        serve = self.config.serve
        # The API key travels by environment, not argv, so `ps` does not show it.
        args_config = msgspec.structs.replace(self.config, serve=msgspec.structs.replace(serve, api_key=None))
        env = dict(os.environ)
        if serve.api_key:
            env["NOVAINFER_API_KEY"] = serve.api_key
        cmd = [sys.executable, "-m", module, *config_to_args(args_config), *extra]
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        self.children.append(Child(name, proc))
        log.info("started %s (pid %d)", name, proc.pid)

    def start(self) -> None:
        for i in range(len(self.config.serve.engine_addrs)):
            self._spawn(f"engine-core-{i}", "services.engine_core", ["--engine-index", str(i)])
        self._spawn("tokenizer-pool", "services.tokenizer_pool", [])
        self._spawn("gateway", "services.gateway", [])

    def _dead_child(self) -> Child | None:
        for child in self.children:
            if child.proc.poll() is not None:
                return child
        return None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = self._dead_child()
            if dead is not None:
                raise RuntimeError(f"{dead.name} exited with code {dead.proc.returncode} during start-up")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the service was not ready within {timeout:.0f}s")

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        gateways = [c for c in self.children if c.name == "gateway"]
        others = [c for c in self.children if c.name != "gateway"]
        for group, timeout in ((gateways, DRAIN_TIMEOUT_S), (others, STOP_TIMEOUT_S)):
            for child in group:
                if child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for child in group:
                try:
                    child.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in %.0fs: killing it", child.name, timeout)
                    child.proc.kill()
                    child.proc.wait()

    def supervise(self) -> int:
        """Block until a signal or a child's death; return the exit code."""
        stop_signal: list[int] = []

        def on_signal(signum: int, _frame: object) -> None:
            stop_signal.append(signum)

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop_signal:
            dead = self._dead_child()
            if dead is not None:
                log.error("%s died with exit code %s: stopping the service", dead.name, dead.proc.returncode)
                self.stop()
                return 1
            time.sleep(0.5)
        log.info("stopping (signal %d): draining requests", stop_signal[0])
        self.stop()
        return 0


def serve(config: Config) -> int:
    launcher = Launcher(config)
    t0 = time.monotonic()
    launcher.start()
    try:
        launcher.wait_ready()
    except (RuntimeError, KeyboardInterrupt) as e:
        log.error("start-up failed: %s", e)
        launcher.stop()
        return 1
    print(
        f"NovaInfer is serving {launcher.config.model_name()} at {launcher.url}/v1 "
        f"(ready in {time.monotonic() - t0:.1f}s; chat UI at {launcher.url}/)",
        flush=True,
    )
    return launcher.supervise()
