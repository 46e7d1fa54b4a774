"""The fused step's start-up probes (decode.py: dense_calls, position_invariant_block), cached on disk.

The probes multiply random rows by the model's dense weights a few thousand times to learn how this
CPU's GEMM rounds by row count. Alone that takes ~1.5 s at start-up; when engines start side by side
(two data-parallel replicas on one machine, a restart beside a running engine) their OpenMP threads
oversubscribe the cores and the same small calls took ~45 s on a 2-core VM. What they find depends
only on the machine, the libraries and the call shapes, not on the weights' values, so it is kept
under the cache directory, keyed by all of those, and a later start reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from collections.abc import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_VERSION = 1
"""Bumped whenever what the probes check changes (decode.py), so older results are not reused."""


def _cpu_identity() -> str:
    """The CPU's model name and flags (the GEMM libraries choose kernels by them)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor()


def probe_key(weights: list[Tensor]) -> str:
    """A hash of everything the probes' answer depends on."""
    what = {
        "version": _VERSION,
        "cpu": _cpu_identity(),
        "torch": torch.__version__,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in ("MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")},
        "weights": [(tuple(w.shape), str(w.dtype)) for w in weights],
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def cached_probes(
    cache_dir: str | None, weights: list[Tensor], probe: Callable[[], tuple[int, int, int]]
) -> tuple[int, int, int]:
    """probe()'s answer (row multiple, dense chunk, prefill block) for these weights on this machine:
    read from cache_dir when an earlier start found it, else probed and written there (None: no
    cache, always probed)."""
    if cache_dir is None:
        return probe()
    path = os.path.join(cache_dir, "fused_cpu", "probes", probe_key(weights) + ".json")
    try:
        with open(path) as f:
            found = json.load(f)
        multiple, chunk, block = int(found["row_multiple"]), int(found["dense_chunk"]), int(found["prefill_block"])
        return multiple, chunk, block
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not probed yet here (or an unreadable file): probe
    multiple, chunk, block = probe()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Written whole and renamed: an engine starting beside this one reads all of it or nothing.
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"row_multiple": multiple, "dense_chunk": chunk, "prefill_block": block}, f)
        os.replace(tmp, path)
    except OSError as e:
        log.info("could not cache the fused step's probes in %s (%s): they run again at the next start", path, e)
    return multiple, chunk, block
