"""The fused step's int4 matmul (fused_cpu/csrc/int4_matmul.h: weights dequantized once per
call, row-invariant) against torch's `_weight_int4pack_mm_for_cpu` (unpacks the weights per
block of rows) and dense bf16 `F.linear` (oneDNN, AMX where the CPU has it), on SmolLM2's four
layer matrices, at the row counts of decode steps (1..8 requests) and of verify steps (a few
requests each verifying k drafts: 9..80 rows).

Every round times every (matrix, rows, kernel) once, interleaved, and the median over rounds is
kept, because the machine is shared. At one thread the clock is the thread's CPU time (the
kernels run on the calling thread), which a busy neighbour barely moves; at more, wall time.
Writes benchmarks/results/int4_matmul_kernel.json (per matrix and per whole layer).

    .venv/bin/python benchmarks/int4_matmul_kernel.py --threads 1
    .venv/bin/python benchmarks/int4_matmul_kernel.py --threads 2 --output benchmarks/results/int4_matmul_kernel_2t.json
    .venv/bin/python benchmarks/int4_matmul_kernel.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from machine_info import machine_info, write_results  # noqa: E402

from services.engine_core.fused_cpu import extension  # noqa: E402
from services.engine_core.fused_cpu.int4_matmul import repack  # noqa: E402
from services.engine_core.models.int4 import GROUP, Int4Weight  # noqa: E402

RESULTS = os.path.join(HERE, "results", "int4_matmul_kernel.json")
# SmolLM2-135M: name -> (out, in) of the fused layer matrices (q|k|v, o, gate|up, down).
MATRICES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
ROWS = [1, 2, 4, 8, 9, 12, 16, 24, 32, 40, 48, 64, 72, 80]
KERNELS = ["novainfer_int4", "torch_int4pack", "bf16"]


def kernels(weight: torch.Tensor, ext: Any) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    q4 = Int4Weight.quantize(weight)
    packed, scales_zeros = repack(q4)
    dense = weight.to(torch.bfloat16)
    return {
        "novainfer_int4": lambda x: ext.int4_matmul(x, packed, scales_zeros),
        "torch_int4pack": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4.packed, GROUP, q4.scales_zeros),
        "bf16": lambda x: F.linear(x, dense),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=31)
    p.add_argument("--rows", type=int, nargs="+", default=ROWS)
    p.add_argument("--quick", action="store_true", help="a smoke check, not figures")
    p.add_argument("--output", default=RESULTS)
    args = p.parse_args()
    ext = extension.load(extension.DEFAULT_CACHE_DIR)
    if ext is None:
        print("the fused CPU kernels did not build here (see the warning)", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    rows_list = [1, 9, 72] if args.quick else args.rows
    rounds = 3 if args.quick else args.rounds
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    torch.manual_seed(0)

    fns = {name: kernels(torch.randn(n, k) * 0.05, ext) for name, (n, k) in MATRICES.items()}
    xs = {
        (name, rows): torch.randn(rows, k).to(torch.bfloat16) for name, (_, k) in MATRICES.items() for rows in rows_list
    }
    samples: dict[tuple[str, int, str], list[float]] = {}
    for (name, rows), x in xs.items():
        for kn, fn in fns[name].items():
            fn(x)  # warm-up
            samples[(name, rows, kn)] = []
    for _ in range(rounds):
        for (name, rows), x in xs.items():
            for kn, fn in fns[name].items():
                t0 = clock()
                fn(x)
                samples[(name, rows, kn)].append(clock() - t0)

    median_us = {
        name: {rows: {kn: statistics.median(samples[(name, rows, kn)]) * 1e6 for kn in KERNELS} for rows in rows_list}
        for name in MATRICES
    }
    layer_us = {rows: {kn: sum(median_us[m][rows][kn] for m in MATRICES) for kn in KERNELS} for rows in rows_list}
    print(f"{'rows':>4}  " + "  ".join(f"{kn:>15}" for kn in KERNELS) + "   (a layer's four matrices, us)")
    for rows in rows_list:
        t = layer_us[rows]
        speedup = t["torch_int4pack"] / t["novainfer_int4"]
        print(f"{rows:>4}  " + "  ".join(f"{t[kn]:15.0f}" for kn in KERNELS) + f"   torch/novainfer {speedup:.2f}x")
    out = {
        "benchmark": "int4_matmul_kernel",
        "machine": machine_info(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "threads": args.threads,
        "clock": "thread_time" if args.threads == 1 else "perf_counter",
        "rounds": rounds,
        "quick": args.quick,
        "matrices": MATRICES,
        "median_us": median_us,
        "layer_us": layer_us,
        "torch_over_novainfer_layer": {
            rows: layer_us[rows]["torch_int4pack"] / layer_us[rows]["novainfer_int4"] for rows in rows_list
        },
    }
    write_results(args.output, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
