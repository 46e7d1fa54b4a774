"""`python -m services.tokenizer_pool [config flags]`: run the tokenizer workers.

One spawned process per tokenizer_addrs entry (or only --worker-index). If any
worker dies the pool stops the rest and exits non-zero, so the launcher / container
runtime notices; SIGTERM or SIGINT stop every worker and exit 0.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import signal
import sys
from collections.abc import Sequence

from services.tokenizer_pool.worker import run_worker
from shared.config import parse_config
from shared.log_setup import setup_logging

log = logging.getLogger("services.tokenizer_pool")  # not __name__: that is "__main__" under -m

_STOP_TIMEOUT_S = 5.0


class _Shutdown(Exception):
    pass


def _raise_shutdown(signum: int, frame: object) -> None:
    raise _Shutdown(signal.Signals(signum).name)


def _stop(processes: Sequence[multiprocessing.process.BaseProcess]) -> None:
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(_STOP_TIMEOUT_S)
        if p.is_alive():
            log.error("%s ignored SIGTERM; killing it", p.name)
            p.kill()
            p.join()


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv, description="NovaInfer tokenizer pool").with_default_addresses()
    serve = config.serve
    setup_logging(config, "tokenizer-pool")
    if serve.worker_index is not None and not 0 <= serve.worker_index < len(serve.tokenizer_addrs):
        raise SystemExit(
            f"--worker-index {serve.worker_index} is outside tokenizer_addrs ({len(serve.tokenizer_addrs)} entries)"
        )
    indices = [serve.worker_index] if serve.worker_index is not None else range(len(serve.tokenizer_addrs))

    # Handlers before the first spawn, so a signal cannot slip between spawn and wait.
    signal.signal(signal.SIGTERM, _raise_shutdown)
    signal.signal(signal.SIGINT, _raise_shutdown)
    ctx = multiprocessing.get_context("spawn")
    processes = []
    try:
        for i in indices:
            p = ctx.Process(target=run_worker, args=(config, i), name=f"tokenizer-{i}", daemon=True)
            p.start()
            processes.append(p)
        log.info("tokenizer pool: %d worker(s) for engines %s", len(processes), serve.engine_addrs)
        ready = multiprocessing.connection.wait([p.sentinel for p in processes])
        dead = [p for p in processes if p.sentinel in ready]
        for p in dead:
            p.join(1.0)  # reap it, so its exit code is known
            log.error(
                "tokenizer pool: %s (pid %s) died with exit code %s; stopping the pool", p.name, p.pid, p.exitcode
            )
        return 1
    except _Shutdown as e:
        log.info("tokenizer pool: %s, stopping %d worker(s)", e, len(processes))
        return 0
    finally:
        # A second signal while stopping must not leave workers behind.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _stop(processes)


if __name__ == "__main__":
    sys.exit(main())
