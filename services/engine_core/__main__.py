"""`python -m services.engine_core [flags]`: one engine-core replica (see --engine-index)."""

from services.engine_core.server import main
from shared.config import parse_config
from shared.log_setup import setup_logging

if __name__ == "__main__":
    config = parse_config(description=__doc__).with_default_addresses()
    setup_logging(config, f"engine-{config.serve.engine_index}")
    main(config)
