"""Every Triton kernel launch the engine makes compiles for an H100 (sm_90) without spilling.

The interpreter tests check the kernels' results on a CPU; this one checks what only a GPU build
shows: that Triton's compiler and ptxas accept each launch configuration (every shipped model
shape; bf16, fp16, fp32; split and unsplit decode; prefill), and that no build uses local memory
(register spills, which would make the memory-bound kernels slow). No GPU is needed: Triton
compiles for a named target. Runs sm90_build.py in a subprocess because this process's kernels
were defined under TRITON_INTERPRET.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]')")

SCRIPT = Path(__file__).with_name("sm90_build.py")


def test_every_launch_builds_for_sm90_without_spills() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.stdout, proc.stderr[-4000:]
    builds = json.loads(proc.stdout)
    failed = [b for b in builds if b["error"]]
    assert not failed, "\n".join(f"{b['kernel']} [{b['case']}]: {b['error']}" for b in failed)
    spilled = [b for b in builds if b["local_bytes"]]
    assert not spilled, [(b["kernel"], b["case"], b["local_bytes"]) for b in spilled]
    assert proc.returncode == 0, proc.stderr[-4000:]
    kernels = {b["kernel"] for b in builds}
    assert kernels == {"_write_kv_kernel", "_paged_attention_kernel", "_merge_splits_kernel"}
    # Every build fits an H100 SM: 255 registers per thread, 227 KiB of shared memory per block.
    assert all(0 < b["registers"] <= 255 and b["shared_bytes"] <= 227 * 1024 for b in builds)
    # Both head sizes and all three dtypes were built.
    heads = {b["constexprs"]["HEAD_DIM"] for b in builds}
    precisions = {b["constexprs"].get("DOT_PRECISION") for b in builds} - {None}
    assert heads == {64, 128} and precisions == {"tf32", "ieee"}
