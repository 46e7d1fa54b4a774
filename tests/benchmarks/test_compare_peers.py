"""The peer comparison runs every peer at its best working configuration, and says so."""

from __future__ import annotations

import os
import sys

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
)

import compare_peers as cp
from machine_info import FEATURES, machine_info


def test_llamacpp_runs_with_default_flags_but_its_slots() -> None:
    cmd = cp.server_command("llamacpp", 8080, "/tmp/x", threads=2)
    # -nr turns off the repacked weight layouts (llama.cpp's fast path); -kvu makes every
    # sequence attend over all slots' cells. Neither is llama-server's default with -np N.
    for hobbling in ("-nr", "--no-repack", "-kvu", "--kv-unified", "--no-mmap", "-fa"):
        assert hobbling not in cmd
    assert cmd[0] == cp.LLAMA_BUILDS["native"]
    assert cmd[cmd.index("-np") + 1] == str(cp.MAX_CONCURRENCY)
    assert int(cmd[cmd.index("-c") + 1]) // cp.MAX_CONCURRENCY >= 1024  # per-slot context for our conversations
    assert cp.server_command("llamacpp", 8080, "/tmp/x", 2, llama_server="/b/llama-server")[0] == "/b/llama-server"


def test_novainfer_variants_differ_only_in_their_mode() -> None:
    base = cp.server_command("novainfer", 1, "/r", 2)
    bf16 = cp.server_command("novainfer-bf16", 1, "/r", 2)
    int4 = cp.server_command("novainfer-int4", 1, "/r", 2)
    assert base[base.index("--dtype") + 1] == "float32"
    assert bf16[bf16.index("--dtype") + 1] == "bfloat16"
    assert int4[-2:] == ["--quantization", "int4"]


def test_machine_info_records_the_cpu_features() -> None:
    info = machine_info()
    assert set(info["cpu_features"]) <= set(FEATURES)
    assert info["cpus"] >= 1 and info["cpu_model"]
