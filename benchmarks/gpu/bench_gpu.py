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
import contextlib
import gc
import inspect
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# Triton reads TRITON_INTERPRET when a module defining a kernel is imported: settle it before any
# project module is imported (they are imported inside the sections).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

RESULTS = os.path.join(ROOT, "benchmarks", "results", "gpu.json")
CONFIGS = os.path.join(ROOT, "shared", "model_configs")
SECTIONS = ("correctness", "bandwidth", "decode_attention", "prefill_attention", "decode_step", "e2e")
# Sections whose ratios divide by the copy bandwidth: it is measured for them when not selected.
NEEDS_BANDWIDTH = ("decode_attention", "decode_step")

BANDWIDTH_DEFINITION = (
    "bytes moved per second by dst.copy_(src) between two device tensors: 2 x the tensor's size "
    "(every byte is read once and written once) over the median copy time. DRAM serves reads and "
    "writes from the same bandwidth, so this is the achievable rate of reading memory; every ratio "
    "divides bytes READ (K/V, weights) by it: decode_attention = (K/V bytes read / kernel time) / "
    "copy bandwidth; decode_step roofline time = (weight bytes + K/V bytes read) / copy bandwidth."
)


@dataclass
class Plan:
    """Every shape and size the sections use: the issue's on a GPU, tiny ones with --smoke."""

    smoke: bool
    device: str
    attn_dtype: torch.dtype
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    rel_tolerance: float
    correctness_shapes: list[tuple[int, int, int]]
    correctness_batches: dict[str, tuple[list[int], list[int], int]]
    """name -> (query lens, context lens, num_splits)."""
    copy_bytes: int
    decode_cases: list[tuple[int, int]]
    """(batch, context length); the first is the target case."""
    prefill: tuple[int, int]
    """(sequences, tokens each)."""
    step_models: list[str]
    step_batches: list[int]
    step_prompt_len: int
    step_warm: int
    step_timed: int
    model_dtype: str
    e2e_model: str
    e2e_seqs: int
    e2e_input: tuple[int, int]
    e2e_output: tuple[int, int]
    hf_batch: int
    hf_cb_warmup: bool
    """Let transformers' continuous batching capture its graphs first (generate_batch's default);
    off in smoke runs, where it costs most of a minute on a CPU."""
    engine_budget_s: float
    hf_budget_s: float
    hf_mode: str = "auto"
    """auto: continuous batching where transformers has it, else static batches; or force one."""
    engine_overrides: dict[str, Any] = field(default_factory=dict)


def full_plan() -> Plan:
    # Qwen3-0.6B's attention: 16 query heads, 8 KV heads, head_dim 128.
    return Plan(
        smoke=False, device="cuda", attn_dtype=torch.bfloat16,
        heads=16, kv_heads=8, head_dim=128, block_size=16, rel_tolerance=1e-2,
        correctness_shapes=[(16, 8, 128), (12, 2, 128)],  # Qwen3-0.6B, Qwen2.5-1.5B
        correctness_batches={
            # contexts: empty, partial and aligned blocks, long; a fresh prefill, chunks after a
            # cached prefix (aligned and not), decodes between them.
            "decode": ([1] * 8, [0, 15, 16, 17, 300, 1000, 2047, 64], 1),
            "mixed": ([1, 37, 1, 128, 1, 16], [100, 0, 513, 19, 2000, 16], 1),
            "decode_split4": ([1] * 8, [0, 15, 16, 17, 300, 1000, 2047, 64], 4),
        },
        copy_bytes=1 << 30,
        decode_cases=[(64, 2048), (128, 2048), (16, 2048), (4, 8192)],
        prefill=(8, 1024),
        step_models=["qwen3-0.6b", "qwen2.5-1.5b"], step_batches=[64, 128],
        step_prompt_len=512, step_warm=5, step_timed=20, model_dtype="bfloat16",
        e2e_model="qwen3-0.6b", e2e_seqs=256, e2e_input=(100, 1024), e2e_output=(100, 1024),
        hf_batch=64, hf_cb_warmup=True, engine_budget_s=120.0, hf_budget_s=200.0,
        engine_overrides={"device": "cuda", "dtype": "bfloat16"},
    )


def smoke_plan(device: str) -> Plan:
    # tiny-qwen3's attention shape; fp32 because the interpreter's bf16 tl.dot is wrong.
    on_cpu = device == "cpu"
    return Plan(
        smoke=True, device=device, attn_dtype=torch.float32 if on_cpu else torch.bfloat16,
        heads=4, kv_heads=2, head_dim=32, block_size=16, rel_tolerance=1e-4 if on_cpu else 1e-2,
        correctness_shapes=[(4, 2, 32)],
        correctness_batches={
            "decode": ([1] * 3, [0, 17, 40], 1),
            "mixed": ([1, 5, 1], [20, 0, 9], 1),
            "decode_split3": ([1] * 3, [0, 17, 40], 3),
        },
        copy_bytes=16 << 20,
        decode_cases=[(4, 64), (2, 100)],
        prefill=(2, 32),
        step_models=["tiny-qwen3", "tiny-qwen2"], step_batches=[4],
        step_prompt_len=16, step_warm=1, step_timed=3, model_dtype="float32" if on_cpu else "bfloat16",
        e2e_model="tiny-qwen3", e2e_seqs=6, e2e_input=(4, 16), e2e_output=(4, 12),
        hf_batch=4, hf_cb_warmup=False, engine_budget_s=30.0, hf_budget_s=30.0,
        engine_overrides={"device": device, "dtype": "float32" if on_cpu else "bfloat16",
                          "kv_cache_bytes": 32 << 20},
    )


# --- timing helpers ------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def kernel_ms(fn: Callable[[], Any], device: str) -> tuple[float, str]:
    """Median time of fn in ms, and how it was measured. On a GPU, a CUDA graph of back-to-back
    calls replayed 10 times (triton.testing.do_bench_cudagraph): short kernels would otherwise
    be timed with their Python launch overhead, which the engine's CUDA graphs hide too."""
    if device != "cuda":
        fn()  # warm-up (the interpreter's first call is no slower, but keep the shape of a bench)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3, "wall clock, median of 3 (CPU)"
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")), (
            "triton.testing.do_bench_cudagraph: median of 10 replays of a graph of back-to-back calls"
        )
    except Exception as e:  # noqa: BLE001 - capture can fail on some stacks; events still work
        ms = float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        return ms, f"triton.testing.do_bench, median, L2 flushed (graph capture failed: {e})"


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp32; NaN if out holds any NaN."""
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


# --- paged batches -------------------------------------------------------------------------


@dataclass
class PagedInputs:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    md: Any  # AttentionMetadata (imported lazily, after TRITON_INTERPRET is settled)
    scale: float


def paged_inputs(
    query_lens: list[int], context_lens: list[int], *, heads: int, kv_heads: int, head_dim: int,
    block_size: int, dtype: torch.dtype, device: str, seed: int = 0, poison: bool = True,
) -> PagedInputs:
    """One step's batch over a paged cache whose blocks are handed out in shuffled order, as a
    long-running engine's are. With poison, every slot but the requests' cached context holds
    NaN, so reading one the kernel should not turns its output NaN; without, the whole cache is
    random (timing runs: filling by slot would take longer than the benchmark). query/key/value
    are strided views of one fused qkv tensor, as the model's projection gives them."""
    from services.engine_core.attention.base import AttentionMetadata

    cpu_gen = torch.Generator().manual_seed(seed)
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    blocks_per_req = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 3  # a few blocks no request owns
    order = torch.randperm(num_blocks, generator=cpu_gen)
    tables = torch.zeros(len(seq_lens), max(blocks_per_req) + 1, dtype=torch.int32)
    taken = 0
    for i, n in enumerate(blocks_per_req):
        tables[i, :n] = order[taken : taken + n].to(torch.int32)
        taken += n

    def slots(i: int, start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        return tables[i, pos // block_size].long() * block_size + pos % block_size

    shape = (num_blocks, block_size, kv_heads, head_dim)
    if poison:
        k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
        v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
        ctx_slots = torch.cat([slots(i, 0, c) for i, c in enumerate(context_lens)]).to(device)
        n = len(ctx_slots)
        for cache in (k_cache, v_cache):
            vals = torch.randn(n, kv_heads, head_dim, generator=dev_gen, device=device).to(dtype)
            cache.view(-1, kv_heads, head_dim).index_copy_(0, ctx_slots, vals)
    else:
        k_cache = torch.randn(shape, generator=dev_gen, device=device).to(dtype)
        v_cache = torch.randn(shape, generator=dev_gen, device=device).to(dtype)

    num_tokens = sum(query_lens)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width, generator=dev_gen, device=device).to(dtype)
    query = qkv[:, : heads * head_dim].view(-1, heads, head_dim)
    key = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(-1, kv_heads, head_dim)
    value = qkv[:, (heads + kv_heads) * head_dim :].view(-1, kv_heads, head_dim)
    new_slots = torch.cat([slots(i, c, s) for i, (c, s) in enumerate(zip(context_lens, seq_lens))])
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    i32 = dict(dtype=torch.int32, device=device)
    md = AttentionMetadata(
        num_reqs=len(seq_lens), num_tokens=num_tokens,
        query_start_loc=torch.tensor(starts, **i32),
        seq_lens=torch.tensor(seq_lens, **i32),
        context_lens=torch.tensor(context_lens, **i32),
        block_tables=tables.to(device),
        slot_mapping=new_slots.to(device),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        query_lens_cpu=list(query_lens), seq_lens_cpu=seq_lens,
    )
    return PagedInputs(query, key, value, k_cache, v_cache, md, head_dim**-0.5)


def run_kernel(b: PagedInputs, num_splits: int, out: torch.Tensor) -> torch.Tensor:
    from services.engine_core.attention.triton_kernels import paged_attention

    md = b.md
    return paged_attention(
        b.query, b.k_cache, b.v_cache, md.block_tables, md.seq_lens, md.query_start_loc,
        md.max_query_len, b.scale, num_splits=num_splits, out=out,
    )


def num_sms(device: str) -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 0


# --- sections ------------------------------------------------------------------------------


def section_correctness(plan: Plan, ctx: dict[str, Any]) -> dict[str, Any]:
    from services.engine_core.attention.torch_backend import TorchAttentionBackend, reference_attention
    from services.engine_core.attention.triton_kernels import write_kv_cache

    cases = []
    for heads, kv_heads, head_dim in plan.correctness_shapes:
        for name, (q_lens, c_lens, splits) in plan.correctness_batches.items():
            b = paged_inputs(q_lens, c_lens, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                             block_size=plan.block_size, dtype=plan.attn_dtype, device=plan.device)
            write_kv_cache(b.key, b.value, b.k_cache, b.v_cache, b.md.slot_mapping)
            # The write must store this step's rows bit for bit at their slots.
            stored = b.k_cache.view(-1, kv_heads, head_dim)[b.md.slot_mapping]
            write_exact = bool(torch.equal(stored, b.key)) and bool(
                torch.equal(b.v_cache.view(-1, kv_heads, head_dim)[b.md.slot_mapping], b.value))
            out = torch.full(b.query.shape, float("nan"), dtype=b.query.dtype, device=plan.device)
            run_kernel(b, splits, out)
            ref = reference_attention(b.query, b.k_cache, b.v_cache, b.md, b.scale)
            torch_out = TorchAttentionBackend().forward(b.query, b.key, b.value, b.k_cache, b.v_cache, b.md, b.scale)
            cases.append({
                "shape": f"{heads}q/{kv_heads}kv/d{head_dim}", "batch": name, "num_splits": splits,
                "rel_error_vs_reference": rel_error(out, ref),
                "rel_error_vs_torch_backend": rel_error(out, torch_out),
                "torch_backend_rel_error_vs_reference": rel_error(torch_out, ref),
                "kv_write_exact": write_exact,
            })
            del b, out, ref, torch_out
    errors = [c["rel_error_vs_reference"] for c in cases]
    worst = math.nan if any(math.isnan(e) for e in errors) else max(errors)  # max() skips a later NaN
    ok = all(c["rel_error_vs_reference"] <= plan.rel_tolerance and c["kv_write_exact"] for c in cases)
    return {
        "dtype": str(plan.attn_dtype).removeprefix("torch."),
        "reference": "reference_attention (per-request fp32 softmax over the paged cache) on the same device",
        "cases": cases,
        "max_rel_error": worst,
        "tolerance": plan.rel_tolerance,
        "targets": [target("Triton kernels vs torch reference, max rel. error", worst, plan.rel_tolerance,
                           "<=", met=ok)],
    }


def section_bandwidth(plan: Plan, ctx: dict[str, Any]) -> dict[str, Any]:
    n = plan.copy_bytes // 2
    src = torch.randn(n, device=plan.device).to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms, how = kernel_ms(lambda: dst.copy_(src), plan.device)
    bw = 2 * plan.copy_bytes / (ms / 1e3)
    ctx["copy_bw"] = bw
    return {
        "tensor_bytes": plan.copy_bytes,
        "copy_ms": ms,
        "copy_bandwidth_gb_per_s": bw / 1e9,
        "bandwidth_definition": BANDWIDTH_DEFINITION,
        "timing": how,
    }


def section_decode_attention(plan: Plan, ctx: dict[str, Any]) -> dict[str, Any]:
    from services.engine_core.attention.triton_backend import choose_num_splits
    from services.engine_core.attention.triton_kernels import write_kv_cache

    bw = ctx["copy_bw"]
    elem = torch.empty((), dtype=plan.attn_dtype).element_size()
    cases, how = [], ""
    for batch, context in plan.decode_cases:
        b = paged_inputs([1] * batch, [context - 1] * batch, heads=plan.heads, kv_heads=plan.kv_heads,
                         head_dim=plan.head_dim, block_size=plan.block_size, dtype=plan.attn_dtype,
                         device=plan.device, poison=False)
        write_kv_cache(b.key, b.value, b.k_cache, b.v_cache, b.md.slot_mapping)
        # The split count the backend would pick for this step.
        splits = choose_num_splits(batch, plan.kv_heads, 1, context, num_sms(plan.device))
        out = torch.empty_like(b.query)
        ms, how = kernel_ms(lambda: run_kernel(b, splits, out), plan.device)
        kv_bytes = batch * context * plan.kv_heads * plan.head_dim * 2 * elem  # K and V
        read_bw = kv_bytes / (ms / 1e3)
        cases.append({
            "batch": batch, "context": context, "num_splits": splits, "kernel_us": ms * 1e3,
            "kv_bytes_read": kv_bytes, "kv_read_gb_per_s": read_bw / 1e9,
            "fraction_of_copy_bandwidth": read_bw / bw,
        })
        del b, out
        free_device_memory()
    head = cases[0]
    return {
        "shape": f"{plan.heads} query heads, {plan.kv_heads} KV heads, head_dim {plan.head_dim}, "
                 f"{str(plan.attn_dtype).removeprefix('torch.')}, block_size {plan.block_size}, shuffled block tables",
        "cases": cases,
        "timing": how,
        "targets": [target(f"decode attention K/V read / copy bandwidth, batch {head['batch']} x context {head['context']}",
                           head["fraction_of_copy_bandwidth"], 0.70)],
    }


def section_prefill_attention(plan: Plan, ctx: dict[str, Any]) -> dict[str, Any]:
    from services.engine_core.attention.triton_kernels import write_kv_cache

    seqs, tokens = plan.prefill
    h, kv, d = plan.heads, plan.kv_heads, plan.head_dim
    b = paged_inputs([tokens] * seqs, [0] * seqs, heads=h, kv_heads=kv, head_dim=d,
                     block_size=plan.block_size, dtype=plan.attn_dtype, device=plan.device, poison=False)
    write_kv_cache(b.key, b.value, b.k_cache, b.v_cache, b.md.slot_mapping)
    out = torch.empty_like(b.query)
    ours_ms, how = kernel_ms(lambda: run_kernel(b, 1, out), plan.device)

    # The same tokens as SDPA wants them: [seqs, heads, tokens, head_dim], contiguous.
    q = b.query.reshape(seqs, tokens, h, d).transpose(1, 2).contiguous()
    k = b.key.reshape(seqs, tokens, kv, d).transpose(1, 2).contiguous()
    v = b.value.reshape(seqs, tokens, kv, d).transpose(1, 2).contiguous()
    variant, sdpa = sdpa_flash(q, k, v, b.scale, plan.device)
    sdpa_ms, _ = kernel_ms(sdpa, plan.device)
    ref = sdpa().transpose(1, 2).reshape(seqs * tokens, h, d)
    flops = 2 * seqs * h * tokens * tokens * d  # causal: half of 2 matmuls x 2 flops per MAC
    ratio = sdpa_ms / ours_ms
    return {
        "sequences": seqs, "tokens_each": tokens,
        "ours_us": ours_ms * 1e3, "sdpa_us": sdpa_ms * 1e3,
        "ours_tflop_per_s": flops / (ours_ms / 1e3) / 1e12,
        "sdpa_tflop_per_s": flops / (sdpa_ms / 1e3) / 1e12,
        "speed_vs_sdpa": ratio,
        "sdpa_variant": variant,
        "rel_error_vs_sdpa": rel_error(out, ref),
        "timing": how,
        "targets": [target(f"prefill attention speed vs SDPA flash, {seqs} x {tokens} tokens", ratio, 0.80)],
    }


def sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, device: str
               ) -> tuple[str, Callable[[], torch.Tensor]]:
    """SDPA restricted to the flash kernel, with GQA if this torch's flash kernel takes it, else on
    K/V repeated to every query head (what flash reads then is the price of that fallback)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    k_rep, v_rep = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    candidates: list[tuple[str, Callable[[], torch.Tensor]]] = []
    for backends, name in (([SDPBackend.FLASH_ATTENTION], "flash"), (None, "default")):
        def gqa(backends=backends) -> torch.Tensor:
            with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

        def repeated(backends=backends) -> torch.Tensor:
            with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True, scale=scale)

        candidates += [(f"{name}, enable_gqa", gqa), (f"{name}, K/V repeated to {q.shape[1]} heads", repeated)]
    errors = []
    for name, fn in candidates:
        if device == "cuda" and not name.startswith("flash"):
            break  # on a GPU the comparison is against flash or nothing
        try:
            fn()
            return name, fn
        except Exception as e:  # noqa: BLE001 - try the next form
            errors.append(f"{name}: {e}")
    raise RuntimeError("no SDPA flash variant runs here: " + "; ".join(errors))


def engine_config(plan: Plan, model: str, **overrides: Any):
    from shared.config import EngineConfig

    fields = {"model": os.path.join(CONFIGS, model + ".json"), **plan.engine_overrides, **overrides}
    if plan.device != "cuda":
        fields.pop("gpu_memory_utilization", None)
    return EngineConfig(**fields)


def decode_graphs(runner: Any) -> Any:
    """The runner's captured decode graphs (a DecodeGraphs), or None."""
    try:
        from services.engine_core.cuda_graph import DecodeGraphs
    except ImportError:  # a tree without CUDA-graph code
        return None
    return next((v for v in vars(runner).values() if isinstance(v, DecodeGraphs) and v.graphs), None)


def graphs_active(runner: Any) -> bool:
    return decode_graphs(runner) is not None


def count_replays(runner: Any) -> list[int]:
    """A one-element counter of the runner's graph replays from now on, so the JSON can show
    that the timed steps really ran as graphs."""
    counter = [0]
    graphs = decode_graphs(runner)
    if graphs is not None:
        run = graphs.run

        def counted(*args: Any, **kwargs: Any) -> Any:
            counter[0] += 1
            return run(*args, **kwargs)

        graphs.run = counted  # instance attribute: shadows the method for this runner only
    return counter


def weight_bytes_read(model: torch.nn.Module, batch: int) -> int:
    """Bytes of weights one decode step reads: every parameter once, except an untied input
    embedding, of which only the batch's rows are looked up (a tied one is read whole as the LM
    head, and counted once)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed, lm_head = getattr(model, "embed", None), getattr(model, "lm_head", None)
    if embed is not None and lm_head is not None:
        total -= embed.numel() * embed.element_size()
        total += batch * embed.shape[1] * embed.element_size()
    return total


def section_decode_step(plan: Plan, ctx: dict[str, Any]) -> dict[str, Any]:
    bw = ctx["copy_bw"]
    runs, targets = [], []
    for model in plan.step_models:
        for eager in (False, True):
            try:
                run = decode_step_run(plan, model, eager, bw)
            except Exception as e:  # noqa: BLE001 - the other model/mode still gets measured
                run = {"model": model, "enforce_eager": eager, "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(limit=5)}
            runs.append(run)
            free_device_memory()
            if eager:
                continue
            for case in run.get("cases", []):
                targets.append(target(f"decode step roofline fraction, {model}, batch {case['batch']}",
                                      case["roofline_fraction"], 0.60))
            if "error" in run:
                targets.append(target(f"decode step roofline fraction, {model}", None, 0.60))
    return {
        "prompt_len": plan.step_prompt_len, "timed_steps": plan.step_timed,
        "definition": "roofline time = (weight bytes read + K/V bytes read) / copy bandwidth; "
                      "fraction = roofline time / median measured engine.step() wall time (synchronized)",
        "runs": runs,
        "targets": targets,
    }


def decode_step_run(plan: Plan, model: str, eager: bool, bw: float) -> dict[str, Any]:
    from services.engine_core.engine import LLMEngine
    from shared.protocol import SamplingParams

    max_batch = max(plan.step_batches)
    cfg = engine_config(
        plan, model, max_num_seqs=max_batch, max_num_batched_tokens=8192 if not plan.smoke else 256,
        max_model_len=2 * plan.step_prompt_len + 256, gpu_memory_utilization=0.4, enforce_eager=eager,
    )
    t0 = time.perf_counter()
    engine = LLMEngine(cfg)
    init_s = time.perf_counter() - t0
    runner, sched = engine.runner, engine.scheduler
    mc = runner.model_config
    elem = torch.empty((), dtype=runner.dtype).element_size()
    kv_per_token = mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * elem
    rng = random.Random(0)
    replays = count_replays(runner)
    cases = []
    for batch in plan.step_batches:
        rids = [f"decode-{batch}-{i}" for i in range(batch)]
        params = SamplingParams(max_tokens=plan.step_warm + plan.step_timed + 16, temperature=0.0, ignore_eos=True)
        for rid in rids:
            engine.add_request(rid, [rng.randrange(100, mc.vocab_size) for _ in range(plan.step_prompt_len)], params)
        # Prefill every request (chunked over a few steps), then a few decode steps to warm up.
        for _ in range(10_000):
            if len(sched.running) == batch and not sched.waiting and all(
                    r.num_output_tokens >= 1 for r in sched.running):
                break
            engine.step()
        for _ in range(plan.step_warm):
            engine.step()
        times, kv_bytes = [], []
        replays_before = replays[0]
        for _ in range(plan.step_timed):
            if len(sched.running) != batch or any(r.num_tokens - r.num_computed_tokens != 1 for r in sched.running):
                raise RuntimeError("the batch is not pure decode: a request finished or was preempted")
            # This step attends over every request's whole context, the new token included.
            kv_bytes.append(sum(r.num_tokens for r in sched.running) * kv_per_token)
            sync(plan.device)
            t = time.perf_counter()
            engine.step()
            sync(plan.device)
            times.append(time.perf_counter() - t)
        engine.abort(rids)
        step_s = statistics.median(times)
        weights = weight_bytes_read(runner.model, batch)
        kv = statistics.mean(kv_bytes)
        roofline_s = (weights + kv) / bw
        cases.append({
            "batch": batch, "step_ms": step_s * 1e3, "step_ms_min": min(times) * 1e3,
            "tokens_per_s": batch / step_s, "weight_bytes": weights, "kv_bytes": kv,
            "roofline_ms": roofline_s * 1e3, "roofline_fraction": roofline_s / step_s,
            "graph_replays": replays[0] - replays_before,
        })
    result = {
        "model": model, "enforce_eager": eager, "cuda_graphs": graphs_active(runner),
        "attention_backend": runner.backend.name, "dtype": str(runner.dtype).removeprefix("torch."),
        "engine_init_s": init_s, "cases": cases,
    }
    del engine, runner, sched
    return result


def section_e2e(plan: Plan, ctx: dict[str, Any]) -> dict[str, Any]:
    with open(os.path.join(CONFIGS, plan.e2e_model + ".json")) as f:
        top_id = min(10000, json.load(f)["vocab_size"] - 1)
    rng = random.Random(0)  # nano-vllm's bench.py: seed 0, prompt ids in [0, 10000]
    reqs = [([rng.randint(0, top_id) for _ in range(rng.randint(*plan.e2e_input))], rng.randint(*plan.e2e_output))
            for _ in range(plan.e2e_seqs)]
    remaining = ctx["deadline"] - time.perf_counter()
    engine_budget = max(10.0, min(plan.engine_budget_s, remaining - 60))
    try:
        ours = e2e_engine(plan, reqs, engine_budget)
    except Exception as e:  # noqa: BLE001 - transformers' figure is still worth recording
        ours = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=5)}
    free_device_memory()
    remaining = ctx["deadline"] - time.perf_counter()
    hf_budget = max(10.0, min(plan.hf_budget_s, remaining - 30))
    try:
        hf = e2e_transformers(plan, reqs, hf_budget)
    except Exception as e:  # noqa: BLE001 - keep our own figure
        hf = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=5)}
    free_device_memory()
    ratio = None
    if ours.get("output_tokens_per_s") and hf.get("output_tokens_per_s"):
        ratio = ours["output_tokens_per_s"] / hf["output_tokens_per_s"]
    return {
        "workload": f"nano-vllm bench.py: {plan.e2e_seqs} sequences of random token ids, input and output "
                    f"lengths uniform in {list(plan.e2e_input)} / {list(plan.e2e_output)}, ignore_eos, greedy, "
                    f"{plan.e2e_model} shape, random weights",
        "requested_output_tokens": sum(n for _, n in reqs),
        "novainfer": ours, "transformers": hf,
        "speedup": ratio,
        "targets": [target("end-to-end output tok/s vs transformers", ratio, 3.0)],
    }


def e2e_engine(plan: Plan, reqs: list[tuple[list[int], int]], budget_s: float) -> dict[str, Any]:
    """Our engine stepped directly (the offline LLM's loop without its tokenizer: a random-weight
    config borrows the bundled model's tokenizer, which a bare GPU image lacks)."""
    from services.engine_core.engine import LLMEngine
    from shared.protocol import SamplingParams

    cfg = engine_config(plan, plan.e2e_model, max_num_seqs=256 if not plan.smoke else 8,
                        max_num_batched_tokens=16384 if not plan.smoke else 256,
                        max_model_len=4096 if not plan.smoke else None, gpu_memory_utilization=0.6)
    t0 = time.perf_counter()
    engine = LLMEngine(cfg)
    init_s = time.perf_counter() - t0

    def run(batch: list[tuple[list[int], int]], prefix: str, deadline: float) -> tuple[int, float, bool]:
        ids = [f"{prefix}-{i}" for i in range(len(batch))]
        t = time.perf_counter()
        for rid, (prompt, n) in zip(ids, batch):
            engine.add_request(rid, prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        produced = 0
        while engine.has_unfinished() and time.perf_counter() < deadline:
            produced += sum(len(o.new_token_ids) for o in engine.step())
        complete = not engine.has_unfinished()
        if not complete:
            engine.abort(ids)
        return produced, time.perf_counter() - t, complete

    # Warm-up: compiles the prefill/decode kernel variants, settles the allocator.
    run([(p[:64], 8) for p, _ in reqs[:4]], "warm", time.perf_counter() + 120)
    produced, elapsed, complete = run(reqs, "e2e", time.perf_counter() + budget_s)
    result = {
        "output_tokens": produced, "elapsed_s": elapsed, "output_tokens_per_s": produced / elapsed,
        "complete": complete, "budget_s": budget_s, "engine_init_s": init_s,
        "cuda_graphs": graphs_active(engine.runner),
        "max_num_seqs": cfg.max_num_seqs, "max_num_batched_tokens": cfg.max_num_batched_tokens,
    }
    if complete and produced != sum(n for _, n in reqs):
        result["warning"] = f"produced {produced} tokens, requested {sum(n for _, n in reqs)}"
    del engine
    return result


def hf_model(plan: Plan) -> torch.nn.Module:
    """transformers' model for our config JSON, random weights (its own initializer), sdpa."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.bfloat16 if plan.model_dtype == "bfloat16" else torch.float32
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(CONFIGS, plan.e2e_model + ".json")) as f:
            text = f.read()
        with open(os.path.join(d, "config.json"), "w") as f:
            f.write(text)
        config = AutoConfig.from_pretrained(d)
    # transformers renamed from_config's torch_dtype to dtype in 4.56.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    torch.manual_seed(0)
    with torch.device(plan.device):  # initialize on the device: 0.6B params on a CPU take long
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", **{dtype_kw: dtype})
    return model.eval()


def e2e_transformers(plan: Plan, reqs: list[tuple[list[int], int]], budget_s: float) -> dict[str, Any]:
    import transformers

    deadline = time.perf_counter() + budget_s
    model = hf_model(plan)
    result: dict[str, Any] = {"version": transformers.__version__}
    try:
        if plan.hf_mode == "continuous" or (plan.hf_mode == "auto" and hasattr(model, "init_continuous_batching")):
            try:
                result.update(hf_continuous(model, reqs, budget_s, plan.hf_cb_warmup))
                return result
            except Exception as e:  # noqa: BLE001 - its API moved between versions: static batches then
                if plan.hf_mode == "continuous":
                    raise
                result["continuous_batching_error"] = f"{type(e).__name__}: {e}"
                result["continuous_batching_traceback"] = traceback.format_exc(limit=5)
                free_device_memory()
        # What the failed attempt left of the budget, so the whole run still fits its call.
        result.update(hf_static(model, reqs, plan.hf_batch, max(10.0, deadline - time.perf_counter())))
        return result
    finally:
        del model


def hf_continuous(model: torch.nn.Module, reqs: list[tuple[list[int], int]], budget_s: float, warmup: bool
                  ) -> dict[str, Any]:
    """transformers' continuous batching (generate_batch's manager, fed per-request max_new_tokens,
    which generate_batch itself cannot take). Signatures are probed: the API changed between
    releases."""
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=max(n for _, n in reqs))
    kwargs: dict[str, Any] = {"generation_config": gen}
    params = inspect.signature(model.init_continuous_batching).parameters
    if "workload_hints" in params:
        # Sizes its cache and graphs for the workload, as generate_batch does.
        try:
            from transformers.generation.continuous_batching.utils import WorkloadHints

            kwargs["workload_hints"] = WorkloadHints(max_prompt_length=max(len(p) for p, _ in reqs),
                                                     max_generated_length=gen.max_new_tokens,
                                                     num_requests=len(reqs))
        except (ImportError, TypeError):
            pass
    manager = model.init_continuous_batching(**kwargs)
    add_params = inspect.signature(manager.add_request).parameters
    extra = {"eos_token_id": -1} if "eos_token_id" in add_params else {}  # ignore_eos

    with torch.inference_mode():
        t0 = time.perf_counter()
        if warmup and hasattr(manager, "warmup"):
            manager.warmup()  # captures its CUDA graphs: setup, not generation time
        warmup_s = time.perf_counter() - t0
        manager.start()
        try:
            # Warm-up request: its kernels' first runs stay out of the timing.
            manager.add_request(reqs[0][0][:64], request_id="warm", max_new_tokens=8, **extra)
            _collect(manager, {"warm"}, time.perf_counter() + 120)
            t0 = time.perf_counter()
            ids = set()
            for i, (prompt, n) in enumerate(reqs):
                rid = f"r{i}"
                manager.add_request(prompt, request_id=rid, max_new_tokens=n, **extra)
                ids.add(rid)
            tokens, failed = _collect(manager, ids, t0 + budget_s)
            elapsed = time.perf_counter() - t0
        finally:
            manager.stop(block=True, timeout=30)
            if hasattr(manager, "destroy"):
                manager.destroy()  # its paged cache then goes with the manager, before static batches run
    finished = len(tokens)
    produced = sum(tokens.values())
    if finished == 0:
        raise RuntimeError(f"continuous batching finished no request ({len(failed)} failed: {failed[:2]})")
    return {
        "mode": "continuous batching (init_continuous_batching manager, per-request max_new_tokens)",
        "output_tokens": produced, "elapsed_s": elapsed, "output_tokens_per_s": produced / elapsed,
        "requests_finished": finished, "requests_failed": len(failed), "failures": failed[:3],
        "complete": finished == len(reqs), "budget_s": budget_s, "warmup_s": warmup_s,
        "note": "tokens of finished requests only: a run cut by its budget is underestimated",
    }


def _collect(manager: Any, ids: set[str], deadline: float) -> tuple[dict[str, int], list[str]]:
    """Generated-token counts of the requests in ids that finish before the deadline, and the
    errors of those that failed."""
    done: dict[str, int] = {}
    failed: list[str] = []
    while len(done) + len(failed) < len(ids) and time.perf_counter() < deadline:
        out = manager.get_result(timeout=1)
        if out is None:
            if hasattr(manager, "is_running") and not manager.is_running():
                raise RuntimeError("transformers' generation thread stopped")
            continue
        if out.request_id not in ids or not _finished(out):
            continue
        if getattr(out, "error", None):
            failed.append(f"{out.request_id}: {out.error}")
        else:
            done[out.request_id] = len(out.generated_tokens)
    return done, failed


def _finished(out: Any) -> bool:
    if hasattr(out, "is_finished"):
        return bool(out.is_finished())
    return str(getattr(out, "status", "")).upper().endswith("FINISHED")


@torch.inference_mode()
def hf_static(model: torch.nn.Module, reqs: list[tuple[list[int], int]], batch: int, budget_s: float) -> dict[str, Any]:
    """Static batches in arrival order, left-padded, each run to its longest output (min_new_tokens
    stands in for ignore_eos); counts requested tokens only. Batches run while the budget lasts."""
    device = next(model.parameters()).device

    def generate(chunk: list[tuple[list[int], int]]) -> None:
        width = max(len(p) for p, _ in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, _) in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        longest = max(n for _, n in chunk)
        model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=longest,
                       min_new_tokens=longest, do_sample=False, pad_token_id=0)

    generate([(reqs[0][0][:64], 8)])  # warm-up
    sync(str(device.type))
    t0 = time.perf_counter()
    done, counted, last = 0, 0, 0.0
    for i in range(0, len(reqs), batch):
        if done and time.perf_counter() - t0 + last > budget_s:
            break
        t = time.perf_counter()
        chunk = reqs[i : i + batch]
        generate(chunk)
        sync(str(device.type))
        last = time.perf_counter() - t
        done += len(chunk)
        counted += sum(n for _, n in chunk)
    elapsed = time.perf_counter() - t0
    return {
        "mode": f"static batches of {batch} (generate, left-padded, each to its longest output)",
        "output_tokens": counted, "elapsed_s": elapsed, "output_tokens_per_s": counted / elapsed,
        "requests_finished": done, "complete": done == len(reqs), "budget_s": budget_s,
    }


# --- results -------------------------------------------------------------------------------


def target(name: str, value: float | None, goal: float, op: str = ">=", met: bool | None = None) -> dict[str, Any]:
    if met is None and value is not None and not math.isnan(value):
        met = value >= goal if op == ">=" else value <= goal
    return {"name": name, "value": value, "target": f"{op} {goal}", "met": bool(met) if met is not None else False}


def clean(x: Any) -> Any:
    """JSON-safe, floats to 5 significant digits (relative errors are ~1e-7): NaN/inf become
    strings, so the file stays valid JSON."""
    if isinstance(x, float):
        return float(f"{x:.5g}") if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def write(path: str, doc: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(clean(doc), f, indent=2)
    os.replace(tmp, path)  # a reader never sees half a file, even if the run is killed mid-write


def header(plan: Plan) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    on_gpu = plan.device == "cuda"
    return {
        "benchmark": "gpu",
        "smoke": plan.smoke,
        "device": torch.cuda.get_device_name(0) if on_gpu else f"cpu: {platform.processor() or platform.machine()}",
        "torch": torch.__version__,
        "triton": triton_version,
        "triton_interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "transformers": transformers_version,
        "bandwidth_definition": BANDWIDTH_DEFINITION,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def table(doc: dict[str, Any]) -> str:
    rows = ["| section | figure | value | target | met |", "|---|---|---|---|---|"]
    for t in doc["targets"]:
        value = "—" if t["value"] is None else f"{t['value']:.4g}"
        rows.append(f"| {t['section']} | {t['name']} | {value} | {t['target']} | {'yes' if t['met'] else 'no'} |")
    for name, sec in doc["sections"].items():
        if "error" in sec:
            rows.append(f"| {name} | error: {sec['error'][:100]} | | | |")
    bw = doc["sections"].get("bandwidth", {}).get("copy_bandwidth_gb_per_s")
    if bw:
        rows.append(f"| bandwidth | device-to-device copy, GB/s (read + write) | {bw:.1f} | | |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    ap.add_argument("--out", default=None, help=f"JSON path (default {RESULTS}; with --smoke a temp file)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, every section, CPU if there is no GPU")
    ap.add_argument("--hf-mode", choices=("auto", "continuous", "static"), default="auto",
                    help="transformers' side of e2e: continuous batching if it has it (auto), or force one")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="wall-clock budget of the whole run; e2e fits its two halves in what is left")
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
    out = args.out or (os.path.join(tempfile.gettempdir(), f"bench_gpu_smoke_{os.getpid()}.json")
                       if args.smoke else RESULTS)
    if any(s in selected for s in NEEDS_BANDWIDTH) and "bandwidth" not in selected:
        selected.insert(0, "bandwidth")
    selected = [s for s in SECTIONS if s in selected]  # bandwidth before the sections using it

    doc: dict[str, Any] = {**header(plan), "sections": {}, "targets": []}
    ctx: dict[str, Any] = {"deadline": start + args.budget_s}
    functions = {
        "correctness": section_correctness, "bandwidth": section_bandwidth,
        "decode_attention": section_decode_attention, "prefill_attention": section_prefill_attention,
        "decode_step": section_decode_step, "e2e": section_e2e,
    }
    for name in selected:
        t0 = time.perf_counter()
        print(f"[{t0 - start:6.1f}s] {name} ...", flush=True)
        try:
            if name in NEEDS_BANDWIDTH and "copy_bw" not in ctx:
                raise RuntimeError("no copy bandwidth: the bandwidth section failed")
            sec = functions[name](plan, ctx)
        except Exception as e:  # noqa: BLE001 - record it, go on with the next section
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
