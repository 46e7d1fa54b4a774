"""benchmarks/gpu/bench_gpu.py in its --smoke mode: every section runs and records numbers.

The script is meant to be right the first time it meets a GPU, so CI runs all of it with tiny
shapes (on a CPU the Triton kernels run in the interpreter). No assertion is about timings.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]')")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # starts a process that builds engines and transformers models

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu", "bench_gpu.py")
SECTIONS = {"correctness", "bandwidth", "decode_attention", "prefill_attention", "decode_step", "e2e"}


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


if not torch.cuda.is_available() and _version(triton.__version__) < (3, 8) and _version(np.__version__) >= (2, 4):
    # As in tests/engine_core/test_triton_attention.py: this interpreter cannot run the kernels.
    pytest.skip(f"triton {triton.__version__}'s interpreter fails with numpy {np.__version__}", allow_module_level=True)


def is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_smoke_run_records_every_section(tmp_path) -> None:
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["smoke"] is True and doc["device"] and doc["torch"] and "bandwidth_definition" in doc
    assert set(doc["sections"]) == SECTIONS
    for name, sec in doc["sections"].items():
        assert "error" not in sec, (name, sec.get("error"), sec.get("traceback"))

    s = doc["sections"]
    assert s["correctness"]["max_rel_error"] <= s["correctness"]["tolerance"]
    assert all(c["kv_write_exact"] for c in s["correctness"]["cases"])
    assert s["bandwidth"]["copy_bandwidth_gb_per_s"] > 0
    assert s["decode_attention"]["cases"]
    for case in s["decode_attention"]["cases"]:
        assert is_number(case["kernel_us"]) and case["fraction_of_copy_bandwidth"] > 0
    assert s["prefill_attention"]["speed_vs_sdpa"] > 0
    assert s["prefill_attention"]["rel_error_vs_sdpa"] < 1e-3  # fp32 on CPU: the same attention
    assert {r["enforce_eager"] for r in s["decode_step"]["runs"]} == {False, True}
    for run in s["decode_step"]["runs"]:
        assert "error" not in run, run
        for case in run["cases"]:
            assert case["roofline_fraction"] > 0 and case["weight_bytes"] > 0 and case["kv_bytes"] > 0
    e2e = s["e2e"]
    assert e2e["novainfer"]["complete"] and e2e["novainfer"]["output_tokens"] == e2e["requested_output_tokens"]
    assert "error" not in e2e["transformers"], e2e["transformers"]
    assert e2e["transformers"]["output_tokens_per_s"] > 0 and is_number(e2e["speedup"])

    # One target per issue figure (and the correctness bound), each with a value and a verdict.
    assert {t["section"] for t in doc["targets"]} == SECTIONS - {"bandwidth"}
    for t in doc["targets"]:
        assert is_number(t["value"]) and isinstance(t["met"], bool), t


def test_transformers_static_batches(tmp_path) -> None:
    # The fallback the GPU run takes when its transformers has no (working) continuous batching.
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--smoke", "--sections", "e2e", "--hf-mode", "static", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    hf = json.loads(out.read_text())["sections"]["e2e"]["transformers"]
    assert hf["mode"].startswith("static") and hf["complete"] and hf["output_tokens_per_s"] > 0, hf


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_full_run_without_gpu_refuses(tmp_path) -> None:
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "--smoke" in proc.stderr
    assert not out.exists()
