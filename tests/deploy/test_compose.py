"""docker compose cannot run here (no engine), so check that the compose file, the
Dockerfile and Prometheus' config agree with the code they start."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from shared.config import ENV_PREFIX, EngineConfig, ServeConfig, config_from_args
from tests.deploy.metric_names import metric_names

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
    assert {"gateway", "tokenizer-pool", "engine-core", "engine-core-gpu", "prometheus", "grafana"} <= set(
        compose["services"]
    )


@pytest.mark.parametrize("name", ["gateway", "tokenizer-pool", "engine-core", "engine-core-gpu"])
def test_commands_are_runnable_modules(compose: dict, name: str) -> None:
    cmd = compose["services"][name]["command"]
    assert cmd[:2] == ["python", "-m"]
    module = cmd[2]
    assert importlib.util.find_spec(module + ".__main__") is not None, module


@pytest.mark.parametrize("name", ["gateway", "tokenizer-pool", "engine-core", "engine-core-gpu"])
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


def _mounts(service: dict) -> dict[str, Path]:
    """container path -> the file or directory on the host (relative to the compose file)."""
    out = {}
    for volume in service.get("volumes", []):
        src, dst = volume.split(":")[:2]
        if src.startswith("."):
            out[dst] = (COMPOSE.parent / src).resolve()
    return out


def test_prometheus_rules_mounted_and_use_exported_metrics(compose: dict, exported_metrics: set[str]) -> None:
    mounts = _mounts(compose["services"]["prometheus"])
    config_path = "/etc/prometheus/prometheus.yml"
    prom_cfg = yaml.safe_load(mounts[config_path].read_text())
    assert prom_cfg["rule_files"]
    for rule_file in prom_cfg["rule_files"]:
        # Relative rule paths resolve against the config file's directory.
        target = os.path.join(os.path.dirname(config_path), rule_file)
        assert target in mounts and mounts[target].is_file(), f"{rule_file} is not mounted next to the config"
        rules = [r for g in yaml.safe_load(mounts[target].read_text())["groups"] for r in g["rules"]]
        assert any("alert" in r for r in rules) and any("record" in r for r in rules)
        for rule in rules:
            assert metric_names(rule["expr"]) <= exported_metrics, rule


def test_grafana_provisioning_agrees(compose: dict, exported_metrics: set[str]) -> None:
    services = compose["services"]
    mounts = _mounts(services["grafana"])
    provisioning = mounts["/etc/grafana/provisioning"]
    [datasource] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    prom_port = services["prometheus"]["ports"][0].split(":")[-1]
    assert datasource["type"] == "prometheus" and datasource["url"] == f"http://prometheus:{prom_port}"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "novainfer.yml").read_text())["providers"]
    dashboards = mounts[provider["options"]["path"]]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards / os.path.relpath(home, provider["options"]["path"])).is_file()
    for path in dashboards.glob("*.json"):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for ref in [panel["datasource"]] + [t["datasource"] for t in panel["targets"]]:
                assert ref == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
            for target in panel["targets"]:
                assert metric_names(target["expr"]) <= exported_metrics, (panel["title"], target["expr"])


def test_cpu_engine_is_the_default_profile(compose: dict) -> None:
    assert compose["services"]["engine-core"]["profiles"] == ["cpu"]
    dotenv = dict(
        line.split("=", 1) for line in (COMPOSE.parent / ".env").read_text().splitlines() if line and line[0] != "#"
    )
    assert dotenv["COMPOSE_PROFILES"] == "cpu"
    # Everything else runs whatever the profile.
    for name, service in compose["services"].items():
        if not name.startswith("engine-core"):
            assert "profiles" not in service, name


def test_gpu_profile_runs_the_engine_core_from_the_cuda_image(compose: dict) -> None:
    services = compose["services"]
    cpu, gpu = services["engine-core"], services["engine-core-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["image"] == "novainfer:cuda" and gpu["build"]["args"]["FLAVOR"] == "cuda"
    # The same service as the CPU one, only the image and the device differ.
    for key in ("command", "environment", "expose", "volumes", "restart"):
        assert gpu.get(key) == cpu.get(key), key
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == 1
    # It answers to the name the other services connect to.
    config = config_from_args(None, _env(services["tokenizer-pool"]))
    hosts = {urlsplit(a).hostname for a in config.serve.engine_addrs}
    assert hosts <= set(gpu["networks"]["default"]["aliases"])
    engine = config_from_args(None, _env(gpu))
    assert engine.engine.device == "auto"  # auto picks cuda when the GPU is there


def test_gateway_starts_with_either_engine(compose: dict) -> None:
    depends = compose["services"]["gateway"]["depends_on"]
    for name in ("engine-core", "engine-core-gpu"):
        assert depends[name]["required"] is False, f"{name} is off in one profile; the gateway must not require it"


def test_novainfer_services_run_the_images_the_dockerfile_builds(compose: dict) -> None:
    for name, service in compose["services"].items():
        if service["image"].startswith("novainfer:"):
            assert service["image"] in ("novainfer:cpu", "novainfer:cuda"), name
