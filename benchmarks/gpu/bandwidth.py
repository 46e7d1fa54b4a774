"""The copy bandwidth every ratio divides by, and what it means."""

from __future__ import annotations

from typing import Any

import torch
from common import kernel_ms
from plan import Plan

BANDWIDTH_DEFINITION = (
    "bytes moved per second by dst.copy_(src) between two device tensors: 2 x the tensor's size "
    "(every byte is read once and written once) over the median copy time. DRAM serves reads and "
    "writes from the same bandwidth, so this is the achievable rate of reading memory; every ratio "
    "divides bytes READ (K/V, weights) by it: decode_attention = (K/V bytes read / kernel time) / "
    "copy bandwidth; decode_step roofline time = (weight bytes + K/V bytes read) / copy bandwidth."
)


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
