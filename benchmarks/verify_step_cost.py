"""What verifying drafts costs in one engine step, offline, and where the cost goes.

Builds the engine's ModelRunner (the bundled SmolLM2-135M, the default CPU mode unless --exact)
and times `ModelRunner.execute` on steps of B decoding requests (--batch, e.g. 1 and 8), each
--context tokens in, where every request verifies k drafts (--drafts, e.g. 0..8: 1 + k query
rows a request; the drafts are always wrong, which costs the same as right ones). Each step is
split into its parts, timed on their own in the same round:
  prepare   ModelRunner._prepare (block tables, slots, metadata: host-side Python)
  forward   the model's forward over the B (1 + k) rows (linear layers + attention)
  linear    of that, the layers' matmuls alone, at the same row count, with the kernel the
            step runs (the fused CPU step: its own int4 kernel, fused_cpu/csrc/int4_matmul.h,
            for up to int4_max_rows requests however many drafts they verify, else, with bf16
            dense weights on a CPU without native bf16, its bf16 kernel, csrc/bf16_matmul.h,
            else the dense weights; the eager path picks by rows, models/int4.py)
  attention of that, the fused step's paged attention alone over the step's rows and the
            requests' contexts, every layer (fused steps only; 0 otherwise)
  lm_head   compute_logits over the B (1 + k) sampled rows (int8 head: models/int8.py)
  rest      execute - prepare - forward - lm_head: sampling rows, draft acceptance, logprobs
Every round times every (B, k) once and the medians are reported, since the machine is shared;
ratios are against k = 0 at the same B. --int8-head-kernels times, beside it, the same engine
with its int8 LM head on oneDNN's int8 matmul and on torch's weight-only kernel (on a CPU without
VNNI, where it runs fused_cpu/csrc/int8_matmul.h: int8_head_runners). Also reports which kernel
the step picks and whether it ran as one fused C++ call (fused_cpu/decode.py). --eager times the same engine with
--no-fused-cpu-decode beside it, every point of both in each round (on a CPU without native bf16
that is the eager float32 mode the fused default replaces; --no-native-bf16 runs that CPU's modes on
one with native bf16). At --threads 1 the
times are the thread's CPU time (time.thread_time), which a shared machine disturbs less than
wall time. Writes benchmarks/results/verify_step_cost.json with machine_info.

    .venv/bin/python benchmarks/verify_step_cost.py                            # B 1 and 8, k 0..8 (~2 min)
    .venv/bin/python benchmarks/verify_step_cost.py --quick                    # a smoke check
    .venv/bin/python benchmarks/verify_step_cost.py --batch 1 --drafts 0 8 --context 500 --threads 1 --eager
    .venv/bin/python benchmarks/verify_step_cost.py --batch 1 --drafts 0 8 --context 500 --threads 1 --int8-head-kernels
    .venv/bin/python benchmarks/verify_step_cost.py --batch 1 --drafts 0 8 --context 500 --threads 1 --eager \
        --quantization none --no-native-bf16    # a float checkpoint as on a CPU without native bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from machine_info import machine_info, write_results  # noqa: E402

from services.engine_core import run_mode  # noqa: E402
from services.engine_core.attention.base import AttentionMetadata  # noqa: E402
from services.engine_core.batch import ScheduledBatch  # noqa: E402
from services.engine_core.fused_cpu.decode import MATRICES, padded_rows  # noqa: E402
from services.engine_core.model_runner import ModelRunner  # noqa: E402
from services.engine_core.models.int8 import Int8Weight  # noqa: E402
from services.engine_core.request import Request, RequestStatus  # noqa: E402
from shared.config import EngineConfig, available_cores  # noqa: E402
from shared.protocol import SamplingParams  # noqa: E402

RESULTS = os.path.join(HERE, "results", "verify_step_cost.json")
PARTS = ("execute", "prepare", "forward", "linear", "attention", "lm_head")


def make_requests(runner: ModelRunner, batch: int, context: int, max_drafts: int) -> list[Request]:
    """`batch` decoding requests, `context` tokens each already in the cache (on blocks of their own)."""
    bs = runner.block_size
    blocks = -(-(context + max_drafts + 1) // bs)
    if batch * blocks > runner.num_blocks:
        raise SystemExit(f"{batch} x {context} tokens do not fit the KV cache ({runner.num_blocks} blocks)")
    gen = torch.Generator().manual_seed(0)
    reqs = []
    for i in range(batch):
        prompt = torch.randint(100, 40000, (context,), generator=gen).tolist()
        r = Request(f"r{i}", prompt[:-1], SamplingParams(temperature=0.0, max_tokens=10_000))
        r.append_output_token(prompt[-1])  # this step's decode row: an output token, as the engine's
        r.status = RequestStatus.RUNNING
        r.num_computed_tokens = context - 1
        r.block_table = list(range(i * blocks, (i + 1) * blocks))
        reqs.append(r)
    return reqs


def step_batch(reqs: list[Request], k: int) -> ScheduledBatch:
    # Always-wrong drafts: token 1 never follows (the sampled token is compared, not trusted).
    drafts = [[1] * k for _ in reqs]
    return ScheduledBatch(reqs, [1 + k] * len(reqs), [True] * len(reqs), spec_token_ids=drafts if k else [])


clock = time.perf_counter
"""Wall time; main() makes it the thread's CPU time at one thread."""


@torch.inference_mode()
def time_parts(runner: ModelRunner, batch: ScheduledBatch) -> dict[str, float]:
    out: dict[str, float] = {}
    t0 = clock()
    runner.execute(batch)
    out["execute"] = clock() - t0
    t0 = clock()
    ids, pos, md, sample_rows = runner._prepare(batch)
    out["prepare"] = clock() - t0
    t0 = clock()
    hidden = runner.forward(ids, pos, md)
    out["forward"] = clock() - t0
    rows = hidden.index_select(0, torch.tensor(sample_rows))
    t0 = clock()
    runner.model.compute_logits(rows, len(batch.requests))
    out["lm_head"] = clock() - t0
    x = torch.randn(ids.shape[0], runner.model_config.hidden_size, dtype=runner.dtype)
    t0 = clock()
    linear_layers(runner, x, md)
    out["linear"] = clock() - t0
    t0 = clock()
    attention_layers(runner, md)
    out["attention"] = clock() - t0
    return out


def attention_layers(runner: ModelRunner, md: AttentionMetadata) -> None:
    """The fused step's paged attention of every layer over md's rows (random queries; the
    cache as the step left it), where the step runs fused."""
    fused = runner.fused
    if fused is None or not fused.can_run(md):
        return
    mc = runner.model_config
    q = torch.randn(md.num_tokens, mc.num_heads, mc.head_dim)
    scale = mc.head_dim**-0.5
    for k_cache, v_cache in runner.kv_caches:
        fused.ext.paged_attention(q, k_cache, v_cache, md.block_tables, md.query_start_loc, md.seq_lens, scale)


def is_fused(runner: ModelRunner, md: AttentionMetadata) -> bool:
    return runner.fused is not None and runner.fused.can_run(md)


def uses_int4(runner: ModelRunner, md: AttentionMetadata) -> bool:
    """Whether the step multiplies by the layers' int4 copies (as the fused step or the eager one picks)."""
    if runner.fused is not None and runner.fused.can_run(md):
        return runner.fused.uses_int4(md)
    return runner.model.layers[0].int4_for(md.num_tokens) is not None


def linear_layers(runner: ModelRunner, x: torch.Tensor, md: AttentionMetadata) -> None:
    """The four matmuls of every layer at x's row count, with the kernel the step picks."""
    mc = runner.model_config
    heads_x = torch.empty(x.shape[0], mc.num_heads * mc.head_dim, dtype=x.dtype)
    act = torch.empty(x.shape[0], mc.intermediate_size, dtype=x.dtype)
    int4 = uses_int4(runner, md)
    fused = runner.fused
    if fused is not None and fused.can_run(md) and int4:
        for i in range(len(runner.model.layers)):
            for m, rows in zip(MATRICES, (x, heads_x, x, act), strict=True):
                fused.ext.int4_matmul(rows, *fused.int4[m][i])
        return
    for layer in runner.model.layers:
        q4 = layer.int4
        if int4 and q4 is not None:
            q4.qkv(x), q4.o(heads_x), q4.gate_up(x), q4.down(act)
            continue
        weights = (layer.qkv_weight, layer.o_weight, layer.gate_up_weight, layer.down_weight)
        for rows, w in zip((x, heads_x, x, act), weights, strict=True):
            if fused is not None and fused.can_run(md) and fused.uses_bf16_rows(md):  # bf16 weights, own kernel
                fused.ext.bf16_matmul(rows, w, True)
            elif fused is not None and fused.can_run(md):  # its dense call: fp32 weights on bf16 rows, padded
                w = w.float() if fused.widen else w
                fused.ext.dense_matmul(rows, w, padded_rows(rows.shape[0], fused.row_multiple))
            else:
                rows @ w.t()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--drafts", type=int, nargs="+", default=list(range(9)))
    p.add_argument(
        "--context", type=int, default=600, help="tokens each request already has (grounded prompts: 300-1100)"
    )
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the engine's, one per core)")
    p.add_argument("--exact", action="store_true", help="the exact float32 mode instead of the default")
    p.add_argument("--eager", action="store_true", help="also the mode with --no-fused-cpu-decode, alternated")
    p.add_argument(
        "--int8-head-kernels",
        action="store_true",
        help="also the default with its int8 LM head on oneDNN's int8 matmul and on torch's _weight_int8pack_mm, "
        "alternated (on a CPU without VNNI, where it runs the fused extension's kernel)",
    )
    p.add_argument("--quantization", default="auto", help="the engine's --quantization (none: a float checkpoint's)")
    p.add_argument(
        "--no-native-bf16",
        action="store_true",
        help="run the modes of a CPU without native bf16 (run_mode.cpu_has_native_bf16 patched to false in this "
        "process): on a CPU with it, that path's figures on this CPU, not an AVX2 CPU's",
    )
    p.add_argument("--quick", action="store_true", help="a smoke check, not figures")
    p.add_argument("--output", default=RESULTS)
    args = p.parse_args()
    drafts = [0, 2] if args.quick else args.drafts
    rounds = 2 if args.quick else args.rounds
    threads = args.threads or available_cores()
    global clock
    clock = time.thread_time if threads == 1 else time.perf_counter
    if args.no_native_bf16:
        run_mode.cpu_has_native_bf16 = lambda: False  # before any runner: the modes resolve by it
    config = EngineConfig(
        num_threads=threads, exact=args.exact, max_num_seqs=max(args.batch), quantization=args.quantization
    )
    runners = {"default": ModelRunner(config)}
    if args.eager:
        runners["eager"] = ModelRunner(EngineConfig(**{**_fields(config), "fused_cpu_decode": False}))
    if args.int8_head_kernels:
        runners.update(int8_head_runners(config))
    for path, runner in runners.items():
        print(f"{path}: run mode {runner.mode}, {threads} threads; int4 up to "
              f"{runner.model.layers[0].int4_max_rows} rows, quantized LM head up to {runner.model.lm_head_max_rows}",
              flush=True)  # fmt: skip
    requests = {(p, b): make_requests(r, b, args.context, max(drafts)) for p, r in runners.items() for b in args.batch}
    points = [(p, b, k) for p in runners for b in args.batch for k in drafts]
    samples: dict[tuple[str, int, int], dict[str, list[float]]] = {pt: {n: [] for n in PARTS} for pt in points}
    for p, b, k in points:
        time_parts(runners[p], step_batch(requests[(p, b)], k))  # warm-up
    for _ in range(rounds):
        for p, b, k in points:
            for name, s in time_parts(runners[p], step_batch(requests[(p, b)], k)).items():
                samples[(p, b, k)][name].append(s)

    results: list[dict[str, Any]] = []
    for p, b in ((p, b) for p in runners for b in args.batch):
        runner = runners[p]
        base = statistics.median(samples[(p, b, drafts[0])]["execute"])
        print(f"{p} ({runner.mode}), batch {b}: ms (x the step without drafts)")
        for k in drafts:
            med = {n: statistics.median(v) * 1e3 for n, v in samples[(p, b, k)].items()}
            med["rest"] = med["execute"] - med["prepare"] - med["forward"] - med["lm_head"]
            rows = b * (1 + k)
            md = runner._prepare(step_batch(requests[(p, b)], k))[2]
            entry = {
                "path": p,
                "run_mode": runner.mode,
                "batch": b,
                "drafts": k,
                "rows": rows,
                "fused": is_fused(runner, md),
                "int4_layers": uses_int4(runner, md),
                "bf16_kernel_layers": runner.fused is not None
                and is_fused(runner, md)
                and runner.fused.uses_bf16_rows(md),
                "quantized_lm_head": runner.model.lm_head_quantized is not None
                and b <= runner.model.lm_head_max_rows,  # chosen by the rows without drafts
                "median_ms": med,
                "x_no_drafts": med["execute"] / (base * 1e3),
            }
            results.append(entry)
            cells = "  ".join(f"{n} {v:6.1f}" for n, v in med.items())
            kernel = ("int4" if entry["int4_layers"] else "bf16" if entry["bf16_kernel_layers"] else "dense") + (
                " fused" if entry["fused"] else ""
            )
            print(f"  k {k} ({rows:>3} rows, {kernel:>10}): {cells}  = {entry['x_no_drafts']:.2f}x", flush=True)
    out = {
        "benchmark": "verify_step_cost",
        "machine": machine_info(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_mode": runners["default"].mode,
        "threads": threads,
        "clock": "thread_time" if threads == 1 else "perf_counter",
        "context": args.context,
        "rounds": rounds,
        "quick": args.quick,
        "no_native_bf16_forced": args.no_native_bf16,
        "int4_max_rows": runners["default"].model.layers[0].int4_max_rows,
        "lm_head_max_rows": runners["default"].model.lm_head_max_rows,
        "points": results,
    }
    write_results(args.output, out)
    return 0


def int8_head_runners(config: EngineConfig) -> dict[str, ModelRunner]:
    """Engines whose int8 LM head runs oneDNN's int8 matmul (the start-up check bypassed: what a CPU
    without VNNI ran before the check caught its saturation for every model) and torch's weight-only
    kernel (the fallback without a compiler), for a CPU where it runs the fused extension's."""
    runners = {"int8-onednn": ModelRunner(config), "int8-weight-only": ModelRunner(config)}
    for name, runner in runners.items():
        head = runner.model.lm_head_quantized
        if not isinstance(head, Int8Weight) or head.uses_onednn:
            raise SystemExit("--int8-head-kernels: this engine's LM head does not run the fused int8 kernel")
        head.use_kernel(None)
        if name == "int8-onednn":
            head._packed = torch.ops.onednn.qlinear_prepack(head.values, None)
        runner.model.lm_head_max_rows = 16  # the weight-only kernel's cutoff, past the steps timed here
    return runners


def _fields(config: EngineConfig) -> dict:
    return {f: getattr(config, f) for f in config.__struct_fields__}


if __name__ == "__main__":
    sys.exit(main())
