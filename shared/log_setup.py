"""The one way every process configures logging: one format, the process named in each line.

Modules log through `log = logging.getLogger(__name__)`; a process calls setup_logging once,
at its entry point, so lines from the gateway, the tokenizer workers and the engine cores
interleave readably in one terminal (`[engine-0] services.engine_core.engine: ...`).
"""

from __future__ import annotations

import logging

from shared.config import Config


def setup_logging(config: Config, process: str, level: str | None = None) -> None:
    """process: the name shown in brackets; level: overrides --log-level."""
    logging.basicConfig(
        level=(level or config.serve.log_level).upper(),
        format=f"%(asctime)s %(levelname)s [{process}] %(name)s: %(message)s",
    )
