"""The int4 copies in the fused step's layout (int4_matmul.py repack), cached on disk.

Repacking SmolLM2's 120 int4 matrices from torch's layout into the fused kernel's takes ~0.6 s at
every start (unpacking torch's nibbles and packing them again), about half of a warm start-up.
The repacked tensors depend only on the int4 copies' bytes and the layout, so they are kept under
the cache directory, keyed by a hash of exactly those (sha256 over SmolLM2's ~60 MB of int4
bytes: ~35 ms), and a later start reads them from there instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence

import torch
from safetensors import safe_open
from torch import Tensor

from services.engine_core.fused_cpu.int4_matmul import LAYOUT_VERSION, repack
from services.engine_core.models.int4 import Int4Weight
from services.engine_core.weight_loader import save_atomically

log = logging.getLogger(__name__)


def repack_key(weights: Sequence[Int4Weight]) -> str:
    """A hash of everything the repacked tensors depend on: the layout, each copy's bytes and the
    CPU capability torch's int4 kernels run at, whose packed layout gives those bytes their
    meaning (unpack_q reads them as this capability's kernels do: ATEN_CPU_CAPABILITY=avx2 on an
    AVX-512 CPU packs the same weights into other bytes, and reads the same bytes as other weights)."""
    capability = torch.backends.cpu.get_cpu_capability()
    h = hashlib.sha256(f"int4 layout v{LAYOUT_VERSION}|{capability}|{len(weights)}".encode())
    for w in weights:
        for t in (w.packed, w.scales_zeros):
            h.update(f"|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:24]


def cached_repack(cache_dir: str | None, weights: Sequence[Int4Weight]) -> list[tuple[Tensor, Tensor]]:
    """repack(w) for each of weights: read from cache_dir when an earlier start wrote it, else
    repacked and written there (None: no cache, always repacked)."""
    if cache_dir is None:
        return [repack(w) for w in weights]
    path = os.path.join(cache_dir, "fused_cpu", "int4", repack_key(weights) + ".safetensors")
    if os.path.isfile(path):
        try:
            with safe_open(path, framework="pt") as f:
                return [(f.get_tensor(f"{i}.packed"), f.get_tensor(f"{i}.scales_zeros")) for i in range(len(weights))]
        except Exception as e:  # a truncated or foreign file: repack (and rewrite it)
            log.warning("ignoring unreadable repacked int4 cache %s: %s", path, e)
    repacked = [repack(w) for w in weights]
    tensors = {}
    for i, (packed, scales_zeros) in enumerate(repacked):
        tensors[f"{i}.packed"], tensors[f"{i}.scales_zeros"] = packed, scales_zeros
    save_atomically(path, tensors, {}, "the fused step's int4 layout")
    return repacked
