"""The CPU image, as near as a machine without a Docker engine gets: the Dockerfile's own steps
on the files its build context would hold. The wheel is built from exactly the files
.dockerignore lets through, with the wheel stage's command; deploy/install.sh (the final
stage's one RUN) installs it into a fresh venv with the pinned torch and warms the caches;
then the image's CMD starts the service from that venv, outside the source tree, and the
image's HEALTHCHECK and an API request must pass. A file missing from the package, a wrong
entry point or a broken install step fails here.

Two differences from `docker build`, both about where bytes come from: the torch wheel comes
from pip's configured find-links (e.g. /opt/wheels) when it holds the pinned one, and pip's
cache is left on (PIP_NO_CACHE_DIR is the image's, to keep it small), so a rerun is fast."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.deploy.deploy_files import ROOT, DockerIgnore, parse_dockerfile, read_pins

pytestmark = pytest.mark.slow

_START_TIMEOUT_S = 300.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_torch_wheel(version: str) -> Path | None:
    """The pinned CPU torch wheel for this Python in pip's find-links, if it holds it."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    dirs = [os.environ.get("PIP_FIND_LINKS", "")]
    dirs += [line.split("=", 1)[1].strip("'") for line in out.splitlines() if "find-links" in line]
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for d in filter(None, " ".join(dirs).split()):
        for wheel in sorted(Path(d.removeprefix("file://")).glob(f"torch-{version}+cpu-{tag}-*.whl")):
            return wheel
    return None


def _du_mb(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) >> 20


def _install_env(tmp: Path, pins: dict[str, str]) -> dict[str, str]:
    """The environment of the final stage's install RUN: its ENV and ARGs (from pins.env)."""
    final = parse_dockerfile().final
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(pins)
    for key, value in final.env().items():
        if key == "PIP_NO_CACHE_DIR":  # see the module docstring
            continue
        if value.startswith("/cache"):
            value = str(tmp / "cache") + value[len("/cache") :]
        env[key] = value.replace("/opt/novainfer", str(tmp / "venv"))
    env["PATH"] = env["PATH"].replace("$PATH", os.environ["PATH"])
    env["FLAVOR"] = "cpu"
    env["PYTHON"] = sys.executable  # the CPU image's Python is this one's (3.11)
    env["TMPDIR"] = str(tmp)
    wheel = _local_torch_wheel(pins["CPU_TORCH_VERSION"])
    if wheel is not None:
        env["CPU_TORCH_INDEX"] = ""  # pip's own configuration, which finds the wheel on disk
        env["PIP_FIND_LINKS"] = str(wheel.parent)
    else:
        try:
            socket.getaddrinfo(urlsplit(pins["CPU_TORCH_INDEX"]).hostname, 443)
        except OSError:
            pytest.skip("the pinned CPU torch wheel is neither in pip's find-links nor reachable on its index")
    return env


def test_image_install_runs_the_service(tmp_path: Path) -> None:
    pins = read_pins()
    dockerfile = parse_dockerfile()

    # The build context, as .dockerignore shapes it, and the wheel stage's command on it.
    context = tmp_path / "context"
    for rel in DockerIgnore().context_files():
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, context / rel)
    (wheel_cmd,) = [shlex.split(i.args) for i in dockerfile.stage("wheel").all("RUN")]
    assert wheel_cmd[0] == "pip"
    dist = tmp_path / "dist"
    argv = [sys.executable, "-m", *[str(dist) if w == "/dist" else w for w in wheel_cmd]]
    subprocess.run(argv, cwd=context, check=True, capture_output=True)
    (wheel,) = dist.glob("novainfer-*.whl")

    # The final stage's install, with its script, into a fresh venv.
    venv, cache = tmp_path / "venv", tmp_path / "cache"
    env = _install_env(tmp_path, pins)
    result = subprocess.run(
        ["sh", str(ROOT / "deploy" / "install.sh"), str(venv), str(wheel)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    python = str(venv / "bin" / "python")
    probe = subprocess.run(
        [
            python,
            "-c",
            "import json, torch, shared, services, novainfer; "
            + "print(json.dumps([torch.__version__, torch.version.cuda, novainfer.__file__]))",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    torch_version, cuda, package = json.loads(probe.stdout)
    assert torch_version == f"{pins['CPU_TORCH_VERSION']}+cpu" and cuda is None
    assert package.startswith(str(venv)), f"imported {package}, not the installed package"
    assert list(cache.glob("tokenizers/*/*")), "the tokenizer cache was not warmed"
    assert list(cache.glob("*.safetensors")), "the GGUF weight cache was not warmed"
    warmed = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    print(f"\nestimate for the CPU image: venv {_du_mb(venv)} MB + caches {_du_mb(cache)} MB")

    # The image's CMD, on a free port, from a directory without the source tree.
    (cmd,) = dockerfile.final.all("CMD")
    port = _free_port()
    argv = [*(cmd.exec_form() or []), "--port", str(port), "--host", "127.0.0.1"]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        (check,) = dockerfile.final.all("HEALTHCHECK")
        healthcheck = [*(check.exec_form() or []), "--pid", str(proc.pid)]
        deadline = time.monotonic() + _START_TIMEOUT_S
        while subprocess.run(healthcheck, cwd=tmp_path, env=env, capture_output=True, check=False).returncode != 0:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the service did not become healthy"
            time.sleep(1.0)
        body = json.dumps({"model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is", "max_tokens": 4})
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", body.encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            completion = json.load(response)
        assert completion["usage"]["completion_tokens"] > 0
        # It started from the warmed caches: nothing in them was rebuilt.
        assert {p: p.stat().st_mtime_ns for p in warmed if p.exists()} == warmed
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-4000:]
