from __future__ import annotations

import json
import os
from typing import Any

import pytest

from services.tokenizer_pool import tokenizer as tokenizer_module
from services.tokenizer_pool.tokenizer import Tokenizer, load_tokenizer
from shared.config import EngineConfig
from shared.model_files import bundled_model_path

TEXTS = [
    "Hello, world!",
    "  leading spaces\nand\ttabs",
    "héllo wörld 😀🇫🇷 日本語のテキスト",
    "<|im_start|>user\nspecial tokens in text<|im_end|>",
    "x" * 300,
    "",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer() -> Any:
    """transformers' own tokenizer built from the GGUF: the reference."""
    from transformers import AutoTokenizer

    directory, name = os.path.split(bundled_model_path())
    return AutoTokenizer.from_pretrained(directory, gguf_file=name)


def test_cache_hit_skips_the_conversion_and_is_identical(
    smol_tokenizer: Tokenizer, tokenizer_cache_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hit must not rebuild the tokenizer through transformers (the slow part: seconds).
    # Checked by what runs, not by a timing, which a loaded machine would make flaky.
    def rebuild(*_: object) -> None:
        raise AssertionError("a cache hit rebuilt the tokenizer")

    monkeypatch.setattr(tokenizer_module, "_build_cache_entry", rebuild)
    cached = load_tokenizer(EngineConfig(cache_dir=tokenizer_cache_dir))
    for text in TEXTS:
        assert cached.encode(text) == smol_tokenizer.encode(text)
    assert cached.chat_template == smol_tokenizer.chat_template
    assert cached.eos_token_ids == smol_tokenizer.eos_token_ids
    assert cached.max_model_len == smol_tokenizer.max_model_len


def test_gguf_model_facts(smol_tokenizer: Tokenizer, tokenizer_cache_dir: str) -> None:
    # transformers' GenerationConfig for this GGUF has eos_token_id 2: <|im_end|>, the end of a chat turn.
    assert smol_tokenizer.eos_token_ids == [2]
    assert smol_tokenizer.decode([2], skip_special_tokens=False) == "<|im_end|>"
    assert smol_tokenizer.max_model_len == 8192
    assert smol_tokenizer.vocab_size == 49152
    limited = load_tokenizer(EngineConfig(cache_dir=tokenizer_cache_dir, max_model_len=512))
    assert limited.max_model_len == 512


def test_matches_transformers(smol_tokenizer: Tokenizer, hf_tokenizer: Any) -> None:
    for text in TEXTS:
        ids = smol_tokenizer.encode(text)
        assert ids == hf_tokenizer.encode(text)
        for skip in (True, False):
            assert smol_tokenizer.decode(ids, skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)
    for chat in CHATS:
        for add_generation_prompt in (True, False):
            expected = hf_tokenizer.apply_chat_template(
                chat, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
            )
            assert smol_tokenizer.apply_chat_template(chat, add_generation_prompt) == list(expected)
    rendered = smol_tokenizer.render_chat(CHATS[0])
    assert rendered.endswith("<|im_start|>assistant\n")


def test_token_bytes_and_text(smol_tokenizer: Tokenizer) -> None:
    for text in TEXTS:
        ids = smol_tokenizer.encode(text)
        assert b"".join(smol_tokenizer.token_bytes(i) for i in ids) == text.encode()
    hello = smol_tokenizer.encode(" hello")
    assert [smol_tokenizer.token_text(i) for i in hello] == [" hello"]
    assert smol_tokenizer.token_bytes(2) == b"<|im_end|>"
    # An emoji is split over byte tokens; a partial sequence is shown OpenAI's way.
    parts = [smol_tokenizer.token_text(i) for i in smol_tokenizer.encode("😀")]
    assert all(p.startswith("bytes:\\x") for p in parts)
    assert smol_tokenizer.token_bytes(10**6) == b"" and smol_tokenizer.token_text(-1) == ""


def test_random_weight_config_borrows_bundled_tokenizer(tmp_path: Any, tokenizer_cache_dir: str) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 60000,
        "max_position_embeddings": 1024,
        "eos_token_id": 5,
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(config))
    tok = load_tokenizer(EngineConfig(model=str(path), cache_dir=tokenizer_cache_dir))
    assert tok.max_model_len == 1024 and tok.vocab_size == 60000 and tok.eos_token_ids == [5]
    # Ids the model can sample but the tokenizer lacks decode to nothing.
    assert tok.decode([59999, 28, -3]) == tok.decode([28])
    assert tok.encode("Hello") == [19556]


def test_hf_directory(tmp_path: Any, hf_tokenizer: Any, tokenizer_cache_dir: str) -> None:
    model_dir = tmp_path / "model"
    hf_tokenizer.save_pretrained(str(model_dir))
    (model_dir / "config.json").write_text(
        json.dumps({"vocab_size": 49152, "max_position_embeddings": 2048, "eos_token_id": 2})
    )
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (model_dir / "model.safetensors").write_bytes(b"")
    tok = load_tokenizer(EngineConfig(model=str(model_dir), cache_dir=tokenizer_cache_dir))
    assert tok.max_model_len == 2048
    assert tok.eos_token_ids == [2, 0]
    for chat in CHATS:
        assert tok.apply_chat_template(chat) == list(
            hf_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        )


def test_no_chat_template_is_a_clear_error(smol_tokenizer: Tokenizer) -> None:
    plain = Tokenizer(smol_tokenizer.backend, eos_token_ids=[2], max_model_len=100)
    with pytest.raises(ValueError, match="chat template"):
        plain.apply_chat_template(CHATS[0])


def test_template_features_transformers_provides(smol_tokenizer: Tokenizer) -> None:
    template = (
        "{% for m in messages %}{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}"
        "{% if messages | length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
    )
    tok = Tokenizer(smol_tokenizer.backend, eos_token_ids=[2], max_model_len=100, chat_template=template)
    assert tok.render_chat([{"role": "user", "content": "é<b>"}]) == '{"role": "user", "content": "é<b>"}'
    with pytest.raises(ValueError, match="one message only"):
        tok.render_chat([{"role": "user", "content": "a"}] * 2)
