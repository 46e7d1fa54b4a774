"""Int8-activation probe: start-up cost of repacking SmolLM2-135M's int4 layer matrices (30 x qkv, o, gate_up,
down) into the prototype's layout, from Int4Weight (unpack torch's nibbles, pack anew).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/int8_activations/repack_time.py
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vnni

from services.engine_core.fused_cpu.int4_matmul import unpack_q
from services.engine_core.models.int4 import Int4Weight

FUSED = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
weights = [Int4Weight.quantize(torch.randn(n, k) * 0.05) for n, k in FUSED.values()]
for w in weights:  # warm the unpack index caches (once per shape in the engine too)
    unpack_q(w)
t0 = time.perf_counter()
for _ in range(30):
    for w in weights:
        vnni.from_int4(w)
dt = time.perf_counter() - t0
print(f"repack 30 layers: {dt:.2f} s wall ({torch.get_num_threads()} threads)")
