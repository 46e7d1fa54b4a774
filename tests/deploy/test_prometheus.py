"""A real Prometheus scrapes a live NovaInfer under a short load, with the shipped config
and rules; every Grafana dashboard query and every recording / alert rule is evaluated
through its HTTP API and must parse and return series."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.deploy.live_prometheus import DEPLOY, api, dashboard_queries, have_prometheus, rules, run_prometheus
from tests.e2e.conftest import Server, free_port, start_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not have_prometheus(), reason="needs Debian's prometheus package (apt-get install prometheus)"),
]
MODEL = "SmolLM2-135M-Instruct"  # the bundled model: a chat template and a real vocabulary
# An alert is "<query> <comparison> <threshold>"; the query part must return series.
ALERT = re.compile(r"^(?P<query>.+?)\s*(?:>|<|==|!=|>=|<=)\s*[0-9.]+$", re.DOTALL)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(str(tmp_path_factory.mktemp("serve")))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def prometheus(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with run_prometheus(tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{server.port}", free_port()) as url:
        yield url


def load(server: Server) -> None:
    """Streams and non-streams over a shared prefix, and one bad request (a 400)."""
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    system = "You are a terse assistant. " * 8

    def chat(i: int) -> None:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Count to {i}."}]
        if i % 2:
            for _ in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stream=True):
                pass
        else:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(chat, range(16)))
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", temperature=-1)


def test_promtool_accepts_shipped_config() -> None:
    subprocess.run(["promtool", "check", "config", str(DEPLOY / "prometheus.yml")], check=True)


def test_every_dashboard_query_and_rule_returns_series(server: Server, prometheus: str) -> None:
    import time

    load(server)
    # Rates need two scrapes after the load; rules one evaluation after that.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(1)
        if api(prometheus, "query", query='sum(novainfer_http_requests_total{status="400"})')["result"]:
            break
    time.sleep(4)

    empty = []
    for title, legend, expr in dashboard_queries():
        result = api(prometheus, "query", query=expr)["result"]  # raises if it does not parse
        if not result:
            empty.append(f"{title} / {legend}: {expr}")
    assert not empty, "dashboard queries without series:\n" + "\n".join(empty)

    evaluated = {r["name"]: r for g in api(prometheus, "rules")["groups"] for r in g["rules"]}
    for rule in rules():
        name = rule.get("record") or rule["alert"]
        state = evaluated[name]
        assert state["health"] == "ok", f"{name}: {state.get('lastError')}"
        if "record" in rule:
            assert api(prometheus, "query", query=name)["result"], f"recording rule {name} has no series"
        else:
            match = ALERT.match(rule["expr"].strip())
            assert match, f"alert {name} is not '<query> <comparison> <threshold>'"
            assert api(prometheus, "query", query=match["query"])["result"], f"alert {name}'s query has no series"
