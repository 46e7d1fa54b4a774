"""The model facts both processes take from shared/model_info.py: context length and EOS ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.config import EngineConfig
from shared.model_files import bundled_model_path, resolve_model
from shared.model_info import eos_token_ids, max_model_len, model_info


def test_gguf_eos_is_eos_eot_and_eom() -> None:
    info = model_info(resolve_model(bundled_model_path()))
    assert (info.context_length, info.vocab_size, info.eos_token_ids) == (8192, 49152, [2])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "smollm2"])
def test_max_model_len_is_capped_at_the_models_own(name: str) -> None:
    own = model_info(resolve_model(name)).context_length
    assert max_model_len(EngineConfig(model=name)) == own
    assert max_model_len(EngineConfig(model=name, max_model_len=64)) == 64
    assert max_model_len(EngineConfig(model=name, max_model_len=own * 2)) == own


def _hf_dir(tmp_path: Path, config_eos: object, generation_eos: object | None) -> Path:
    (tmp_path / "config.json").write_text(
        json.dumps({**resolve_model("tiny-llama").hf_config(), "eos_token_id": config_eos})
    )
    (tmp_path / "model.safetensors").write_bytes(b"")  # only its presence matters here
    if generation_eos is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    return tmp_path


def test_generation_config_replaces_config_json_eos(tmp_path: Path) -> None:
    """As transformers' generate() reads them: generation_config.json's list, when there is one."""
    model = resolve_model(str(_hf_dir(tmp_path, 2, [7, 8])))
    assert eos_token_ids(model) == [7, 8]
    assert eos_token_ids(model, tokenizer_eos=9) == [7, 8, 9]
    assert eos_token_ids(model, tokenizer_eos=9, own_tokenizer=False) == [7, 8]


def test_config_json_eos_without_generation_config(tmp_path: Path) -> None:
    assert eos_token_ids(resolve_model(str(_hf_dir(tmp_path, [3, 4], None)))) == [3, 4]
