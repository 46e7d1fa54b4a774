"""Offline throughput: NovaInfer's engine vs transformers' `generate`, side by side.

Same 128 requests for both (prompt lengths uniform in [16, 256], output lengths
uniform in [16, 128], ignore_eos, greedy), the bundled SmolLM2-135M in fp32 (the engine in --exact).
transformers runs static batches of 32 in arrival order (left-padded; each batch
runs to its longest output). Throughput counts the requested output tokens only.
Also single-stream decode tokens/s for both, and the floor any fp32 implementation
meets at batch 1: the time of the decode step's matrix products alone (every weight
read once per token). With --bf16, the engine's throughput in bfloat16 as well (not
part of the fp32 comparison). Writes benchmarks/results/offline_throughput.json.

    .venv/bin/python benchmarks/offline_throughput.py [--requests 128] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine_info import machine_info

from novainfer.llm import LLM
from shared.config import EngineConfig, available_cores
from shared.model_files import bundled_model_path
from shared.protocol import SamplingParams

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "offline_throughput.json")


def workload(n: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(100, vocab) for _ in range(rng.randint(16, 256))], rng.randint(16, 128)) for _ in range(n)]


def load_hf() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = bundled_model_path()
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()


@torch.inference_mode()
def hf_generate(model: torch.nn.Module, prompts: list[list[int]], max_new: int) -> None:
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    model.generate(
        ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, pad_token_id=0
    )


def bench_hf_throughput(model: torch.nn.Module, reqs: list[tuple[list[int], int]], batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(reqs), batch):
        chunk = reqs[i : i + batch]
        hf_generate(model, [p for p, _ in chunk], max(n for _, n in chunk))
    return sum(n for _, n in reqs) / (time.perf_counter() - t0)


def bench_engine_throughput(llm: LLM, reqs: list[tuple[list[int], int]]) -> float:
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in reqs]
    t0 = time.perf_counter()
    results = llm.generate([p for p, _ in reqs], params, use_tqdm=False)
    dt = time.perf_counter() - t0
    produced = sum(len(r.outputs[0].token_ids) for r in results)
    assert produced == sum(n for _, n in reqs), "engine produced a different number of tokens"
    return produced / dt


def decode_rate(run: callable, prompt: list[int], n: int) -> float:
    """Decode tokens/s: time for n tokens minus time for 1 (the prefill), over n - 1."""
    run(prompt, 1)
    t0 = time.perf_counter()
    run(prompt, 1)
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(prompt, n)
    return (n - 1) / (time.perf_counter() - t0 - t_prefill)


@torch.inference_mode()
def matmul_floor_ms(llm: LLM, repeats: int = 20) -> float:
    """ms for one token's matrix products alone (the weights of every layer and the LM
    head, one input row): the memory-bandwidth floor of fp32 decode at batch 1."""
    model = llm.engine.runner.model
    weights = [
        w for layer in model.layers for w in (layer.qkv_weight, layer.o_weight, layer.gate_up_weight, layer.down_weight)
    ]
    weights.append(model.embed if model.lm_head is None else model.lm_head)
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}

    def run() -> None:
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)

    run()
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="16 requests: a smoke run")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--bf16", action="store_true", help="also measure the engine's throughput in bfloat16")
    ap.add_argument(
        "--int4", action="store_true", help="also measure the engine with --quantization int4 (decode and throughput)"
    )
    args = ap.parse_args()
    if args.quick:
        args.requests, args.decode_tokens = 16, 32

    threads = available_cores()
    torch.set_num_threads(threads)
    llm = LLM(config=EngineConfig(num_threads=threads, exact=True))  # fp32, against transformers' fp32
    hf = load_hf()
    reqs = workload(args.requests, llm.engine.model_config.vocab_size, args.seed)

    # Warm both up once so one-time costs (allocator, kernels' first run) stay out.
    bench_engine_throughput(llm, reqs[:4])
    hf_generate(hf, [reqs[0][0]], 4)

    engine_tps = bench_engine_throughput(llm, reqs)
    print(f"engine: {engine_tps:.1f} output tok/s", flush=True)
    hf_tps = bench_hf_throughput(hf, reqs, args.hf_batch)
    print(f"transformers: {hf_tps:.1f} output tok/s", flush=True)

    prompt = reqs[0][0][:32]

    def run_on(engine: LLM) -> callable:
        def run(p: list[int], n: int) -> None:
            engine.generate([p], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), use_tqdm=False)

        return run

    engine_decode = decode_rate(run_on(llm), prompt, args.decode_tokens)
    hf_decode = decode_rate(lambda p, n: hf_generate(hf, [p], n), prompt, args.decode_tokens)
    int4_decode = int4_tps = None
    if args.int4:
        int4 = LLM(config=EngineConfig(num_threads=threads, dtype="float32", quantization="int4"))
        int4_decode = decode_rate(run_on(int4), prompt, args.decode_tokens)
        print(
            f"int4 decode: {int4_decode:.1f} tok/s (fp32 {engine_decode:.1f}, transformers {hf_decode:.1f})", flush=True
        )
        bench_engine_throughput(int4, reqs[:4])
        int4_tps = bench_engine_throughput(int4, reqs)
        del int4
    floor_ms = matmul_floor_ms(llm)
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())

    bf16_tps = None
    if args.bf16:
        del llm, hf
        bf16 = LLM(config=EngineConfig(num_threads=threads, dtype="bfloat16", quantization="none"))
        bench_engine_throughput(bf16, reqs[:4])
        bf16_tps = bench_engine_throughput(bf16, reqs)

    result = {
        "benchmark": "offline_throughput",
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized), float32",
        "device": f"cpu: {platform.processor() or platform.machine()}, {threads} threads",
        "machine": machine_info(),
        "torch": torch.__version__,
        "requests": args.requests,
        "prompt_len_range": [16, 256],
        "output_len_range": [16, 128],
        "hf_static_batch": args.hf_batch,
        "output_tokens": sum(n for _, n in reqs),
        "engine_tokens_per_s": round(engine_tps, 2),
        "hf_tokens_per_s": round(hf_tps, 2),
        "ratio": round(engine_tps / hf_tps, 3),
        "engine_decode_tokens_per_s": round(engine_decode, 2),
        "hf_decode_tokens_per_s": round(hf_decode, 2),
        "decode_ratio": round(engine_decode / hf_decode, 3),
        "weight_bytes": weight_bytes,
        "decode_matmul_floor_ms": round(floor_ms, 2),
        "weight_read_gb_per_s": round(weight_bytes / floor_ms / 1e6, 1),
        "engine_decode_ms": round(1e3 / engine_decode, 2),
        "hf_decode_ms": round(1e3 / hf_decode, 2),
        "decode_ratio_bound": round(1e3 / hf_decode / floor_ms, 3),
        "engine_bf16_tokens_per_s": None if bf16_tps is None else round(bf16_tps, 2),
        # --quantization int4: int4 copies of the layers' Q4_1 weights for steps of <= int4.max_rows rows.
        "engine_int4_decode_tokens_per_s": None if int4_decode is None else round(int4_decode, 2),
        "int4_decode_ratio": None if int4_decode is None else round(int4_decode / hf_decode, 3),
        "engine_int4_tokens_per_s": None if int4_tps is None else round(int4_tps, 2),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(
        f"| metric | NovaInfer | transformers | ratio |\n|---|---|---|---|\n"
        f"| throughput, output tok/s ({args.requests} requests) "
        f"| {engine_tps:.1f} | {hf_tps:.1f} | {engine_tps / hf_tps:.2f}x |\n"
        f"| single-stream decode, tok/s | {engine_decode:.1f} | {hf_decode:.1f} | {engine_decode / hf_decode:.2f}x |\n"
        f"| decode matmuls alone (floor), ms/token | {floor_ms:.1f} | | bound {1e3 / hf_decode / floor_ms:.2f}x |"
    )
    if int4_decode is not None:
        print(
            f"| with --quantization int4: single-stream decode, tok/s | {int4_decode:.1f} | {hf_decode:.1f} | "
            f"{int4_decode / hf_decode:.2f}x |\n| with --quantization int4: throughput, output tok/s | "
            f"{int4_tps:.1f} | {hf_tps:.1f} | {int4_tps / hf_tps:.2f}x |"
        )
    if bf16_tps is not None:
        print(f"engine in bfloat16: {bf16_tps:.1f} output tok/s ({bf16_tps / hf_tps:.2f}x transformers fp32)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
