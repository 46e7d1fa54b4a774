"""`python -m services.engine_core [flags]`: one engine-core replica (see --engine-index)."""

import time

STARTED = time.monotonic()  # before the imports: torch's is a large part of a (re)start

from services.engine_core.server import main  # noqa: E402
from shared.config import parse_config  # noqa: E402
from shared.log_setup import setup_logging  # noqa: E402

if __name__ == "__main__":
    config = parse_config(description=__doc__).with_default_addresses()
    setup_logging(config, f"engine-{config.serve.engine_index}")
    main(config, STARTED)
