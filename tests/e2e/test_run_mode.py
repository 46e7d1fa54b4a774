"""`novainfer serve` out of the box: the mode the CPU defaults resolve to is the one /v1/models
reports, and it serves. Its greedy text is not asserted: matching a reference token for token is
the exact mode's guarantee (the session server of conftest.py runs --exact); the fast mode may
flip near-ties (benchmarks/decode_agreement.py reports how often)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import openai
import torch

from services.engine_core.run_mode import cpu_has_native_bf16
from tests.e2e.conftest import start_server

MODEL = "SmolLM2-135M-Instruct"


def test_default_mode_is_reported_and_serves(tmp_path: Path) -> None:
    server = start_server(str(tmp_path))
    try:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        # /health answered 200, so every engine has reported, and with it its mode.
        (card,) = client.models.list().data
        # The bundled model is a Q4_1 GGUF: int4 copies of its layers and an int8 LM head on a CPU,
        # and, where a C++ compiler built the fused kernels, the fused step with bf16 activations
        # (its dense weights fp32 on a CPU without native bf16); else bf16 or float32 eagerly.
        if torch.cuda.is_available():
            expected = "bfloat16"
        elif shutil.which(os.environ.get("CXX", "c++")) is not None:
            expected = "bfloat16+int4+int8-lm-head+fused-decode" + ("" if cpu_has_native_bf16() else "+fp32-dense")
        else:
            expected = ("bfloat16" if cpu_has_native_bf16() else "float32") + "+int4+int8-lm-head"
        assert card.to_dict()["run_mode"] == expected
        resp = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
        )
        assert resp.choices[0].message.content and resp.choices[0].finish_reason in ("stop", "length")
        assert 0 < resp.usage.completion_tokens <= 24
    finally:
        server.stop()
    assert server.proc.returncode == 0
