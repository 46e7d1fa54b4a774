"""`python -m services.gateway [flags]`: the HTTP gateway (OpenAI API, metrics, chat UI)."""

from services.gateway.app import run
from shared.config import parse_config
from shared.log_setup import setup_logging

if __name__ == "__main__":
    config = parse_config(description=__doc__).with_default_addresses()
    setup_logging(config, "gateway")
    run(config)
