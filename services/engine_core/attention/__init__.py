"""Attention backends and the choice between them."""

from __future__ import annotations

import logging
import os

import torch

from services.engine_core.attention.base import AttentionBackend, AttentionMetadata
from services.engine_core.attention.batch_invariant import BatchInvariantTorchBackend
from services.engine_core.attention.torch_backend import TorchAttentionBackend

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "BatchInvariantTorchBackend",
    "TorchAttentionBackend",
    "get_backend",
    "triton_interpreter_enabled",
]

log = logging.getLogger(__name__)

BACKEND_NAMES = ("auto", "torch", "triton")


def triton_interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET asks Triton to run kernels on the CPU (as Triton itself reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def get_backend(name: str, device: torch.device | str, batch_invariant: bool = False) -> AttentionBackend:
    """'auto': triton on CUDA (torch if triton is not installed), torch elsewhere. 'triton' on a
    CPU device only runs under the Triton interpreter (TRITON_INTERPRET=1, tests).
    batch_invariant: the torch backend attends every query row in one canonical form (batch_invariant.py)."""
    device = torch.device(device)
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "auto":
        if device.type != "cuda":
            return _torch_backend(batch_invariant)
        try:
            return _triton_backend(device)
        except ImportError as e:
            log.warning("triton is not importable (%s): using the torch attention backend on %s", e, device)
            return _torch_backend(batch_invariant)
    if name == "torch":
        return _torch_backend(batch_invariant)
    if device.type != "cuda" and not triton_interpreter_enabled():
        raise ValueError(
            f"the triton attention backend needs a CUDA device, not {device} "
            "(or TRITON_INTERPRET=1 to run its kernels, slowly, on the CPU); use --attention-backend torch"
        )
    try:
        return _triton_backend(device)
    except ImportError as e:
        raise RuntimeError(f"the triton attention backend needs the triton package: {e}") from e


def _torch_backend(batch_invariant: bool) -> AttentionBackend:
    return BatchInvariantTorchBackend() if batch_invariant else TorchAttentionBackend()


def _triton_backend(device: torch.device) -> AttentionBackend:
    # Imported on demand: triton is optional, and importing it defines the kernels, which must
    # happen after TRITON_INTERPRET is settled.
    from services.engine_core.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend(device)
