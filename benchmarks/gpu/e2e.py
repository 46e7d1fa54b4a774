"""End to end: nano-vllm's offline workload through our engine and through transformers on the
same device (its continuous batching where the version has it, else static batches)."""

from __future__ import annotations

import inspect
import json
import os
import random
import tempfile
import time
import traceback
from typing import Any

import torch
from common import engine_config, free_device_memory, graphs_active, sync, target
from plan import CONFIGS, Plan


def section_e2e(plan: Plan, ctx: dict[str, Any]) -> dict[str, Any]:
    with open(os.path.join(CONFIGS, plan.e2e_model + ".json")) as f:
        top_id = min(10000, json.load(f)["vocab_size"] - 1)
    rng = random.Random(0)  # nano-vllm's bench.py: seed 0, prompt ids in [0, 10000]
    reqs = [
        ([rng.randint(0, top_id) for _ in range(rng.randint(*plan.e2e_input))], rng.randint(*plan.e2e_output))
        for _ in range(plan.e2e_seqs)
    ]
    remaining = ctx["deadline"] - time.perf_counter()
    engine_budget = max(10.0, min(plan.engine_budget_s, remaining - 60))
    try:
        ours = e2e_engine(plan, reqs, engine_budget)
    except Exception as e:  # transformers' figure is still worth recording
        ours = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=5)}
    free_device_memory()
    remaining = ctx["deadline"] - time.perf_counter()
    hf_budget = max(10.0, min(plan.hf_budget_s, remaining - 30))
    try:
        hf = e2e_transformers(plan, reqs, hf_budget)
    except Exception as e:  # keep our own figure
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
        "novainfer": ours,
        "transformers": hf,
        "speedup": ratio,
        "targets": [target("end-to-end output tok/s vs transformers", ratio, 3.0)],
    }


def e2e_engine(plan: Plan, reqs: list[tuple[list[int], int]], budget_s: float) -> dict[str, Any]:
    """Our engine stepped directly (the offline LLM's loop without its tokenizer: a random-weight
    config borrows the bundled model's tokenizer, which a bare GPU image lacks)."""
    from services.engine_core.engine import LLMEngine
    from shared.protocol import SamplingParams

    cfg = engine_config(
        plan,
        plan.e2e_model,
        max_num_seqs=256 if not plan.smoke else 8,
        max_num_batched_tokens=16384 if not plan.smoke else 256,
        max_model_len=4096 if not plan.smoke else None,
        gpu_memory_utilization=0.6,
    )
    t0 = time.perf_counter()
    engine = LLMEngine(cfg)
    init_s = time.perf_counter() - t0

    def run(batch: list[tuple[list[int], int]], prefix: str, deadline: float) -> tuple[int, float, bool]:
        ids = [f"{prefix}-{i}" for i in range(len(batch))]
        t = time.perf_counter()
        for rid, (prompt, n) in zip(ids, batch, strict=True):
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
        "output_tokens": produced,
        "elapsed_s": elapsed,
        "output_tokens_per_s": produced / elapsed,
        "complete": complete,
        "budget_s": budget_s,
        "engine_init_s": init_s,
        "cuda_graphs": graphs_active(engine.runner),
        "max_num_seqs": cfg.max_num_seqs,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
    }
    if complete and produced != sum(n for _, n in reqs):
        result["warning"] = f"produced {produced} tokens, requested {sum(n for _, n in reqs)}"
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
            except Exception as e:  # its API moved between versions: static batches then
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


def hf_continuous(
    model: torch.nn.Module, reqs: list[tuple[list[int], int]], budget_s: float, warmup: bool
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

            kwargs["workload_hints"] = WorkloadHints(
                max_prompt_length=max(len(p) for p, _ in reqs),
                max_generated_length=gen.max_new_tokens,
                num_requests=len(reqs),
            )
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
        "output_tokens": produced,
        "elapsed_s": elapsed,
        "output_tokens_per_s": produced / elapsed,
        "requests_finished": finished,
        "requests_failed": len(failed),
        "failures": failed[:3],
        "complete": finished == len(reqs),
        "budget_s": budget_s,
        "warmup_s": warmup_s,
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
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        longest = max(n for _, n in chunk)
        model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=longest,
            min_new_tokens=longest,
            do_sample=False,
            pad_token_id=0,
        )

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
        "output_tokens": counted,
        "elapsed_s": elapsed,
        "output_tokens_per_s": counted / elapsed,
        "requests_finished": done,
        "complete": done == len(reqs),
        "budget_s": budget_s,
    }
