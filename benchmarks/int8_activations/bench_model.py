"""Int8-activation probe, kernel timing with the model's memory traffic: one sample is a whole pass over 30 layers'
distinct matrices (qkv, o, gate_up, down of SmolLM2-135M, ~53 MB of int4 bytes a kernel, more
than this host's 32 MB L3), as a decode step reads them, for the fused int4 kernel and for the
prototype with several plans. benchmarks/int8_activations/bench.py's per-matrix figures re-read one matrix, so its
weights come from L2/L3 there: a kernel-throughput figure, not a step's.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/int8_activations/bench_model.py --threads 2
"""

from __future__ import annotations

import argparse
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

FUSED = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
LAYERS = 30
ROWS = [1, 3, 5, 9, 17]
# (R, J, variant, prefetch): variant bit 0 = high nibbles by mask, bit 1 = bf16 scales.
PLANS = [
    (1, 4, 2, 0),
    (3, 4, 2, 0),
    (3, 4, 2, 8),
    (5, 2, 2, 8),
    (6, 2, 2, 0),
]
# The same on the interleaved layout (pack_interleaved: one sequential stream per strip).
PLANS_IL = [(1, 4, 2, 0), (3, 4, 2, 0), (3, 4, 2, 16), (6, 2, 2, 0)]
CLOCKS = {"thread": time.thread_time, "process": time.process_time, "wall": time.perf_counter}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=31)
    p.add_argument("--rows", type=int, nargs="+", default=ROWS)
    p.add_argument("--output")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    fused = extension.load(extension.DEFAULT_CACHE_DIR)
    assert fused is not None
    vnni.ext()
    torch.manual_seed(0)
    cur_w: list[tuple[torch.Tensor, torch.Tensor]] = []
    vnni_w: list[vnni.VnniWeight] = []
    vnni_il: list[vnni.VnniWeight] = []
    for _ in range(LAYERS):
        for n, k in FUSED.values():
            q4 = Int4Weight.quantize(torch.randn(n, k) * 0.05)
            cur_w.append(repack(q4))
            vnni_w.append(vnni.from_int4(q4))
            vnni_il.append(vnni.from_int4(q4, interleaved=True))
    # Inputs per (matrix, rows), shared by the layers (their values do not move the time).
    xs = {m: [torch.randn(m, k).to(torch.bfloat16) for _, k in FUSED.values()] for m in args.rows}
    nm = len(FUSED)

    def current(m: int) -> None:
        x = xs[m]
        for i, (packed, sz) in enumerate(cur_w):
            fused.int4_matmul(x[i % nm], packed, sz)

    e = vnni.ext()
    # The extension's function with each matrix's tensors, as few Python steps a call as the
    # current kernel's (VnniWeight.__call__ would add ~1 us a call, 120 calls a pass).
    vnni_args = [(w.packed, w.s, w.z, w.sz, w.n) for w in vnni_w]
    il_args = [(w.packed, w.s, w.z, w.sz, w.n) for w in vnni_il]

    def plan(R: int, J: int, v: int, pf: int, il: bool = False) -> Callable[[int], None]:
        args_ = il_args if il else vnni_args

        def run(m: int) -> None:
            x = xs[m]
            for i, (packed, s, z, sz, n) in enumerate(args_):
                e.vnni_matmul(x[i % nm], packed, s, z, sz, n, R, J, v, False, pf)

        return run

    kernels: dict[str, Callable[[int], None]] = {"current": current}
    kernels.update({f"R{R}J{J}v{v}p{pf}": plan(R, J, v, pf) for R, J, v, pf in PLANS})
    kernels.update({f"il_R{R}J{J}v{v}p{pf}": plan(R, J, v, pf, True) for R, J, v, pf in PLANS_IL})
    for m in args.rows:
        for fn in kernels.values():
            fn(m)
    samples = {(m, kn, c): [] for m in args.rows for kn in kernels for c in CLOCKS}
    t_start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for r in range(args.rounds):
        for m in args.rows:
            order = list(kernels.items())
            for kn, fn in order[:: 1 if r % 2 == 0 else -1]:
                t0 = {c: f() for c, f in CLOCKS.items()}
                fn(m)
                t1 = {c: f() for c, f in CLOCKS.items()}
                for c in CLOCKS:
                    samples[(m, kn, c)].append((t1[c] - t0[c]) * 1e3)
    t_end = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    med = {m: {kn: {c: statistics.median(samples[(m, kn, c)]) for c in CLOCKS} for kn in kernels} for m in args.rows}
    clock = "thread" if args.threads == 1 else "wall"
    print(f"{args.threads} thread(s), {clock} ms per 30-layer pass (qkv, o, gate_up, down), median of {args.rounds}")
    best = {}
    for m in args.rows:
        vn = {kn: t[clock] for kn, t in med[m].items() if kn != "current"}
        b = min(vn, key=vn.__getitem__)
        best[m] = b
        print(
            f"rows {m:>2}: current {med[m]['current'][clock]:6.2f}  best VNNI {b} {vn[b]:6.2f}  "
            f"({med[m]['current'][clock] / vn[b]:.2f}x)  all: " + " ".join(f"{kn} {t:.2f}" for kn, t in vn.items())
        )
    out = {
        "benchmark": "int8_activations_vs_int4_model_pass",
        "machine": machine_info(),
        "git_rev": vnni.git_rev(),
        "started_at": t_start,
        "ended_at": t_end,
        "threads": args.threads,
        "rounds": args.rounds,
        "clock": clock,
        "matrices": FUSED,
        "layers": LAYERS,
        "median_ms_per_pass": med,
        "best_vnni_plan": best,
    }
    path = args.output or os.path.join(RESULTS, f"bench_model_{args.threads}t.json")
    vnni.write_json(path, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
