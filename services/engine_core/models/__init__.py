"""Model registry: every supported architecture is a variant of the one Llama-family model."""

from __future__ import annotations

import torch

from services.engine_core.model_config import SUPPORTED_ARCHITECTURES, ModelConfig
from services.engine_core.models.llama import CausalLM, WeightError

__all__ = ["CausalLM", "WeightError", "build_model"]


def build_model(
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    max_positions: int | None = None,
    weight_dtype: torch.dtype | None = None,
) -> CausalLM:
    """An uninitialised model (fill it with CausalLM.load_weights or random init); weight_dtype:
    its large matrices' dtype, if not dtype (CausalLM)."""
    if cfg.architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"no model for architecture {cfg.architecture!r}")
    return CausalLM(cfg, dtype=dtype, device=device, max_positions=max_positions, weight_dtype=weight_dtype)
