"""The fused step's int4 matmul (fused_cpu/csrc/int4_matmul.h: the rows quantized to int8 per
32-input block, integer dot products with the int4 weights, row-invariant) against torch's
`_weight_int4pack_mm_for_cpu` (unpacks the weights per block of rows), dense bf16 `F.linear`
(oneDNN, AMX where the CPU has it) and the fused step's dense call on fp32 weights (MKL's sgemm:
what a CPU without native bf16 multiplies), on SmolLM2's four layer matrices, at the row counts
of decode steps (1..8 requests), of verify steps (a few requests each verifying k drafts: 9..80
rows) and, with --rows, of prefill chunks (128, 512).

Every round times every (matrix, rows, kernel) once, interleaved, and the median over rounds is
kept, because the machine is shared. At one thread the clock is the thread's CPU time (the
kernels run on the calling thread), which a busy neighbour barely moves; at more, wall time.
Writes benchmarks/results/int4_matmul_kernel.json (per matrix and per whole layer).

    .venv/bin/python benchmarks/int4_matmul_kernel.py --threads 1
    .venv/bin/python benchmarks/int4_matmul_kernel.py --threads 2 --output benchmarks/results/int4_matmul_kernel_2t.json
    .venv/bin/python benchmarks/int4_matmul_kernel.py --quick
    .venv/bin/python benchmarks/int4_matmul_kernel.py --threads 1 --baseline main --rows 1 2 4 8 9 16 33 80
    # A Zen 3 (AVX2, no native bf16) emulated on an AVX-512 CPU: AVX2 builds of every kernel
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        .venv/bin/python benchmarks/int4_matmul_kernel.py --threads 2 --rows 128 512

--baseline REF also builds the kernels of git REF's csrc/ and times them in the same rounds
("baseline_int4"), for a before/after that a shared machine's drift does not skew.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
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
KERNELS = ["novainfer_int4", "torch_int4pack", "bf16", "fp32"]


def kernels(weight: torch.Tensor, ext: Any, base: Any) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    q4 = Int4Weight.quantize(weight)
    packed, scales_zeros = repack(q4)
    dense = weight.to(torch.bfloat16)
    dense32 = dense.float()
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "novainfer_int4": lambda x: ext.int4_matmul(x, packed, scales_zeros),
        "torch_int4pack": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4.packed, GROUP, q4.scales_zeros),
        "bf16": lambda x: F.linear(x, dense),
        # The fused step's dense call on fp32 weights (a CPU without native bf16): bf16 rows to
        # fp32, MKL's sgemm, the product rounded to bf16 (csrc/dense_matmul.h).
        "fp32": lambda x: ext.dense_matmul(x, dense32, x.shape[0]),
    }
    if base is not None:
        fns["baseline_int4"] = lambda x: base.int4_matmul(x, packed, scales_zeros)
    return fns


def baseline_extension(ref: str, workdir: str) -> Any:
    """The fused kernels built from git ref's csrc/ (extracted into workdir)."""
    root = os.path.dirname(HERE)
    csrc = "services/engine_core/fused_cpu/csrc"
    archive = subprocess.run(["git", "-C", root, "archive", ref, csrc], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", workdir], input=archive, check=True)
    return extension.load(extension.DEFAULT_CACHE_DIR, csrc=os.path.join(workdir, csrc))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=31)
    p.add_argument("--rows", type=int, nargs="+", default=ROWS)
    p.add_argument("--quick", action="store_true", help="a smoke check, not figures")
    p.add_argument("--baseline", metavar="REF", help="also time git REF's kernels (before/after, alternated)")
    p.add_argument("--output", default=RESULTS)
    args = p.parse_args()
    ext = extension.load(extension.DEFAULT_CACHE_DIR)
    workdir = tempfile.TemporaryDirectory()
    base = baseline_extension(args.baseline, workdir.name) if args.baseline else None
    if ext is None or (args.baseline and base is None):
        print("the fused CPU kernels did not build here (see the warning)", file=sys.stderr)
        return 1
    kernel_names = KERNELS + (["baseline_int4"] if base is not None else [])
    torch.set_num_threads(args.threads)
    rows_list = [1, 9, 72] if args.quick else args.rows
    rounds = 3 if args.quick else args.rounds
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    torch.manual_seed(0)

    fns = {name: kernels(torch.randn(n, k) * 0.05, ext, base) for name, (n, k) in MATRICES.items()}
    xs = {
        (name, rows): torch.randn(rows, k).to(torch.bfloat16) for name, (_, k) in MATRICES.items() for rows in rows_list
    }
    samples: dict[tuple[str, int, str], list[float]] = {}
    for (name, rows), x in xs.items():
        for kn, fn in fns[name].items():
            fn(x)  # warm-up
            samples[(name, rows, kn)] = []
    for r in range(rounds):
        for (name, rows), x in xs.items():
            # Every other round in reverse, so that no kernel always follows the same one (the
            # dense one's weights evict the int4 ones' from the caches).
            order = list(fns[name].items())
            for kn, fn in order[:: 1 if r % 2 == 0 else -1]:
                t0 = clock()
                fn(x)
                samples[(name, rows, kn)].append(clock() - t0)

    median_us = {
        name: {
            rows: {kn: statistics.median(samples[(name, rows, kn)]) * 1e6 for kn in kernel_names} for rows in rows_list
        }
        for name in MATRICES
    }
    layer_us = {rows: {kn: sum(median_us[m][rows][kn] for m in MATRICES) for kn in kernel_names} for rows in rows_list}
    print(f"{'rows':>4}  " + "  ".join(f"{kn:>15}" for kn in kernel_names) + "   (a layer's four matrices, us)")
    for rows in rows_list:
        t = layer_us[rows]
        line = f"   torch/novainfer {t['torch_int4pack'] / t['novainfer_int4']:.2f}x"
        if base is not None:
            line += f"  novainfer/baseline {t['novainfer_int4'] / t['baseline_int4']:.3f}"
        print(f"{rows:>4}  " + "  ".join(f"{t[kn]:15.0f}" for kn in kernel_names) + line)
    out = {
        "benchmark": "int4_matmul_kernel",
        "machine": machine_info(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "threads": args.threads,
        "clock": "thread_time" if args.threads == 1 else "perf_counter",
        "rounds": rounds,
        "quick": args.quick,
        "baseline": args.baseline,
        "matrices": MATRICES,
        "median_us": median_us,
        "layer_us": layer_us,
        "torch_over_novainfer_layer": {
            rows: layer_us[rows]["torch_int4pack"] / layer_us[rows]["novainfer_int4"] for rows in rows_list
        },
    }
    if base is not None:
        out["novainfer_over_baseline_layer"] = {
            rows: layer_us[rows]["novainfer_int4"] / layer_us[rows]["baseline_int4"] for rows in rows_list
        }
    write_results(args.output, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
