from __future__ import annotations

import pytest

from services.tokenizer_pool.tokenizer import Tokenizer, load_tokenizer
from shared.config import EngineConfig


@pytest.fixture(scope="session")
def tokenizer_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh cache: the first load in the session is a real cold build."""
    return str(tmp_path_factory.mktemp("novainfer-cache"))


@pytest.fixture(scope="session")
def smol_tokenizer(tokenizer_cache_dir: str) -> Tokenizer:
    return load_tokenizer(EngineConfig(cache_dir=tokenizer_cache_dir))
