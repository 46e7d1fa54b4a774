"""The attention kernels on their own: correctness against the torch reference, decode attention
against the copy bandwidth, prefill attention against torch SDPA, all on paged batches shaped as
a long-running engine's are.

Project modules are imported inside the functions: Triton reads TRITON_INTERPRET when a kernel
module is imported, and bench_gpu.py settles it first."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from common import free_device_memory, kernel_ms, rel_error, target
from plan import Plan

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
    query_lens: list[int],
    context_lens: list[int],
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    poison: bool = True,
) -> PagedInputs:
    """One step's batch over a paged cache whose blocks are handed out in shuffled order, as a
    long-running engine's are. With poison, every slot but the requests' cached context holds
    NaN, so reading one the kernel should not turns its output NaN; without, the whole cache is
    random (timing runs: filling by slot would take longer than the benchmark). query/key/value
    are strided views of one fused qkv tensor, as the model's projection gives them."""
    from services.engine_core.attention.base import AttentionMetadata

    cpu_gen = torch.Generator().manual_seed(0)
    dev_gen = torch.Generator(device=device).manual_seed(0)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
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
    new_slots = torch.cat([slots(i, c, s) for i, (c, s) in enumerate(zip(context_lens, seq_lens, strict=True))])
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    i32 = dict(dtype=torch.int32, device=device)
    md = AttentionMetadata(
        num_reqs=len(seq_lens),
        num_tokens=num_tokens,
        query_start_loc=torch.tensor(starts, **i32),
        seq_lens=torch.tensor(seq_lens, **i32),
        block_tables=tables.to(device),
        slot_mapping=new_slots.to(device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=seq_lens,
    )
    return PagedInputs(query, key, value, k_cache, v_cache, md, head_dim**-0.5)


def run_kernel(b: PagedInputs, num_splits: int, out: torch.Tensor) -> torch.Tensor:
    from services.engine_core.attention.triton_kernels import paged_attention

    md = b.md
    return paged_attention(
        b.query,
        b.k_cache,
        b.v_cache,
        md.block_tables,
        md.seq_lens,
        md.query_start_loc,
        md.max_query_len,
        b.scale,
        num_splits=num_splits,
        out=out,
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
            b = paged_inputs(
                q_lens,
                c_lens,
                heads=heads,
                kv_heads=kv_heads,
                head_dim=head_dim,
                block_size=plan.block_size,
                dtype=plan.attn_dtype,
                device=plan.device,
            )
            write_kv_cache(b.key, b.value, b.k_cache, b.v_cache, b.md.slot_mapping)
            # The write must store this step's rows bit for bit at their slots.
            stored = b.k_cache.view(-1, kv_heads, head_dim)[b.md.slot_mapping]
            write_exact = bool(torch.equal(stored, b.key)) and bool(
                torch.equal(b.v_cache.view(-1, kv_heads, head_dim)[b.md.slot_mapping], b.value)
            )
            out = torch.full(b.query.shape, float("nan"), dtype=b.query.dtype, device=plan.device)
            run_kernel(b, splits, out)
            ref = reference_attention(b.query, b.k_cache, b.v_cache, b.md, b.scale)
            torch_out = TorchAttentionBackend().forward(b.query, b.key, b.value, b.k_cache, b.v_cache, b.md, b.scale)
            cases.append(
                {
                    "shape": f"{heads}q/{kv_heads}kv/d{head_dim}",
                    "batch": name,
                    "num_splits": splits,
                    "rel_error_vs_reference": rel_error(out, ref),
                    "rel_error_vs_torch_backend": rel_error(out, torch_out),
                    "torch_backend_rel_error_vs_reference": rel_error(torch_out, ref),
                    "kv_write_exact": write_exact,
                }
            )
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
        "targets": [
            target("Triton kernels vs torch reference, max rel. error", worst, plan.rel_tolerance, "<=", met=ok)
        ],
    }


def section_decode_attention(plan: Plan, ctx: dict[str, Any]) -> dict[str, Any]:
    from services.engine_core.attention.triton_backend import choose_num_splits
    from services.engine_core.attention.triton_kernels import write_kv_cache

    bw = ctx["copy_bw"]
    elem = torch.empty((), dtype=plan.attn_dtype).element_size()
    cases, how = [], ""
    for batch, context in plan.decode_cases:
        b = paged_inputs(
            [1] * batch,
            [context - 1] * batch,
            heads=plan.heads,
            kv_heads=plan.kv_heads,
            head_dim=plan.head_dim,
            block_size=plan.block_size,
            dtype=plan.attn_dtype,
            device=plan.device,
            poison=False,
        )
        write_kv_cache(b.key, b.value, b.k_cache, b.v_cache, b.md.slot_mapping)
        # The split count the backend would pick for this step.
        splits = choose_num_splits(batch, plan.kv_heads, 1, context, num_sms(plan.device))
        out = torch.empty_like(b.query)
        ms, how = kernel_ms(functools.partial(run_kernel, b, splits, out), plan.device)
        kv_bytes = batch * context * plan.kv_heads * plan.head_dim * 2 * elem  # K and V
        read_bw = kv_bytes / (ms / 1e3)
        cases.append(
            {
                "batch": batch,
                "context": context,
                "num_splits": splits,
                "kernel_us": ms * 1e3,
                "kv_bytes_read": kv_bytes,
                "kv_read_gb_per_s": read_bw / 1e9,
                "fraction_of_copy_bandwidth": read_bw / bw,
            }
        )
        del b, out
        free_device_memory()
    head = cases[0]
    return {
        "shape": f"{plan.heads} query heads, {plan.kv_heads} KV heads, head_dim {plan.head_dim}, "
        f"{str(plan.attn_dtype).removeprefix('torch.')}, block_size {plan.block_size}, shuffled block tables",
        "cases": cases,
        "timing": how,
        "targets": [
            target(
                f"decode attention K/V read / copy bandwidth, batch {head['batch']} x context {head['context']}",
                head["fraction_of_copy_bandwidth"],
                0.70,
            )
        ],
    }


def section_prefill_attention(plan: Plan, ctx: dict[str, Any]) -> dict[str, Any]:
    from services.engine_core.attention.triton_kernels import write_kv_cache

    seqs, tokens = plan.prefill
    h, kv, d = plan.heads, plan.kv_heads, plan.head_dim
    b = paged_inputs(
        [tokens] * seqs,
        [0] * seqs,
        heads=h,
        kv_heads=kv,
        head_dim=d,
        block_size=plan.block_size,
        dtype=plan.attn_dtype,
        device=plan.device,
        poison=False,
    )
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
        "sequences": seqs,
        "tokens_each": tokens,
        "ours_us": ours_ms * 1e3,
        "sdpa_us": sdpa_ms * 1e3,
        "ours_tflop_per_s": flops / (ours_ms / 1e3) / 1e12,
        "sdpa_tflop_per_s": flops / (sdpa_ms / 1e3) / 1e12,
        "speed_vs_sdpa": ratio,
        "sdpa_variant": variant,
        "rel_error_vs_sdpa": rel_error(out, ref),
        "timing": how,
        "targets": [target(f"prefill attention speed vs SDPA flash, {seqs} x {tokens} tokens", ratio, 0.80)],
    }


def sdpa_flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, device: str
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
        except Exception as e:  # try the next form
            errors.append(f"{name}: {e}")
    raise RuntimeError("no SDPA flash variant runs here: " + "; ".join(errors))
