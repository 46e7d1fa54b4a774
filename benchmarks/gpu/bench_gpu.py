"""The GPU path checked and timed in one call (issue 4).

Sections, each in its own try/except so one failure still records the others:

  correctness        the Triton kernels in bf16 against the torch reference on the GPU (Triton's
                     interpreter computes bf16 tl.dot wrongly, so only a GPU can check this):
                     ‖out − ref‖ / ‖ref‖ for decode, mixed and split-KV batches.
  bandwidth          device-to-device copy bandwidth: dst.copy_(src) of 1 GiB of bf16.
  decode_attention   bytes of K/V read over kernel time, as a fraction of the copy bandwidth
                     (target ≥ 0.70 at batch 64 × context 2048, Qwen3-0.6B shapes).
  prefill_attention  our kernel's speed against torch SDPA (flash, is_causal) on the same
                     tokens laid out contiguously (target ≥ 0.80 at 8 × 1024 tokens).
  decode_step        a pure-decode engine step of the whole model against its roofline
                     ((weight bytes + K/V bytes) / copy bandwidth; target ≥ 0.60 at batch ≥ 64
                     for Qwen3-0.6B and Qwen2.5-1.5B, random weights), CUDA graphs and eager.
  e2e                nano-vllm's offline workload (Qwen3-0.6B shape, 256 sequences, input and
                     output lengths uniform in [100, 1024], ignore_eos, greedy): output tok/s,
                     against transformers on the same GPU (target ≥ 3x).

Writes benchmarks/results/gpu.json (rewritten after every section, so a run cut short keeps what
it measured) and prints a markdown table. Fits one 10-minute call on an H100, model inits
included; --sections picks a subset.

    python benchmarks/gpu/bench_gpu.py [--sections decode_attention,e2e] [--out PATH]
    python benchmarks/gpu/bench_gpu.py --smoke   # every section with tiny shapes; on a CPU the
                                                 # kernels run in Triton's interpreter (CI)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

# Triton reads TRITON_INTERPRET when a module defining a kernel is imported: settle it before any
# project module is imported (they are imported inside the sections).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Run as a script (python benchmarks/gpu/bench_gpu.py): the project's packages live under the repo
# root, the sections in this directory's sibling modules.
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from attention import section_correctness, section_decode_attention, section_prefill_attention  # noqa: E402
from bandwidth import section_bandwidth  # noqa: E402
from common import free_device_memory  # noqa: E402
from decode_step import section_decode_step  # noqa: E402
from e2e import section_e2e  # noqa: E402
from plan import Plan, full_plan, smoke_plan  # noqa: E402
from report import header, table, write  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "gpu.json")
# In the order they run: bandwidth before the sections whose ratios divide by it.
SECTIONS: dict[str, Callable[[Plan, dict[str, Any]], dict[str, Any]]] = {
    "correctness": section_correctness,
    "bandwidth": section_bandwidth,
    "decode_attention": section_decode_attention,
    "prefill_attention": section_prefill_attention,
    "decode_step": section_decode_step,
    "e2e": section_e2e,
}
# Sections whose ratios divide by the copy bandwidth: it is measured for them when not selected.
NEEDS_BANDWIDTH = ("decode_attention", "decode_step")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    ap.add_argument("--out", default=None, help=f"JSON path (default {RESULTS}; with --smoke a temp file)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, every section, CPU if there is no GPU")
    ap.add_argument(
        "--hf-mode",
        choices=("auto", "continuous", "static"),
        default="auto",
        help="transformers' side of e2e: continuous batching if it has it (auto), or force one",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=540.0,
        help="wall-clock budget of the whole run; e2e fits its two halves in what is left",
    )
    args = ap.parse_args()
    start = time.perf_counter()

    selected = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in selected if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.smoke:
        print("no CUDA device: the full shapes need a GPU; use --smoke for the CPU check", file=sys.stderr)
        return 2
    plan = smoke_plan("cuda" if on_gpu else "cpu") if args.smoke else full_plan()
    plan.hf_mode = args.hf_mode
    out = args.out or (
        os.path.join(tempfile.gettempdir(), f"bench_gpu_smoke_{os.getpid()}.json") if args.smoke else RESULTS
    )
    if any(s in selected for s in NEEDS_BANDWIDTH) and "bandwidth" not in selected:
        selected.insert(0, "bandwidth")
    selected = [s for s in SECTIONS if s in selected]  # bandwidth before the sections using it

    doc: dict[str, Any] = {**header(plan), "sections": {}, "targets": []}
    ctx: dict[str, Any] = {"deadline": start + args.budget_s}
    for name in selected:
        t0 = time.perf_counter()
        print(f"[{t0 - start:6.1f}s] {name} ...", flush=True)
        try:
            if name in NEEDS_BANDWIDTH and "copy_bw" not in ctx:
                raise RuntimeError("no copy bandwidth: the bandwidth section failed")
            sec = SECTIONS[name](plan, ctx)
        except Exception as e:  # record it, go on with the next section
            sec = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
            print(f"  {name} failed: {sec['error']}", flush=True)
        sec["wall_s"] = time.perf_counter() - t0
        for t in sec.pop("targets", []):
            doc["targets"].append({"section": name, **t})
        doc["sections"][name] = sec
        doc["wall_s"] = time.perf_counter() - start
        free_device_memory()
        write(out, doc)
    print(table(doc))
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
