"""A real Prometheus (Debian's `prometheus` package) run on loopback with the shipped
config and rules, pointed at a live NovaInfer: used by test_prometheus.py and by
benchmarks/dashboard_picture.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "novainfer.json"
# Grafana's variables, as the dashboard would expand them for "All models".
GRAFANA_VARS = {"$__rate_interval": "30s", "$model_name": ".+"}


def have_prometheus() -> bool:
    return shutil.which("prometheus") is not None and shutil.which("promtool") is not None


def write_config(directory: Path, target: str, interval: str = "1s") -> Path:
    """The shipped prometheus.yml with its rule files next to it, scraping `target` every
    `interval` and evaluating rules as often (a test cannot wait 5 s per sample)."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [target]}]
    for rule_file in config.get("rule_files", []):
        shutil.copy(DEPLOY / rule_file, directory / rule_file)
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def run_prometheus(directory: Path, target: str, port: int) -> Iterator[str]:
    """Start Prometheus on 127.0.0.1:port; yields its base URL, stops it after."""
    config = write_config(directory, target)
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(directory / "prometheus.log", "wb"),  # noqa: SIM115 (closed with the process)
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError("prometheus exited: " + (directory / "prometheus.log").read_text()[-2000:])
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def api(url: str, path: str, **params: Any) -> Any:
    """GET an HTTP API path; returns `data`, raises on an error answer."""
    query = urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(f"{url}/api/v1/{path}?{query}", timeout=30) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        body = json.load(e)
    if body.get("status") != "success":
        raise ValueError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, legend, PromQL with Grafana's variables expanded) for every target."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], target.get("legendFormat", ""), expr))
    return out


def rules() -> list[dict[str, Any]]:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    return [
        rule
        for rule_file in config.get("rule_files", [])
        for group in yaml.safe_load((DEPLOY / rule_file).read_text())["groups"]
        for rule in group["rules"]
    ]
