"""A pure-decode engine step of the whole model against its roofline: (weight bytes + K/V bytes
read) / copy bandwidth, with CUDA graphs and eager."""

from __future__ import annotations

import random
import statistics
import time
import traceback
from typing import Any

import torch
from common import decode_graphs, engine_config, free_device_memory, graphs_active, sync, target
from plan import Plan


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
            except Exception as e:  # the other model/mode still gets measured
                run = {
                    "model": model,
                    "enforce_eager": eager,
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc(limit=5),
                }
            runs.append(run)
            free_device_memory()
            if eager:
                continue
            for case in run.get("cases", []):
                targets.append(
                    target(
                        f"decode step roofline fraction, {model}, batch {case['batch']}",
                        case["roofline_fraction"],
                        0.60,
                    )
                )
            if "error" in run:
                targets.append(target(f"decode step roofline fraction, {model}", None, 0.60))
    return {
        "prompt_len": plan.step_prompt_len,
        "timed_steps": plan.step_timed,
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
        plan,
        model,
        max_num_seqs=max_batch,
        max_num_batched_tokens=8192 if not plan.smoke else 256,
        max_model_len=2 * plan.step_prompt_len + 256,
        gpu_memory_utilization=0.4,
        enforce_eager=eager,
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
            if (
                len(sched.running) == batch
                and not sched.waiting
                and all(r.num_output_tokens >= 1 for r in sched.running)
            ):
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
        cases.append(
            {
                "batch": batch,
                "step_ms": step_s * 1e3,
                "step_ms_min": min(times) * 1e3,
                "tokens_per_s": batch / step_s,
                "weight_bytes": weights,
                "kv_bytes": kv,
                "roofline_ms": roofline_s * 1e3,
                "roofline_fraction": roofline_s / step_s,
                "graph_replays": replays[0] - replays_before,
            }
        )
    result = {
        "model": model,
        "enforce_eager": eager,
        "cuda_graphs": graphs_active(runner),
        "attention_backend": runner.backend.name,
        "dtype": str(runner.dtype).removeprefix("torch."),
        "engine_init_s": init_s,
        "cases": cases,
    }
    del engine, runner, sched
    return result
