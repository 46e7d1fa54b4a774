"""Which CPU matmul kernel is fastest for each of SmolLM2's weight matrices at each batch size.

Candidates: dense float32 and bfloat16 `F.linear` (oneDNN; AMX for bf16 where the CPU has it), the
weight-only kernels `_weight_int4pack_mm_for_cpu` (4-bit groups of 32, what --quantization int4
uses) and `_weight_int8pack_mm` (8-bit, one scale per output row), both with bfloat16
activations, oneDNN's int8 x int8 matmul with the activations quantized per row (models/int8.py,
the int8 LM head's kernel where the CPU has VNNI), and, where the fused CPU extension builds, its
int8 kernel (fused_cpu/csrc/int8_matmul.h: the same int8 values and scales times the bf16 rows in
fp32; the head's kernel without VNNI) and its bf16 kernel (fused_cpu/csrc/bf16_matmul.h, `bf16_fused`:
bf16 weights times bf16 rows in fp32, row-invariant; a float checkpoint's decode rows on a CPU
without native bf16), beside what that CPU's library runs on the same bf16 weights: fp32 copies
made per call (`fp32_widened`), and fp32 weights in calls padded to a multiple of 4 rows
(`fp32_padded4`: the fused step's decode rows before bf16_matmul.h). Rows 1..256 stand for the
step's batch size.
Each (matrix, rows) times every kernel interleaved, repeated, and keeps the median, because the
machine is shared; at --threads 1 the times are the thread's CPU time (time.thread_time).
Reports per rows the fastest kernel summed over a layer's four matrices (and the LM head), the
weight bytes each kernel reads, and up to how many rows each weight-only kernel beats each dense
one. Writes benchmarks/results/cpu_linear_kernels.json.

    .venv/bin/python benchmarks/cpu_linear_kernels.py
    .venv/bin/python benchmarks/cpu_linear_kernels.py --quick
    .venv/bin/python benchmarks/cpu_linear_kernels.py --matrices lm_head --kernels fp32 int8pack int8_fused \
        --rows 1 2 4 9 16 32 64 128 --threads 1 --output benchmarks/results/cpu_linear_kernels_int8_fused_1thread.json
    .venv/bin/python benchmarks/cpu_linear_kernels.py --kernels fp32 fp32_padded4 fp32_widened bf16_fused \
        --rows 1 2 4 9 16 32 64 128 --threads 1 --output benchmarks/results/cpu_linear_kernels_bf16_fused_1thread.json
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
from services.engine_core.models import dense as dense_calls  # noqa: E402
from services.engine_core.models.int4 import GROUP, Int4Weight  # noqa: E402
from services.engine_core.models.int8 import Int8Weight  # noqa: E402

RESULTS = os.path.join(HERE, "results", "cpu_linear_kernels.json")
# SmolLM2-135M: name -> (out, in) of the fused matrices (q|k|v, o, gate|up, down) and the LM head.
MATRICES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
KERNELS = [
    "fp32",
    "bf16",
    "int4pack",
    "int8pack",
    "int8_onednn",
    "int8_fused",
    "bf16_fused",
    "fp32_widened",
    "fp32_padded4",
]
DENSE = ("bf16", "fp32", "fp32_widened")


def kernels(weight: torch.Tensor) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int, torch.dtype]]:
    """name -> (x -> x @ weight.T, weight bytes read, activation dtype)."""
    bf16 = weight.to(torch.bfloat16)
    q4 = Int4Weight.quantize(weight)
    scale = weight.abs().amax(1).clamp_min(1e-8) / 127
    q8 = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    scale8 = scale.to(torch.bfloat16)
    w8a8 = Int8Weight.quantize(weight)
    ext = extension.load(extension.DEFAULT_CACHE_DIR)
    found: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int, torch.dtype]] = {
        "fp32": (lambda x: F.linear(x, weight), weight.nbytes, torch.float32),
        "bf16": (lambda x: F.linear(x, bf16), bf16.nbytes, torch.bfloat16),
        "int4pack": (
            lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4.packed, GROUP, q4.scales_zeros),
            q4.packed.nbytes + q4.scales_zeros.nbytes,
            torch.bfloat16,
        ),
        "int8pack": (
            lambda x: torch.ops.aten._weight_int8pack_mm(x, q8, scale8),
            q8.nbytes + scale8.nbytes,
            torch.bfloat16,
        ),
        # int8 x int8 through oneDNN, activations quantized per row (what the int8 LM head runs).
        "int8_onednn": (w8a8, w8a8.nbytes, torch.bfloat16),
        # The same int8 values and scales through the fused extension's kernel (bf16 rows in fp32).
        "int8_fused": (lambda x: ext.int8_matmul(x, w8a8.values, w8a8.scales), w8a8.nbytes, torch.bfloat16),
        "bf16_fused": (lambda x: ext.bf16_matmul(x, bf16), bf16.nbytes, torch.bfloat16),
        "fp32_widened": (lambda x: F.linear(x.float(), bf16.float()), bf16.nbytes, torch.bfloat16),
        "fp32_padded4": (lambda x: dense_calls.linear(x, weight, multiple=4), weight.nbytes, torch.bfloat16),
    }
    if ext is None:
        del found["int8_fused"], found["bf16_fused"]
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="a smoke check, not figures")
    p.add_argument("--rows", type=int, nargs="+", default=ROWS, help="row counts (the step's rows) to time")
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=KERNELS, help="kernels to compare")
    p.add_argument("--matrices", nargs="+", choices=list(MATRICES), default=list(MATRICES), help="matrices to time")
    p.add_argument("--output", default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # One thread computes on the calling thread: its CPU time, which other processes disturb less.
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    rows_list = [1, 16, 64] if args.quick else args.rows
    rounds = 2 if args.quick else args.rounds
    torch.manual_seed(0)

    times: dict[str, dict[int, dict[str, float]]] = {}
    bytes_read: dict[str, dict[str, int]] = {}
    for name in args.matrices:
        n, k = MATRICES[name]
        w = torch.randn(n, k) * 0.05
        ks = {kn: v for kn, v in kernels(w).items() if kn in args.kernels}
        bytes_read[name] = {kn: b for kn, (_, b, _) in ks.items()}
        # Every round times every (rows, kernel) once, so a slow spell of the shared machine
        # spreads over all of them instead of spoiling one row count's figures.
        xs = {rows: {dt: torch.randn(rows, k).to(dt) for dt in (torch.float32, torch.bfloat16)} for rows in rows_list}
        samples: dict[int, dict[str, list[float]]] = {rows: {kn: [] for kn in ks} for rows in rows_list}
        for rows in rows_list:
            for fn, _, dt in ks.values():
                fn(xs[rows][dt])  # warm-up
        for _ in range(rounds):
            for rows in rows_list:
                for kn, (fn, _, dt) in ks.items():
                    x = xs[rows][dt]
                    t0 = clock()
                    fn(x)
                    samples[rows][kn].append(clock() - t0)
        times[name] = {}
        for rows in rows_list:
            times[name][rows] = {kn: statistics.median(s) * 1e6 for kn, s in samples[rows].items()}
            best = min(times[name][rows], key=times[name][rows].__getitem__)
            cells = "  ".join(f"{kn} {us:8.0f}" for kn, us in times[name][rows].items())
            print(f"{name:<8} rows {rows:>3}: {cells}  (us; fastest {best})", flush=True)

    # Per rows: a whole decoder layer (its four matrices) with each kernel, and the fastest.
    layer = [m for m in MATRICES if m != "lm_head" and m in times]
    per_rows: dict[int, dict[str, Any]] = {}
    for rows in rows_list:
        r: dict[str, Any] = {}
        if layer:
            r["layer_us"] = {kn: sum(times[m][rows][kn] for m in layer) for kn in times[layer[0]][rows]}
            r["fastest_layer_kernel"] = min(r["layer_us"], key=r["layer_us"].__getitem__)
        if "lm_head" in times:
            r["lm_head_us"] = times["lm_head"][rows]
            r["fastest_lm_head_kernel"] = min(r["lm_head_us"], key=r["lm_head_us"].__getitem__)
        per_rows[rows] = r
    # Where each weight-only kernel stops beating each dense one (what int4.MAX_ROWS and the int8
    # head's cutoffs are chosen from: bf16 where the CPU has native bf16, else fp32): the largest
    # row count up to which it wins at every count.
    crossover: dict[str, dict[str, dict[str, int]]] = {dense: {} for dense in DENSE}
    for name, by_rows in times.items():
        for dense in DENSE:
            for kn in ("int4pack", "int8_onednn", "int8_fused", "bf16_fused"):
                if kn in ks and dense in ks:
                    last = 0
                    for rows in rows_list:
                        if by_rows[rows][kn] >= by_rows[rows][dense]:
                            break
                        last = rows
                    crossover[dense].setdefault(name, {})[kn] = last
    if layer and all(("int4pack" in ks, "bf16" in ks)):
        wins_layer = [
            rows for rows in rows_list if per_rows[rows]["layer_us"]["int4pack"] < per_rows[rows]["layer_us"]["bf16"]
        ]
        print(f"int4pack beats bf16 for a whole layer at rows {wins_layer}")
    for dense, by_name in crossover.items():
        for name, c in by_name.items():
            print(f"{name:<8} beats dense {dense} up to rows: " + ", ".join(f"{kn} {v}" for kn, v in c.items()))
    out = {
        "benchmark": "cpu_linear_kernels",
        "machine": machine_info(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "threads": args.threads,
        "quick": args.quick,
        "matrices": MATRICES,
        "weight_bytes": bytes_read,
        "median_us": times,
        "per_rows": per_rows,
        "clock": "thread_time" if args.threads == 1 else "perf_counter",
        "beats_bf16_up_to_rows": crossover["bf16"],
        "beats_fp32_up_to_rows": crossover["fp32"],
        "beats_fp32_widened_up_to_rows": crossover["fp32_widened"],
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "default"),
    }
    write_results(args.output, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
