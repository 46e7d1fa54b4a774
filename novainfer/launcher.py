"""`novainfer serve`: start engine core(s), tokenizer pool and gateway, supervise them.

Each service is its own OS process (`python -m services.X`), given the same config
as CLI flags, so what runs here is exactly what the compose services run; each tokenizer
worker is its own child (a one-worker pool), so that one can be restarted alone. The
children live in their own sessions so that Ctrl-C reaches only the launcher, which
then stops them in order: the gateway first (it drains in-flight requests), then the
tokenizer workers and the engines.

A child that dies is seen at once (its exit, polled every 50 ms) and restarted; for an
engine core or a tokenizer worker the launcher first tells the gateway (ComponentDown),
which fails the requests the child had started, parks those it had not for the restarted
one, and holds new requests that need it until it is back (up to --restart-wait-s). More than
--max-restarts crashes within --restart-window-s and the whole service stops loudly
(exit 1): a crash loop is worse than no service.
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
from collections import deque
from dataclasses import dataclass, field

import msgspec
import zmq

from shared.config import Config, config_to_args
from shared.protocol import ComponentDown, encode
from shared.zmq_utils import new_context, push_socket

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.05


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
    module: str
    extra: list[str]
    component: str | None
    """As the gateway names it (engine, tokenizer_worker); None for the gateway itself."""
    index: int
    proc: subprocess.Popen = field(repr=False)


class Launcher:
    def __init__(self, config: Config) -> None:
        self.config = config.with_default_addresses()
        self.children: list[Child] = []
        self._stopping = False
        self._crashes: deque[float] = deque()
        self._ctx: zmq.Context | None = None
        self._gateway: zmq.Socket | None = None

    @property
    def url(self) -> str:
        host = self.config.serve.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        return f"http://{shown}:{self.config.serve.port}"

    def _spawn(self, name: str, module: str, extra: list[str], component: str | None, index: int = 0) -> None:
        proc = self._popen(module, extra)
        self.children.append(Child(name, module, extra, component, index, proc))
        log.info("started %s (pid %d)", name, proc.pid)

    def _popen(self, module: str, extra: list[str]) -> subprocess.Popen:
        serve = self.config.serve
        # The API key travels by environment, not argv, so `ps` does not show it.
        args_config = msgspec.structs.replace(self.config, serve=msgspec.structs.replace(serve, api_key=None))
        env = dict(os.environ)
        if serve.api_key:
            env["NOVAINFER_API_KEY"] = serve.api_key
        cmd = [sys.executable, "-m", module, *config_to_args(args_config), *extra]
        return subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)

    def start(self) -> None:
        serve = self.config.serve
        for i in range(len(serve.engine_addrs)):
            self._spawn(f"engine-core-{i}", "services.engine_core", ["--engine-index", str(i)], "engine", i)
        for i in range(len(serve.tokenizer_addrs)):
            self._spawn(f"tokenizer-{i}", "services.tokenizer_pool", ["--worker-index", str(i)], "tokenizer_worker", i)
        self._spawn("gateway", "services.gateway", [], None)

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
        # The gateway drains for drain_timeout_s, then fails what is left and exits.
        drain = self.config.serve.drain_timeout_s + STOP_TIMEOUT_S
        for group, timeout in ((gateways, drain), (others, STOP_TIMEOUT_S)):
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
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    def _restart(self, child: Child) -> bool:
        """Restart a dead child; False when it crashed too often (the service must stop)."""
        serve = self.config.serve
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > serve.restart_window_s:
            self._crashes.popleft()
        reason = _exit_reason(child.proc.returncode)
        if child.component is not None:
            # First, even when giving up: the gateway fails what the child had started at once.
            self._tell_gateway(
                ComponentDown(component=child.component, index=child.index, reason=reason, timestamp=time.time())
            )
        if len(self._crashes) > serve.max_restarts:
            log.error(
                "%s %s: %d crashes within %.0fs (--max-restarts %d): stopping the service",
                child.name,
                reason,
                len(self._crashes),
                serve.restart_window_s,
                serve.max_restarts,
            )
            return False
        log.error("%s (pid %d) %s: restarting it", child.name, child.proc.pid, reason)
        child.proc = self._popen(child.module, child.extra)
        log.info("restarted %s (pid %d)", child.name, child.proc.pid)
        return True

    def _tell_gateway(self, msg: ComponentDown) -> None:
        if self._gateway is None:
            self._ctx = new_context()
            self._gateway = push_socket(self._ctx, self.config.serve.gateway_addr)  # type: ignore[arg-type]
        self._gateway.send(encode(msg))

    def supervise(self) -> int:
        """Block until a signal or a child's death; return the exit code."""
        stop_signal: list[int] = []

        def on_signal(signum: int, _frame: object) -> None:
            stop_signal.append(signum)

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop_signal:
            dead = self._dead_child()
            if dead is not None and not self._restart(dead):
                self.stop()
                return 1
            time.sleep(POLL_S)
        log.info("stopping (signal %d): draining requests", stop_signal[0])
        self.stop()
        return 0


def _exit_reason(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


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
