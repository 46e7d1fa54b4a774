"""deploy/kubernetes/ rendered offline: every object valid against the Kubernetes schemas
(kubernetes-validate) or its CRD's schema (vendored in crds/), and ports, probes, flags,
env vars and metric names in agreement with the code they run, as test_compose.py does
for the compose file."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from novainfer.cli import build_parser
from services.gateway.app import build_app
from shared.config import ENV_PREFIX, EngineConfig, ServeConfig, config_from_args
from tests.deploy.kustomize import render
from tests.deploy.metric_names import metric_names

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.parent.name for p in (KUBE / "overlays").glob("*/kustomization.yaml"))
CRDS = {
    (d["group"] + "/" + d["version"], d["kind"]): d["openAPIV3Schema"]
    for d in (json.loads(p.read_text()) for p in (Path(__file__).parent / "crds").glob("*.json"))
}
K8S_VERSION = "1.32.0"
Objects = dict[tuple[str, str], dict[str, Any]]


def by_kind(objects: list[dict[str, Any]]) -> Objects:
    out = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    assert len(out) == len(objects), "two objects share a kind and name"
    return out


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, Objects]:
    return request.param, by_kind(render(KUBE / "overlays" / request.param))


def test_overlays_exist() -> None:
    assert {"cpu", "gpu", "gpu-inference-gateway"} <= set(OVERLAYS)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("name", OVERLAYS)
def test_renderer_matches_kubectl_kustomize(name: str) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(KUBE / "overlays" / name)], check=True, capture_output=True, text=True
    ).stdout
    assert by_kind([d for d in yaml.safe_load_all(out) if d]) == by_kind(render(KUBE / "overlays" / name))


def test_objects_valid(overlay: tuple[str, Objects]) -> None:
    for (kind, _name), obj in overlay[1].items():
        schema = CRDS.get((obj["apiVersion"], kind))
        if schema is not None:
            jsonschema.validate(obj, schema)
            continue
        # Raises SchemaNotFoundError for a kind that is neither built in nor vendored.
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_invalid_objects_are_caught() -> None:
    """The validators really check: a misspelt field or a wrong type fails."""
    objects = by_kind(render(KUBE / "overlays" / "gpu-inference-gateway"))
    deployment = json.loads(json.dumps(objects[("Deployment", "novainfer")]))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    pool = json.loads(json.dumps(objects[("InferencePool", "novainfer")]))
    pool["spec"]["targetPorts"] = [{"number": "http"}]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pool, CRDS[("inference.networking.k8s.io/v1", "InferencePool")])


def _server(objects: Objects) -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = objects[("Deployment", "novainfer")]
    return deployment, deployment["spec"]["template"]["spec"]["containers"][0]


def _config(container: dict[str, Any]) -> Any:
    args = build_parser().parse_args(container["command"][1:] + container["args"])
    assert args.func.__name__ == "_serve"
    # Values from the downward API are only known in the pod.
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    fields = set(EngineConfig.__struct_fields__) | set(ServeConfig.__struct_fields__)
    for key in env:
        assert key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() in fields, key
    # Kubernetes expands $(VAR) in args from the container's env: every such name must be set there.
    declared = {e["name"] for e in container.get("env", [])}
    for arg in container["args"]:
        assert set(re.findall(r"\$\((\w+)\)", arg)) <= declared, arg
    return config_from_args(args, env)


def test_server_flags_ports_and_probes(overlay: tuple[str, Objects]) -> None:
    name, objects = overlay
    deployment, container = _server(objects)
    assert container["command"] == ["novainfer", "serve"]
    config = _config(container)
    assert config.serve.host == "0.0.0.0"
    assert config.serve.num_engines == 1, "one engine per pod: the endpoint picker must see each cache"
    assert config.serve.metrics_compat == "vllm"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == config.serve.port
    app = build_app(config.with_default_addresses())
    routes = {r.resource.canonical for r in app.router.routes() if r.method == "GET" and r.resource is not None}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["path"] in routes
        assert get["port"] in ports or get["port"] == config.serve.port
    # The launcher drains for 30 s after SIGTERM.
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 30
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = objects[("Service", "novainfer")]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    monitor = objects[("ServiceMonitor", "novainfer")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert endpoint["path"] == "/metrics" and "/metrics" in routes
    if name.startswith("gpu"):
        assert config.engine.device == "cuda"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    else:
        assert "nvidia.com/gpu" not in json.dumps(container["resources"])


def test_cache_volume_is_seeded_from_the_image(overlay: tuple[str, Objects]) -> None:
    # Kubernetes does not copy image content into a new emptyDir (Docker fills a new volume):
    # an init container of the same image must, or the warmed caches are hidden.
    _, objects = overlay
    deployment, container = _server(objects)
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    cache_dir = env["NOVAINFER_CACHE_DIR"]
    assert re.search(rf"NOVAINFER_CACHE_DIR={re.escape(cache_dir)}\b", (ROOT / "Dockerfile").read_text())
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == cache_dir)
    (seed,) = pod["initContainers"]
    assert seed["image"] == container["image"]
    seed_mount = next(m for m in seed["volumeMounts"] if m["name"] == mount["name"])
    assert seed["command"] == ["sh", "-c", f"cp -a {cache_dir}/. {seed_mount['mountPath']}/"]


def test_inference_gateway_agrees(exported_metrics: set[str]) -> None:
    objects = by_kind(render(KUBE / "overlays" / "gpu-inference-gateway"))
    deployment, container = _server(objects)
    pool = objects[("InferencePool", "novainfer")]["spec"]
    assert pool["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert [p["number"] for p in pool["targetPorts"]] == [_config(container).serve.port]
    epp_service = objects[("Service", pool["endpointPickerRef"]["name"])]
    assert pool["endpointPickerRef"]["port"]["number"] in {p["port"] for p in epp_service["spec"]["ports"]}
    route = objects[("HTTPRoute", "novainfer")]
    backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert all(b["kind"] == "InferencePool" and b["name"] == "novainfer" for b in backends)

    epp = objects[("Deployment", "novainfer-epp")]["spec"]["template"]["spec"]
    assert (
        epp_service["spec"]["selector"].items()
        <= objects[("Deployment", "novainfer-epp")]["spec"]["template"]["metadata"]["labels"].items()
    )
    args = dict(a[2:].split("=", 1) for a in epp["containers"][0]["args"])
    assert args["pool-name"] == "novainfer"
    for flag in ("total-queued-requests-metric", "total-running-requests-metric", "kv-cache-usage-percentage-metric"):
        assert args[flag].startswith("novainfer_"), "the picker reads NovaInfer's own names"
    for flag in (*[f for f in args if f.endswith("-metric")],):
        assert args[flag].split("{")[0] in exported_metrics, f"--{flag}={args[flag]} is not exported"
    mount = epp["containers"][0]["volumeMounts"][0]
    config_map = objects[("ConfigMap", epp["volumes"][0]["configMap"]["name"])]
    config_file = Path(args["config-file"])
    assert str(config_file.parent) == mount["mountPath"] and config_file.name in config_map["data"]
    picker = yaml.safe_load(config_map["data"][config_file.name])
    assert picker["kind"] == "EndpointPickerConfig"
    declared = {p.get("name", p["type"]) for p in picker["plugins"]}
    for profile in picker["schedulingProfiles"]:
        assert {p["pluginRef"] for p in profile["plugins"]} <= declared


def test_kv_events_ports_agree() -> None:
    objects = by_kind(render(KUBE / "overlays" / "gpu-inference-gateway"))
    _, container = _server(objects)
    serve = _config(container).serve
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert serve.kv_events_endpoint == f"tcp://*:{ports['kv-events']}"
    assert serve.kv_events_replay_endpoint == f"tcp://*:{ports['kv-replay']}"
    assert serve.kv_events_topic.startswith("kv@")


def test_keda_scales_on_exported_metrics(exported_metrics: set[str]) -> None:
    objects = by_kind(render(KUBE / "overlays" / "gpu-inference-gateway"))
    scaled = objects[("ScaledObject", "novainfer")]["spec"]
    assert (scaled["scaleTargetRef"]["kind"], scaled["scaleTargetRef"]["name"]) in objects
    queries = [t["metadata"]["query"] for t in scaled["triggers"]]
    names = {n for q in queries for n in metric_names(q)}
    assert {"novainfer_num_requests_waiting", "novainfer_kv_cache_usage_ratio"} <= names <= exported_metrics


def test_readme_commands_render() -> None:
    """The kubectl commands in deploy/kubernetes/README.md name overlays that exist."""
    text = (KUBE / "README.md").read_text()
    paths = [w for line in re.findall(r"kubectl apply -k (\S+)", text) for w in shlex.split(line)]
    assert paths
    for p in paths:
        assert (ROOT / p / "kustomization.yaml").exists(), p
