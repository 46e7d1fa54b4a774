"""Int8-activation probe, kernel timing: the prototype int8 x int4 VNNI matmul (vnni_matmul.cpp) against the
fused step's int4 kernel (csrc/int4_matmul.h), on SmolLM2-135M's matrices, as
benchmarks/int4_matmul_kernel.py times (every round times every (matrix, rows, kernel) once,
interleaved, alternate rounds reversed; medians over rounds). Per sample: the calling thread's CPU
time, the process's CPU time and wall time.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/int8_activations/bench.py --threads 1
    PYTHONPATH=$PWD .venv/bin/python benchmarks/int8_activations/bench.py --threads 2
    # the (R, J) grid of the prototype:
    PYTHONPATH=$PWD .venv/bin/python benchmarks/int8_activations/bench.py --threads 1 --plans
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(os.path.dirname(HERE), "results", "int8_activations_20261203")
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import vnni  # noqa: E402
from machine_info import machine_info  # noqa: E402

from services.engine_core.fused_cpu import extension  # noqa: E402
from services.engine_core.fused_cpu.int4_matmul import repack  # noqa: E402
from services.engine_core.models.int4 import Int4Weight  # noqa: E402

# name -> (N, K). The task's separate matrices and the engine's fused ones (the fused step calls
# qkv and gate_up as one matrix each).
SEPARATE = {
    "q": (576, 576),
    "k": (192, 576),
    "v": (192, 576),
    "o": (576, 576),
    "gate": (1536, 576),
    "up": (1536, 576),
    "down": (576, 1536),
}
FUSED = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
ROWS = [1, 3, 5, 9, 17]
PLANS = [(1, 4), (2, 4), (3, 4), (1, 2), (2, 2), (3, 2), (4, 2), (5, 2), (6, 2), (4, 1), (8, 1), (12, 1)]
PREFETCH = (0, 8)  # chunks (64-byte lines) ahead; 0: none
VARIANTS = {0: "shift_f32sz", 1: "mask_f32sz", 2: "shift_bf16sz", 3: "mask_bf16sz"}
LAYERS = 30
CLOCKS = {"thread": time.thread_time, "process": time.process_time, "wall": time.perf_counter}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=61)
    p.add_argument("--rows", type=int, nargs="+", default=ROWS)
    p.add_argument("--plans", action="store_true", help="time the prototype's (R, J) grid on the fused shapes")
    p.add_argument("--plan", type=int, nargs=4, metavar=("R", "J", "VARIANT", "PREFETCH"), help="the prototype's plan")
    p.add_argument("--output")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    fused = extension.load(extension.DEFAULT_CACHE_DIR)
    assert fused is not None
    vnni.ext()
    main_clock = "thread" if args.threads == 1 else "wall"
    # The prototype's plan per row count: the fastest (R, J, variant) of this thread count's
    # --plans run on the fused layer, where there is one (else its built-in default).
    best: dict[int, tuple[int, int, int, int]] = {m: (0, 0, -1, 0) for m in args.rows}
    grid = os.path.join(RESULTS, f"bench_plans_{args.threads}t.json")
    if args.plan:
        best = {m: tuple(args.plan) for m in args.rows}  # type: ignore[misc]
    elif not args.plans and os.path.exists(grid):
        with open(grid) as f:
            layer_us = json.load(f)["layer_us"]["fused"]
        for m in args.rows:
            if str(m) in layer_us:
                times = {kn: t[main_clock] for kn, t in layer_us[str(m)].items()}
                kn = min(times, key=times.__getitem__)
                R, rest = kn[1:].split("J")
                J, rest = rest.split("v")
                v, pf = rest.split("p")
                best[m] = (int(R), int(J), int(v), int(pf))
        print("plans (R, J, variant, prefetch) by rows:", best)
    torch.manual_seed(0)
    matrices = FUSED if args.plans else {**{f"sep_{k}": v for k, v in SEPARATE.items()}, **FUSED}
    fns: dict[str, dict[str, Callable[[torch.Tensor], torch.Tensor]]] = {}
    for name, (n, k) in matrices.items():
        q4 = Int4Weight.quantize(torch.randn(n, k) * 0.05)
        vw = vnni.from_int4(q4)
        packed, sz = repack(q4)
        if args.plans:
            fns[name] = {
                f"R{R}J{J}v{v}p{pf}": (lambda x, R=R, J=J, v=v, pf=pf, vw=vw: vw(x, R, J, v, False, pf))
                for R, J in PLANS
                for v in VARIANTS
                for pf in PREFETCH
            }
        else:
            fns[name] = {
                "current": lambda x, packed=packed, sz=sz: fused.int4_matmul(x, packed, sz),
                "vnni": lambda x, vw=vw: vw(x, *best[x.shape[0]][:3], False, best[x.shape[0]][3]),
            }
    xs = {(name, m): torch.randn(m, k).to(torch.bfloat16) for name, (_, k) in matrices.items() for m in args.rows}
    samples: dict[tuple[str, int, str, str], list[float]] = {}
    for (name, m), x in xs.items():
        for kn, fn in fns[name].items():
            for _ in range(3):
                fn(x)
            for c in CLOCKS:
                samples[(name, m, kn, c)] = []
    t_start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for r in range(args.rounds):
        for (name, m), x in xs.items():
            order = list(fns[name].items())
            for kn, fn in order[:: 1 if r % 2 == 0 else -1]:
                # An untimed call first: every timed call finds its matrix in L2/L3 alike (else the
                # first row count after a change of matrix reads it from memory and the others
                # do not): a kernel-throughput figure; bench_model.py has the step's traffic.
                fn(x)
                t0 = {c: f() for c, f in CLOCKS.items()}
                fn(x)
                t1 = {c: f() for c, f in CLOCKS.items()}
                for c in CLOCKS:
                    samples[(name, m, kn, c)].append(t1[c] - t0[c])
    t_end = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    kernels = list(next(iter(fns.values())))
    med = {
        name: {
            m: {kn: {c: statistics.median(samples[(name, m, kn, c)]) * 1e6 for c in CLOCKS} for kn in kernels}
            for m in args.rows
        }
        for name in matrices
    }
    groups = (
        {"fused": list(FUSED)} if args.plans else {"separate": [f"sep_{k}" for k in SEPARATE], "fused": list(FUSED)}
    )
    layer = {
        g: {m: {kn: {c: sum(med[n][m][kn][c] for n in names) for c in CLOCKS} for kn in kernels} for m in args.rows}
        for g, names in groups.items()
    }
    if args.plans:
        for m in args.rows:
            t = sorted((layer["fused"][m][kn][main_clock], kn) for kn in kernels)
            print(
                f"rows {m:>2}: "
                + "  ".join(f"{kn} {us:.0f}" for us, kn in t[:6])
                + f"  ... worst {t[-1][1]} {t[-1][0]:.0f} us"
            )
    for g in [] if args.plans else groups:
        print(f"== {g} layer, {main_clock} us per layer (x{LAYERS} ms in brackets)")
        print(f"{'rows':>4} " + " ".join(f"{kn:>22}" for kn in kernels))
        for m in args.rows:
            cells = [
                f"{layer[g][m][kn][main_clock]:9.1f} ({layer[g][m][kn][main_clock] * LAYERS / 1e3:6.2f} ms)"
                for kn in kernels
            ]
            print(f"{m:>4} " + " ".join(f"{c:>22}" for c in cells))
    out = {
        "benchmark": "int8_activations_vs_int4",
        "machine": machine_info(),
        "git_rev": vnni.git_rev(),
        "started_at": t_start,
        "ended_at": t_end,
        "threads": args.threads,
        "rounds": args.rounds,
        "main_clock": main_clock,
        "matrices": matrices,
        "median_us": med,
        "layer_us": layer,
        "layers": LAYERS,
        "vnni_plan_by_rows": None if args.plans else best,
        "variants": VARIANTS,
    }
    path = args.output or os.path.join(RESULTS, f"bench_{'plans_' if args.plans else ''}{args.threads}t.json")
    vnni.write_json(path, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
