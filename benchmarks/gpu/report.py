"""The run's JSON document (header, atomic rewrite) and the markdown table printed at the end."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from typing import Any

import torch
from bandwidth import BANDWIDTH_DEFINITION
from plan import Plan


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
