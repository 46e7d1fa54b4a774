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
    # Plain `novainfer` is the default configuration: no mode flags at all.
    assert not {"--dtype", "--quantization", "--exact"} & set(base)
    for name, flags in cp.NOVAINFER_MODES.items():
        cmd = cp.server_command(name, 1, "/r", 2, dtype="bfloat16")  # dtype is transformers' only
        assert cmd == base + flags, name
    assert cp.server_command("novainfer-exact", 1, "/r", 2)[-1] == "--exact"


def test_machine_info_records_the_cpu_features() -> None:
    info = machine_info()
    assert set(info["cpu_features"]) <= set(FEATURES)
    assert info["cpus"] >= 1 and info["cpu_model"]
