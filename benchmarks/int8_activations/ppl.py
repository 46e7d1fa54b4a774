"""Int8-activation probe, numerics: perplexity (benchmarks/perplexity.py's method, text and chunks) of the eager
bf16 + int4 path (`default-eager`: int4 copies for steps of <= int4_max_rows rows, int8 LM
head) as it is, and with every int4 layer matrix multiplied by the prototype VNNI kernel
(activations quantized per row and 32-block to int8; its result is exactly the int8
quantize-dequantize of x times the int4 weights, benchmarks/int8_activations/check.py). Per-token NLLs of both are
paired, so the delta's error bar is the paired one, not the +/-0.29 of either figure.

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python benchmarks/int8_activations/ppl.py [--chunks N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(os.path.dirname(HERE), "results", "int8_activations_20261203")
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import vnni  # noqa: E402
from machine_info import machine_info  # noqa: E402
from perplexity import MODES, TEXT, chunk_nll, chunks, summarize  # noqa: E402

from services.engine_core.model_runner import ModelRunner  # noqa: E402
from services.engine_core.models.int4 import Int4Weight  # noqa: E402
from services.tokenizer_pool.tokenizer import load_tokenizer  # noqa: E402
from shared.config import EngineConfig  # noqa: E402

_original_call = Int4Weight.__call__
_cache: dict[int, vnni.VnniWeight] = {}
calls = {"vnni": 0}


_skip: set[int] = set()  # ids of the Int4Weights left on the int4 kernel (--only)


def _vnni_call(self: Int4Weight, x: torch.Tensor) -> torch.Tensor:
    if id(self) in _skip:
        return _original_call(self, x)
    w = _cache.get(id(self))
    if w is None:
        w = _cache[id(self)] = vnni.from_int4(self)
    calls["vnni"] += 1
    return w(x.contiguous()).to(x.dtype)


def run(
    mode: str, text: str, ctx: int, threads: int, max_chunks: int, patched: bool, only: list[str] | None = None
) -> list[float]:
    overrides, step = MODES[mode]
    config = EngineConfig(num_threads=threads, max_num_batched_tokens=ctx, **overrides)
    runner = ModelRunner(config)
    step = runner.model.layers[0].int4_max_rows or step
    if only is not None:
        for layer in runner.model.layers:
            assert layer.int4 is not None
            _skip.update(id(getattr(layer.int4, m)) for m in ("qkv", "o", "gate_up", "down") if m not in only)
    tok = load_tokenizer(config)
    tokens = tok.encode(text, add_special_tokens=True)
    plain = tok.encode(text, add_special_tokens=False)
    bos = tokens[0] if len(tokens) == len(plain) + 1 else None
    Int4Weight.__call__ = _vnni_call if patched else _original_call  # type: ignore[method-assign]
    nll: list[float] = []
    try:
        for c in chunks(tokens, ctx, bos)[:max_chunks]:
            nll += chunk_nll(runner, c, step)
    finally:
        Int4Weight.__call__ = _original_call  # type: ignore[method-assign]
    print(f"{mode} patched={patched} run_mode={runner.mode} step={step}", flush=True)
    return nll


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="default-eager")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunks", type=int, default=1000)
    p.add_argument("--only", nargs="+", choices=["qkv", "o", "gate_up", "down"], help="the matrices on VNNI")
    p.add_argument("--base-json", help="reuse the int4 pass's per-token NLLs of an earlier run")
    p.add_argument("--output", default=os.path.join(RESULTS, "ppl.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with open(TEXT) as f:
        text = f.read()
    t0 = time.perf_counter()
    if args.base_json:
        with open(args.base_json) as f:
            base = json.load(f)["nll_int4"]
    else:
        base = run(args.mode, text, args.ctx, args.threads, args.chunks, False)
    q8 = run(args.mode, text, args.ctx, args.threads, args.chunks, True, args.only)
    assert calls["vnni"] > 0, "the int4 matrices were not used"
    diff = [b - a for a, b in zip(base, q8, strict=True)]
    mean = sum(diff) / len(diff)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / (len(diff) - 1))
    sb, sq = summarize(base), summarize(q8)
    out = {
        "benchmark": "int8_activations_perplexity",
        "machine": machine_info(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": args.mode,
        "ctx": args.ctx,
        "text": os.path.relpath(TEXT, ROOT),
        "int4_as_is": sb,
        "int4_x_int8_vnni": sq,
        "mean_nll_delta": mean,
        "mean_nll_delta_stderr": sd / math.sqrt(len(diff)),
        "ppl_ratio": math.exp(mean),
        "vnni_matrices": args.only or ["qkv", "o", "gate_up", "down"],
        "vnni_calls": calls["vnni"],
        "wall_s": time.perf_counter() - t0,
    }
    print(json.dumps(out, indent=1))
    out["nll_int4"], out["nll_vnni"] = base, q8
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
