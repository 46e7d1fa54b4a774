"""Helpers more than one section uses: timing, device sync and cleanup, relative error, target
records, and building an engine (and telling whether it runs CUDA graphs)."""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from plan import CONFIGS, Plan

if TYPE_CHECKING:  # a project module: imported at run time only inside a section (see bench_gpu.py)
    from shared.config import EngineConfig


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
    except Exception as e:  # capture can fail on some stacks; events still work
        ms = float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        return ms, f"triton.testing.do_bench, median, L2 flushed (graph capture failed: {e})"


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp32; NaN if out holds any NaN."""
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def target(name: str, value: float | None, goal: float, op: str = ">=", met: bool | None = None) -> dict[str, Any]:
    """One figure against its goal, for the JSON and the table. met overrides the comparison where the
    verdict needs more than the value (correctness: exact K/V writes too); no value or NaN is not met."""
    if met is None and value is not None and not math.isnan(value):
        met = value >= goal if op == ">=" else value <= goal
    return {"name": name, "value": value, "target": f"{op} {goal}", "met": bool(met) if met is not None else False}


def engine_config(plan: Plan, model: str, **overrides: Any) -> EngineConfig:
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
