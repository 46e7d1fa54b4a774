"""A random-weight Qwen3 that can think: the bundled tokenizer plus single `<think>` and
`</think>` tokens, with a Qwen3-style (the model opens its thinking) or DeepSeek-R1-style
(the prompt opens it) chat template. Its tokens are forced with logit_bias in the tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import tokenizers

from services.tokenizer_pool.tokenizer import load_tokenizer
from shared.config import EngineConfig

ROOT = Path(__file__).resolve().parents[2]
THINK, END_THINK = 49152, 49153
"""Their ids: the first two after the bundled vocabulary."""
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
R1_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


def build(root: Path, template: str) -> tuple[str, str]:
    """(the model's config.json, its tokenizer directory) under root."""
    root.mkdir(parents=True, exist_ok=True)
    config = json.loads((ROOT / "shared" / "model_configs" / "tiny-qwen3.json").read_text())
    config.update(vocab_size=49216, max_position_embeddings=1024)
    model = root / "config.json"
    model.write_text(json.dumps(config))
    tok_dir = root / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    backend = tokenizers.Tokenizer.from_str(load_tokenizer(EngineConfig()).backend.to_str())
    added = [tokenizers.AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")]
    backend.add_tokens(added)
    assert [backend.token_to_id("<think>"), backend.token_to_id("</think>")] == [THINK, END_THINK]
    backend.save(os.fspath(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "chat_template": template,
                "eos_token": "<|im_end|>",
                "bos_token": None,
            }
        )
    )
    return os.fspath(model), os.fspath(tok_dir)
