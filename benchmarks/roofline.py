"""How close the CPU decode step is to what this machine allows, per mode, offline (no server).

Measured in one run, on the same machine, with the engine's thread count:
- memory bandwidth: the best of N full reads (torch sum) of a >= 1 GiB float32 tensor, and of
  N copies (read + write) of it;
- GEMM peak: the best FLOP/s of square float32 and bfloat16 matmuls at sizes that reach it;
- per mode (benchmarks/perplexity.py's: fp32, bf16, int4, and each with --compile-decode), through the engine's own
  ModelRunner.forward + LM head + argmax on a paged KV cache:
  - the single-stream decode step (batch 1, --context tokens of context):
    roofline ratio = (bytes the step must read: the weights it multiplies by + the K/V it
    attends over) / read bandwidth, divided by the measured step time (1.0 = at the roofline);
  - the batch-64 decode step: achieved FLOP/s (2 x multiply-adds of the matmuls and attention)
    against the measured GEMM peak of the mode's compute dtype;
  - start-up: engine construction to first token in a fresh subprocess, cold (empty weight and
    compile caches) and warm (the same caches again).
The modes' steps are interleaved round by round and the medians reported, since the machine is
shared. Writes benchmarks/results/roofline.json with machine_info.

    .venv/bin/python benchmarks/roofline.py                       # full run (a few minutes)
    .venv/bin/python benchmarks/roofline.py --quick --modes fp32  # smoke check
    .venv/bin/python benchmarks/roofline.py --model DIR --modes default default-eager  # another checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from machine_info import machine_info, write_results  # noqa: E402
from perplexity import MODES as DENSE_MODES  # noqa: E402

from services.engine_core.attention.base import AttentionMetadata  # noqa: E402
from services.engine_core.fused_cpu import extension as fused_extension  # noqa: E402
from services.engine_core.model_runner import ModelRunner  # noqa: E402
from services.engine_core.models.llama import CausalLM  # noqa: E402
from shared.config import EngineConfig  # noqa: E402

RESULTS = os.path.join(HERE, "results", "roofline.json")
MAX_NUM_SEQS = 128  # the server's default: the compiled modes compile its whole batch-size ladder
# perplexity.py's modes, each also with --compile-decode (which changes decode steps only).
MODES = {
    **DENSE_MODES,
    **{f"{m}-compiled": ({**o, "compile_decode": True}, rows) for m, (o, rows) in DENSE_MODES.items()},
}


def best_time(fn: Callable[[], object], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memory_bandwidth(gib: float, reps: int) -> dict[str, float]:
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    y = torch.empty_like(x)
    nbytes = x.numel() * 4
    read = best_time(lambda: x.sum(), reps)
    copy = best_time(lambda: y.copy_(x), reps)
    return {"bytes": nbytes, "read_GBps": nbytes / read / 1e9, "copy_GBps": 2 * nbytes / copy / 1e9}


def gemm_peak(sizes: list[int], reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dtype in (torch.float32, torch.bfloat16):
        per_size = {}
        for n in sizes:
            a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
            per_size[n] = 2 * n**3 / best_time(lambda a=a, b=b: a @ b, reps) / 1e9
        name = str(dtype).removeprefix("torch.")
        out[name] = {"GFLOPs_by_size": per_size, "peak_GFLOPs": max(per_size.values())}
    return out


def decode_metadata(batch: int, context: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A pure-decode step of `batch` requests, each `context` tokens in (on its own blocks)."""
    seq = context + 1
    blocks = -(-seq // block_size)
    table = torch.arange(batch * blocks, dtype=torch.int32).view(batch, blocks)
    slots = table[:, context // block_size].long() * block_size + context % block_size
    md = AttentionMetadata(
        num_reqs=batch,
        num_tokens=batch,
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32),
        seq_lens=torch.full((batch,), seq, dtype=torch.int32),
        block_tables=table,
        slot_mapping=slots,
        max_query_len=1,
        max_seq_len=seq,
        query_lens_cpu=[1] * batch,
        seq_lens_cpu=[seq] * batch,
    )
    ids = torch.randint(0, 1000, (batch,))
    return ids, torch.full((batch,), context, dtype=torch.long), md


@torch.inference_mode()
def decode_step(runner: ModelRunner, ids: torch.Tensor, pos: torch.Tensor, md: AttentionMetadata) -> list[int]:
    hidden = runner.forward(ids, pos, md)
    return runner.model.compute_logits(hidden).argmax(-1).tolist()


_INT4_MATRICES = frozenset({"qkv_weight", "o_weight", "gate_up_weight", "down_weight"})


def weight_bytes_read(model: CausalLM, rows: int) -> int:
    """Bytes of the matrices a step of `rows` rows multiplies by (int4 copies where the step
    uses them), norms included; the embedding contributes only the rows it gathers."""
    total = 0
    for layer in model.layers:
        q4 = layer.int4 if rows <= layer.int4_max_rows else None
        for name, tensor in layer.named_parameters():
            if q4 is None or name not in _INT4_MATRICES:
                total += tensor.numel() * tensor.element_size()
        if q4 is not None:
            total += sum(w.nbytes for w in q4)
    head = model.embed if model.lm_head is None else model.lm_head
    head_q = model.lm_head_quantized if rows <= model.lm_head_max_rows else None
    total += head.nbytes if head_q is None else head_q.nbytes
    total += model.norm.nbytes
    total += rows * model.embed.shape[1] * model.embed.element_size()
    return total


def kv_bytes_read(runner: ModelRunner, batch: int, context: int) -> int:
    mc = runner.model_config
    elem = torch.empty((), dtype=runner.dtype).element_size()
    return 2 * mc.num_layers * batch * (context + 1) * mc.num_kv_heads * mc.head_dim * elem


def step_flops(runner: ModelRunner, batch: int, context: int) -> float:
    """2 x multiply-adds of the step's matmuls (layers + LM head) and attention (QK and PV)."""
    mc = runner.model_config
    d = mc.head_dim
    per_layer = mc.hidden_size * ((mc.num_heads + 2 * mc.num_kv_heads) * d + mc.num_heads * d)
    per_layer += 3 * mc.hidden_size * mc.intermediate_size
    per_layer += 2 * mc.num_heads * d * (context + 1)
    return 2.0 * batch * (mc.num_layers * per_layer + mc.vocab_size * mc.hidden_size)


def engine_config(mode: str, threads: int, model: str | None, **extra: Any) -> EngineConfig:
    """model: a checkpoint path or name; None: the bundled model."""
    overrides, _ = MODES[mode]
    if model is not None:
        extra["model"] = model
    return EngineConfig(num_threads=threads, max_num_seqs=MAX_NUM_SEQS, **{**overrides, **extra})


def startup_child(mode: str, threads: int, model: str | None, cache_dir: str) -> None:
    """Run in a subprocess: construction to first token, printed as JSON on the last line."""
    # Only cache_dir counts as built: a cold start builds the fused decode kernels too.
    fused_extension.DEFAULT_CACHE_DIR = cache_dir
    t0 = time.perf_counter()
    runner = ModelRunner(engine_config(mode, threads, model, cache_dir=cache_dir, kv_cache_bytes=64 << 20))
    t1 = time.perf_counter()
    ids, pos, md = decode_metadata(1, 0, runner.block_size)
    decode_step(runner, ids, pos, md)
    t2 = time.perf_counter()
    print(json.dumps({"construct_s": t1 - t0, "first_token_s": t2 - t1, "construct_to_first_token_s": t2 - t0}))


def startup(mode: str, threads: int, model: str | None, quick: bool) -> dict[str, Any]:
    """Cold (fresh weight and Inductor caches) then warm (the same caches), each a new process."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="novainfer-roofline-") as tmp:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(tmp, "inductor")}
        for run in ("cold", "warm"):
            cmd = [sys.executable, __file__, "--startup-child", mode, "--threads", str(threads), "--cache-dir", tmp]
            cmd += ["--quick"] if quick else []
            cmd += ["--model", model] if model is not None else []
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if p.returncode != 0:
                raise RuntimeError(f"start-up of {mode} failed: {p.stderr[-2000:]}")
            out[run] = {**json.loads(p.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - t0}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", help="a checkpoint (GGUF file, Hugging Face directory) or config name; default: bundled")
    p.add_argument("--context", type=int, default=512, help="tokens of context of every decode step")
    p.add_argument("--batch", type=int, default=64, help="the large decode batch")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds over the modes")
    p.add_argument("--steps", type=int, default=10, help="decode steps per mode per round")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke check, not figures")
    p.add_argument("--no-startup", action="store_true")
    p.add_argument("--output", default=RESULTS)
    p.add_argument("--startup-child", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        global MAX_NUM_SEQS
        MAX_NUM_SEQS = 8
    if args.startup_child:
        startup_child(args.startup_child, args.threads, args.model, args.cache_dir)
        return 0
    if args.quick:
        args.context, args.batch, args.rounds, args.steps = 64, 8, 2, 2

    out: dict[str, Any] = {
        "benchmark": "roofline",
        "machine": machine_info(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "threads": args.threads,
        "model": args.model or "bundled",
        "context": args.context,
        "batch": args.batch,
        "quick": args.quick,
    }
    out["memory_bandwidth"] = bw = memory_bandwidth(0.25 if args.quick else 1.0, 2 if args.quick else 10)
    print(f"memory: read {bw['read_GBps']:.1f} GB/s, copy {bw['copy_GBps']:.1f} GB/s", flush=True)
    out["gemm_peak"] = peak = gemm_peak([256, 512] if args.quick else [1024, 2048, 3072], 2 if args.quick else 5)
    print(", ".join(f"{k} GEMM peak {v['peak_GFLOPs']:.0f} GFLOP/s" for k, v in peak.items()), flush=True)

    runners: dict[str, ModelRunner] = {}
    for mode in args.modes:
        t0 = time.perf_counter()
        runners[mode] = runner = ModelRunner(engine_config(mode, args.threads, args.model, kv_cache_bytes=64 << 20))
        # A KV cache just large enough for the large batch, each request on its own blocks.
        blocks = args.batch * -(-(args.context + 1) // runner.block_size)
        runner.kv_caches, runner.num_blocks = runner._allocate_kv_cache(blocks), blocks
        print(f"{mode}: engine built in {time.perf_counter() - t0:.1f}s", flush=True)

    steps: dict[tuple[str, int], list[float]] = {(m, b): [] for m in args.modes for b in (1, args.batch)}
    inputs = {b: decode_metadata(b, args.context, runners[args.modes[0]].block_size) for b in (1, args.batch)}
    for mode in args.modes:  # warm-up (and any lazy compilation) outside the timed rounds
        for b in (1, args.batch):
            decode_step(runners[mode], *inputs[b])
    for _ in range(args.rounds):
        for mode in args.modes:
            for b in (1, args.batch):
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    decode_step(runners[mode], *inputs[b])
                    steps[(mode, b)].append(time.perf_counter() - t0)

    out["modes"] = {}
    for mode in args.modes:
        runner = runners[mode]
        t1 = statistics.median(steps[(mode, 1)])
        tb = statistics.median(steps[(mode, args.batch)])
        w1 = weight_bytes_read(runner.model, 1)
        kv1 = kv_bytes_read(runner, 1, args.context)
        ideal = (w1 + kv1) / (bw["read_GBps"] * 1e9)
        compute = "bfloat16" if runner.dtype == torch.bfloat16 else "float32"
        flops = step_flops(runner, args.batch, args.context)
        r: dict[str, Any] = {
            "config": MODES[mode][0],
            "run_mode": runner.mode,
            "single_stream": {
                "step_ms_median": t1 * 1e3,
                "step_ms_min": min(steps[(mode, 1)]) * 1e3,
                "weight_bytes_read": w1,
                "kv_bytes_read": kv1,
                "roofline_ms": ideal * 1e3,
                "roofline_ratio": ideal / t1,
            },
            f"batch_{args.batch}": {
                "step_ms_median": tb * 1e3,
                "tokens_per_s": args.batch / tb,
                "GFLOPs_achieved": flops / tb / 1e9,
                "gemm_peak_dtype": compute,
                "fraction_of_gemm_peak": flops / tb / 1e9 / peak[compute]["peak_GFLOPs"],
            },
        }
        print(
            f"{mode}: batch 1 {t1 * 1e3:.2f} ms (roofline {ideal * 1e3:.2f} ms, ratio {ideal / t1:.2f}); "
            f"batch {args.batch} {tb * 1e3:.1f} ms, {flops / tb / 1e9:.0f} GFLOP/s "
            f"({r[f'batch_{args.batch}']['fraction_of_gemm_peak']:.0%} of {compute} peak)",
            flush=True,
        )
        out["modes"][mode] = r
    runners.clear()
    if not args.no_startup:
        for mode in args.modes:
            out["modes"][mode]["startup"] = s = startup(mode, args.threads, args.model, args.quick)
            print(
                f"{mode}: start-up to first token cold {s['cold']['construct_to_first_token_s']:.1f}s, "
                f"warm {s['warm']['construct_to_first_token_s']:.1f}s",
                flush=True,
            )
    write_results(args.output, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
