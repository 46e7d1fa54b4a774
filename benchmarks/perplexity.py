"""Perplexity of each NovaInfer CPU mode and of llama.cpp on the same GGUF file and text.

The quality half of issue 10: a faster mode may become the default only if its perplexity
matches llama.cpp's on the same file. Both sides follow llama.cpp's `llama-perplexity`
method exactly: tokenize the whole text (with BOS if the vocabulary adds one), cut it into
chunks of --ctx tokens, put BOS first in each chunk, and score the second half of every
chunk (each token predicted from at least ctx/2 tokens of context).

NovaInfer runs its real model code and paged KV cache, in steps of at most --step tokens:
a dense mode takes a chunk in one step, an int4 mode takes it int4.max_rows rows at a time
(8 over bf16 with AMX, else 16), because its int4 weights are only used for steps that small
(what decoding does). The default-fused-prefill modes take a chunk in one step too, as a
prompt's prefill chunk through the fused C++ step: on the int4 copies where the default puts the
prefill rows there (FusedDecode.prefill_int4), and (-dense) on the dense weights, for the two
to be compared.

The text, benchmarks/data/kjv_genesis_1-11.txt, is Genesis 1-11 of the King James Bible
(public domain), as printed by Debian's `bible-kjv` package.

    .venv/bin/python benchmarks/perplexity.py              # every mode + llama.cpp
    .venv/bin/python benchmarks/perplexity.py --modes fp32 --no-llamacpp
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from compare_peers import LLAMA_BUILDS, SETUP_LLAMACPP  # noqa: E402
from machine_info import machine_info  # noqa: E402

from services.engine_core.attention.base import AttentionMetadata  # noqa: E402
from services.engine_core.model_runner import ModelRunner  # noqa: E402
from services.tokenizer_pool.tokenizer import load_tokenizer  # noqa: E402
from shared.config import EngineConfig  # noqa: E402
from shared.model_files import bundled_model_path  # noqa: E402

TEXT = os.path.join(HERE, "data", "kjv_genesis_1-11.txt")
RESULTS = os.path.join(HERE, "results", "perplexity.json")
# mode -> (EngineConfig overrides, rows per step: 0 for whole chunks; in int4 modes the run
# takes the rows the int4 copies serve, int4.max_rows, so that they are used). Every mode but
# `default` pins dtype and quantization, whatever the defaults resolve to.
MODES: dict[str, tuple[dict[str, Any], int]] = {
    # What `novainfer serve` runs out of the box (run_mode.py; here bf16 + int4 where the CPU has
    # native bf16): steps the int4 copies serve, so that int4, if chosen, is used.
    "default": ({}, 16),
    # The default's fused C++ step (fused_cpu/), its rows as a decoding request's: each step one
    # new token and the drafts it verifies, the rows decoding and speculation multiply (the int4
    # copies' kernel, int8 activations), where `default` scores the eager model's ops.
    "default-fused": ({}, 16),
    # The default's fused C++ step with each chunk as one prompt's prefill chunk (what a prompt's
    # prefill multiplies, as llama-perplexity scores a batch): the prefill rows on the weights
    # the default gives them (FusedDecode.prefill_int4: the int4 copies without AMX) ...
    "default-fused-prefill": ({}, 0),
    # ... and on the dense weights (prefill_int4 off: what the fused step ran before it).
    "default-fused-prefill-dense": ({}, 0),
    # The default without its fused C++ decode step (--no-fused-cpu-decode): the eager ops.
    "default-eager": ({"fused_cpu_decode": False}, 16),
    # The exact mode (--exact is the same: float32, no int4, eager).
    "fp32": ({"dtype": "float32", "quantization": "none"}, 0),
    "bf16": ({"dtype": "bfloat16", "quantization": "none"}, 0),
    "int4": ({"dtype": "float32", "quantization": "int4"}, 16),
    "int4-head": ({"dtype": "float32", "quantization": "int4", "int4_lm_head": True}, 16),
    # int4 for steps of <= int4.max_rows rows, dense bf16 (AMX) above: the fastest kernel at each size.
    "int4-bf16": ({"dtype": "bfloat16", "quantization": "int4"}, 16),
}


def chunks(tokens: list[int], ctx: int, bos: int | None) -> list[list[int]]:
    out = [tokens[i * ctx : (i + 1) * ctx] for i in range(len(tokens) // ctx)]
    if bos is not None:
        out = [[bos, *c[1:]] for c in out]
    return out


@torch.inference_mode()
def chunk_nll(runner: ModelRunner, chunk: list[int], step: int, fused: str = "") -> list[float]:
    """Negative log-likelihoods of chunk[first+1:] (first = len // 2), through the runner's
    model and KV cache: one request whose block table is blocks 0..n-1, so token i sits in
    slot i. fused "decode": each step through the fused C++ step as a decoding request's token
    and the drafts it verifies (its decode rows); "prefill": as a prompt's prefill chunk (its
    prefill rows); "": the eager model."""
    n, bs = len(chunk), runner.block_size
    table = torch.arange(-(-n // bs), dtype=torch.int32).unsqueeze(0)
    ids = torch.tensor(chunk, dtype=torch.long)
    logits: list[torch.Tensor] = []
    step = step or n
    for start in range(0, n, step):
        end = min(start + step, n)
        i32 = torch.int32
        md = AttentionMetadata(
            num_reqs=1,
            num_tokens=end - start,
            query_start_loc=torch.tensor([0, end - start], dtype=i32),
            seq_lens=torch.tensor([end], dtype=i32),
            block_tables=table,
            slot_mapping=torch.arange(start, end, dtype=torch.long),
            max_query_len=end - start,
            max_seq_len=end,
            query_lens_cpu=[end - start],
            seq_lens_cpu=[end],
            num_draft_tokens=end - start - 1 if fused == "decode" else 0,
            num_prefill_reqs=int(fused == "prefill"),
        )
        if fused:
            assert runner.fused is not None
            hidden = runner.fused.run(ids[start:end], torch.arange(start, end), runner.kv_caches, md)
        else:
            hidden = runner.model(ids[start:end], torch.arange(start, end), runner.kv_caches, md, runner.backend)
        logits.append(runner.model.compute_logits(hidden))
    first = n // 2
    logp = torch.cat(logits)[first : n - 1].log_softmax(-1)
    return (-logp.gather(1, ids[first + 1 :].unsqueeze(1)).squeeze(1)).tolist()


def summarize(nll: list[float]) -> dict[str, float]:
    mean = sum(nll) / len(nll)
    var = sum((x - mean) ** 2 for x in nll) / max(len(nll) - 1, 1)
    ppl = math.exp(mean)
    # llama.cpp's error estimate: ppl * stderr of the mean NLL.
    return {"ppl": ppl, "ppl_err": ppl * math.sqrt(var / len(nll)), "scored_tokens": len(nll)}


def novainfer_mode(mode: str, text: str, ctx: int, threads: int) -> dict[str, Any]:
    overrides, step = MODES[mode]
    config = EngineConfig(num_threads=threads, max_num_batched_tokens=ctx, **overrides)
    t0 = time.perf_counter()
    runner = ModelRunner(config)
    startup_s = time.perf_counter() - t0
    fused = {"default-fused": "decode", "default-fused-prefill": "prefill", "default-fused-prefill-dense": "prefill"}
    kind = fused.get(mode, "")
    if kind and runner.fused is None:
        raise RuntimeError(f"{mode}: the fused CPU step does not run here (see the engine's log)")
    if mode == "default-fused-prefill-dense":
        assert runner.fused is not None
        runner.fused.prefill_int4 = False
    if step:
        step = runner.model.layers[0].int4_max_rows or step
    tok = load_tokenizer(config)
    tokens = tok.encode(text, add_special_tokens=True)
    plain = tok.encode(text, add_special_tokens=False)
    # The vocabulary's BOS, if it adds one (llama-perplexity then puts it first in every chunk).
    bos = tokens[0] if len(tokens) == len(plain) + 1 else None
    t0 = time.perf_counter()
    nll: list[float] = []
    for c in chunks(tokens, ctx, bos):
        nll += chunk_nll(runner, c, step, kind)
    return {
        **summarize(nll),
        **({"prefill_int4": runner.fused.prefill_int4} if kind == "prefill" and runner.fused is not None else {}),
        "tokens": len(tokens),
        "run_mode": runner.mode,
        "model_load_s": runner.load_time_s,
        "runner_startup_s": startup_s,
        "eval_s": time.perf_counter() - t0,
    }


def llamacpp(ctx: int, threads: int) -> dict[str, Any]:
    """llama-perplexity with default flags but context and threads; the native build, or the
    no-AMX one where the native build crashes (as compare_peers.py decides for the server)."""
    tried = []
    for variant in ("native", "noamx"):
        binary = os.path.join(os.path.dirname(LLAMA_BUILDS[variant]), "llama-perplexity")
        if not os.access(binary, os.X_OK):
            subprocess.run(["bash", SETUP_LLAMACPP, *(["--no-amx"] if variant == "noamx" else [])], check=True)
        cmd = [binary, "-m", bundled_model_path(), "-f", TEXT, "-c", str(ctx), "-t", str(threads)]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", p.stdout + p.stderr)
        if p.returncode == 0 and m:
            return {
                "ppl": float(m.group(1)),
                "ppl_err": float(m.group(2)),
                "variant": variant,
                "command": cmd,
                "wall_s": time.perf_counter() - t0,
                "tried": tried,
            }
        tried.append({"variant": variant, "returncode": p.returncode, "tail": (p.stdout + p.stderr)[-400:]})
    raise RuntimeError(f"llama-perplexity failed: {tried}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--no-llamacpp", action="store_true")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=RESULTS)
    args = p.parse_args()
    with open(TEXT) as f:
        text = f.read()
    out: dict[str, Any] = {
        "benchmark": "perplexity",
        "text": os.path.relpath(TEXT, ROOT),
        "model_file": os.path.basename(bundled_model_path()),
        "ctx": args.ctx,
        "machine": machine_info(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": {},
    }
    for mode in args.modes:
        out["results"][f"novainfer-{mode}"] = r = novainfer_mode(mode, text, args.ctx, args.threads)
        print(
            f"novainfer {mode:<5} PPL {r['ppl']:.4f} +/- {r['ppl_err']:.4f} over {r['scored_tokens']} tokens",
            flush=True,
        )
    if not args.no_llamacpp:
        out["results"]["llamacpp"] = r = llamacpp(args.ctx, args.threads)
        print(f"llama.cpp ({r['variant']}) PPL {r['ppl']:.4f} +/- {r['ppl_err']:.4f}", flush=True)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
