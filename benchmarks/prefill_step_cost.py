"""What a prompt's prefill costs in the fused CPU step against the eager path, offline.

Builds the engine's ModelRunner twice (the bundled SmolLM2-135M in the CPU default: with the
fused C++ step, and with --no-fused-cpu-decode, the eager path, which on a CPU without native
bf16 is the float32 mode the fused `+fp32-dense` default replaces) and times ModelRunner.execute:
  prefill   a --prompt-tokens prompt (e.g. 512 and 2048), in chunks of --chunk tokens (the
            scheduler's --max-num-batched-tokens), from the first chunk to its first token: the
            model part of TTFT
  mixed     one step of --batch decoding requests (--context tokens in, --drafts drafts each)
            beside a --chunk-token prefill chunk, and the same step without the chunk
  attention one layer's attention of a --prompt-tokens prompt in one chunk: the fused step's
            prefill kernel (csrc/prefill_attention.h), the per-head paged kernel prefill rows
            took before it (csrc/attention.h, still the decode rows'), and torch SDPA in bf16
            (the eager path's attention), on the same random q/K/V
The fused step multiplies prefill rows by the int4 copies without AMX (FusedDecode.prefill_int4),
else by the dense weights in calls of exactly prefill_block rows (fused_cpu/decode.py;
position-invariant, so a prompt's K/V do not depend on its chunking): --prefill-block times other
sizes of those dense calls (0: all rows in one call, the floor, not invariant; with prefill_int4
the size is unused, the path still named fused/<size>); its prefill rows' attention is
csrc/prefill_attention.h's kernel. The engine runs every step fused,
however long its prefill chunks. Every round times every point once, the paths alternated, and
medians are reported (the machine is shared); at --threads 1 the times are the thread's CPU time
(time.thread_time: the fused call and oneDNN then run on the calling thread), which a busy
machine disturbs less than wall time. Writes benchmarks/results/prefill_step_cost.json with
machine_info.

    .venv/bin/python benchmarks/prefill_step_cost.py                # 512/2048 tokens, chunk 1024 (~3 min)
    .venv/bin/python benchmarks/prefill_step_cost.py --quick        # a smoke check
    .venv/bin/python benchmarks/prefill_step_cost.py --threads 1 --prompt-tokens 256 512 2048 4096
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from machine_info import machine_info, write_results  # noqa: E402

from services.engine_core.batch import ScheduledBatch  # noqa: E402
from services.engine_core.model_runner import ModelRunner  # noqa: E402
from services.engine_core.request import Request, RequestStatus  # noqa: E402
from shared.config import EngineConfig, available_cores  # noqa: E402
from shared.protocol import SamplingParams  # noqa: E402

RESULTS = os.path.join(HERE, "results", "prefill_step_cost.json")


class Blocks:
    """Hands out consecutive KV blocks to the benchmark's requests."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner, self.next = runner, 0

    def take(self, tokens: int) -> list[int]:
        n = -(-tokens // self.runner.block_size)
        if self.next + n > self.runner.num_blocks:
            raise SystemExit(f"the KV cache ({self.runner.num_blocks} blocks) is too small: raise --kv-cache-mib")
        self.next += n
        return list(range(self.next - n, self.next))


def request(rid: str, prompt: list[int], blocks: list[int], decoding: bool = False) -> Request:
    """A running request on the given blocks: a prompt to prefill, or (decoding) one whose last
    token is an output token, the rest in the cache."""
    r = Request(rid, prompt[:-1] if decoding else prompt, SamplingParams(temperature=0.0, max_tokens=10_000))
    if decoding:
        r.append_output_token(prompt[-1])
        r.num_computed_tokens = len(prompt) - 1
    r.status = RequestStatus.RUNNING
    r.block_table = blocks
    return r


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(100, 40000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


clock = time.perf_counter
"""Wall time; main() makes it the thread's CPU time at one thread."""


@torch.inference_mode()
def time_prefill(runner: ModelRunner, req: Request, chunk: int) -> float:
    """Seconds from the prompt's first chunk to its first token."""
    n = req.num_prompt_tokens
    t0 = clock()
    for start in range(0, n, chunk):
        req.num_computed_tokens = start
        m = min(chunk, n - start)
        runner.execute(ScheduledBatch([req], [m], [start + m == n]))
    return clock() - t0


@torch.inference_mode()
def time_step(runner: ModelRunner, decodes: list[Request], drafts: int, prefill: Request | None, chunk: int) -> float:
    reqs = decodes + ([prefill] if prefill is not None else [])
    n = [1 + drafts] * len(decodes) + ([chunk] if prefill is not None else [])
    spec = [[1] * drafts for _ in decodes] + ([[]] if prefill is not None else [])
    batch = ScheduledBatch(reqs, n, [True] * len(decodes) + [False] * (prefill is not None), spec_token_ids=spec)
    t0 = clock()
    runner.execute(batch)
    return clock() - t0


def attention_inputs(runner: ModelRunner, n: int) -> dict[str, Any]:
    """Random q (fp32) and a bf16 paged K/V cache of an n-token prompt, for the model's heads."""
    cfg = runner.model.cfg
    heads, n_kv, d, bs = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 16
    gen = torch.Generator().manual_seed(n)
    blocks = -(-n // bs)
    k = torch.randn(blocks, bs, n_kv, d, generator=gen).to(torch.bfloat16)
    v = torch.randn(blocks, bs, n_kv, d, generator=gen).to(torch.bfloat16)
    q = torch.randn(n, heads, d, generator=gen)
    g = heads // n_kv
    # The eager backend's layout: each KV head's query heads as one SDPA batch entry, K/V broadcast.
    kv = [x.view(-1, n_kv, d)[:n].transpose(0, 1)[:, None].expand(n_kv, g, n, d) for x in (k, v)]
    return {
        "paged": (q, k, v, torch.arange(blocks, dtype=torch.int32)[None], torch.tensor([0, n], dtype=torch.int32)),
        "lens": torch.tensor([n], dtype=torch.int32),
        "sdpa": (q.to(torch.bfloat16).transpose(0, 1).reshape(n_kv, g, n, d), *kv),
        "scale": d**-0.5,
    }


@torch.inference_mode()
def time_attention(ext: Any, inputs: dict[str, Any], kernel: str) -> float:
    t0 = clock()
    if kernel == "sdpa":
        F.scaled_dot_product_attention(*inputs["sdpa"], is_causal=True, scale=inputs["scale"])
    else:
        fn = ext.prefill_attention if kernel == "prefill" else ext.paged_attention
        fn(*inputs["paged"], inputs["lens"], inputs["scale"])
    return clock() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk (the scheduler's --max-num-batched-tokens)")
    p.add_argument("--batch", type=int, default=8, help="decoding requests of the mixed step")
    p.add_argument("--drafts", type=int, default=4, help="drafts each decoding request verifies in the mixed step")
    p.add_argument("--context", type=int, default=600)
    p.add_argument("--prefill-block", type=int, nargs="+", default=None, help="fused prefill call sizes to time")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--kv-cache-mib", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the engine's, one per core)")
    p.add_argument(
        "--dtype",
        default="auto",
        help="the engine's --dtype (auto: the default's; bfloat16 on a CPU without native bf16: the fused step "
        "on emulated bf16 matmuls, slow, for a check only)",
    )
    p.add_argument("--quantization", default="auto", help="the engine's --quantization (none: a float checkpoint's)")
    p.add_argument("--quick", action="store_true", help="a smoke check, not figures")
    p.add_argument("--output", default=RESULTS)
    args = p.parse_args()
    prompt_tokens = [min(args.prompt_tokens)] if args.quick else args.prompt_tokens
    rounds = 1 if args.quick else args.rounds
    threads = args.threads or available_cores()
    global clock
    clock = time.thread_time if threads == 1 else time.perf_counter
    base = EngineConfig(
        num_threads=threads,
        kv_cache_bytes=args.kv_cache_mib << 20,
        max_num_seqs=args.batch + 1,
        dtype=args.dtype,
        quantization=args.quantization,
    )
    runners = {
        "fused": ModelRunner(base),
        "eager": ModelRunner(EngineConfig(**{**_fields(base), "fused_cpu_decode": False})),
    }
    fused = runners["fused"].fused
    if fused is None:
        raise SystemExit("the fused CPU step is unavailable here (no C++ compiler?)")
    blocks_default = fused.prefill_block
    sizes = args.prefill_block if args.prefill_block is not None else [blocks_default]
    print(f"run mode {runners['fused'].mode}, {threads} threads; prefill calls of {blocks_default} rows", flush=True)

    # (path, runner, prefill_block)
    paths = [(f"fused/{b}", "fused", b) for b in sizes] + [("eager", "eager", None)]
    state: dict[str, dict[str, Any]] = {}
    for name, kind, _ in paths:
        runner = runners[kind]
        blocks = Blocks(runner)
        state[name] = {
            "prompts": {n: request(f"p{n}", prompt_of(n, n), blocks.take(n)) for n in prompt_tokens},
            "decodes": [
                request(
                    f"d{i}",
                    prompt_of(args.context, 100 + i),
                    blocks.take(args.context + args.drafts + 1),
                    decoding=True,
                )
                for i in range(args.batch)
            ],
            "chunk": request("c", prompt_of(args.chunk, 7), blocks.take(args.chunk)),
        }
    samples: dict[tuple[str, str], list[float]] = {}

    def point(name: str, kind: str, block: int | None) -> None:
        runner = runners[kind]
        if runner.fused is not None and block is not None:
            runner.fused.prefill_block = block
        st = state[name]
        for n, req in st["prompts"].items():
            samples.setdefault((name, f"prefill {n}"), []).append(time_prefill(runner, req, args.chunk))
        for dec in st["decodes"]:
            dec.num_computed_tokens = args.context - 1
        samples.setdefault((name, "decodes alone"), []).append(time_step(runner, st["decodes"], args.drafts, None, 0))
        samples.setdefault((name, "decodes + chunk"), []).append(
            time_step(runner, st["decodes"], args.drafts, st["chunk"], args.chunk)
        )

    kernels = {"attn/prefill": "prefill", "attn/per-head": "paged", "attn/sdpa": "sdpa"}
    attention = {n: attention_inputs(runners["fused"], n) for n in prompt_tokens}

    def attention_point() -> None:
        for n, inputs in attention.items():
            for name, kernel in kernels.items():
                samples.setdefault((name, f"attention {n}"), []).append(time_attention(fused.ext, inputs, kernel))

    for args_ in paths:
        point(*args_)  # warm-up
    attention_point()
    samples.clear()
    for _ in range(rounds):
        for args_ in paths:
            point(*args_)
        attention_point()
    fused.prefill_block = blocks_default

    results: list[dict[str, Any]] = []
    for (name, what), s in samples.items():
        med = statistics.median(s) * 1e3
        results.append({"path": name, "what": what, "median_ms": med, "samples": len(s)})
    for what in sorted({w for _, w in samples}):
        names = [name for name, w in samples if w == what]
        cells = "  ".join(f"{name} {statistics.median(samples[(name, what)]) * 1e3:8.1f}" for name in names)
        print(f"{what:>16} ms: {cells}", flush=True)
    out = {
        "benchmark": "prefill_step_cost",
        "machine": machine_info(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_mode": runners["fused"].mode,
        "threads": threads,
        "chunk": args.chunk,
        "batch": args.batch,
        "drafts": args.drafts,
        "context": args.context,
        "prefill_block_default": blocks_default,
        "clock": "thread_time" if threads == 1 else "perf_counter",
        "rounds": rounds,
        "quick": args.quick,
        "points": results,
    }
    write_results(args.output, out)
    return 0


def _fields(config: EngineConfig) -> dict:
    return {f: getattr(config, f) for f in config.__struct_fields__}


if __name__ == "__main__":
    sys.exit(main())
