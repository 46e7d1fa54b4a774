from __future__ import annotations

import argparse
import os

import pytest

from shared.config import (
    Config,
    EngineConfig,
    ServeConfig,
    add_config_args,
    config_from_args,
    config_to_args,
    field_docs,
    parse_config,
    resolve_cache_dir,
)


def test_cli_over_env_over_default() -> None:
    env = {"NOVAINFER_PORT": "9001", "NOVAINFER_MAX_NUM_SEQS": "7"}
    parser_args = ["--port", "9002"]
    import argparse

    from shared.config import add_config_args

    p = argparse.ArgumentParser()
    add_config_args(p)
    config = config_from_args(p.parse_args(parser_args), env)
    assert config.serve.port == 9002
    assert config.engine.max_num_seqs == 7
    assert config.engine.block_size == 16


def test_roundtrip_through_args() -> None:
    config = parse_config(
        [
            "--model",
            "tiny-llama",
            "--no-enable-prefix-caching",
            "--tokenizer-addrs",
            "ipc://a,ipc://b",
            "--max-model-len",
            "128",
            "--heartbeat-s",
            "0.5",
        ]
    )
    assert config.engine.enable_prefix_caching is False
    assert config.serve.tokenizer_addrs == ["ipc://a", "ipc://b"]
    assert parse_config(config_to_args(config)) == config


def test_default_addresses_agree_across_processes() -> None:
    a = Config().with_default_addresses()
    b = Config().with_default_addresses()
    assert a == b
    assert a.serve.tokenizer_addrs and a.serve.engine_addrs and a.serve.gateway_addr


def test_bad_value_is_a_clear_error() -> None:
    with pytest.raises(SystemExit, match="max_num_seqs"):
        parse_config(["--max-num-seqs", "many"])


def test_empty_env_means_unset() -> None:
    assert config_from_args(None, {"NOVAINFER_API_KEY": ""}).serve.api_key is None


def test_help_shows_each_fields_doc_default_and_env() -> None:
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    text = " ".join(parser.format_help().split())
    assert "--quantization QUANTIZATION {auto,none,int4} auto: int4 on a CPU when" in text
    assert "(default: auto; env NOVAINFER_QUANTIZATION)" in text
    assert "Requests in flight past which the gateway answers 429. (default: 512; env" in text
    assert "--api-key API_KEY Bearer token required on /v1/*; unset: no auth. (default: unset;" in text
    for cls in (EngineConfig, ServeConfig):
        assert set(field_docs(cls)) == set(cls.__struct_fields__), cls.__name__


def test_literal_fields_refuse_other_values() -> None:
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "awq"])
    with pytest.raises(SystemExit, match="'fp8' is not one of auto, float32, bfloat16, float16"):
        config_from_args(parser.parse_args([]), env={"NOVAINFER_DTYPE": "fp8"})
    assert config_from_args(parser.parse_args(["--dtype", "bfloat16"]), env={}).engine.dtype == "bfloat16"


def test_exact_mode_flag_and_its_conflicts() -> None:
    assert parse_config(["--exact"]).engine.exact
    # Saying the same thing twice is fine; saying the opposite is a clear CLI error.
    assert parse_config(["--exact", "--dtype", "float32", "--quantization", "none"]).engine.exact
    for conflict, named in [
        (["--dtype", "bfloat16"], "--dtype bfloat16"),
        (["--quantization", "int4"], "--quantization int4"),
        (["--compile-decode"], "--compile-decode"),
        (["--int4-lm-head"], "--int4-lm-head"),
    ]:
        with pytest.raises(SystemExit, match=f"--exact runs float32 without int4 or compilation: drop {named}"):
            parse_config(["--exact", *conflict])
    with pytest.raises(SystemExit, match="drop --dtype float16"):
        config_from_args(None, env={"NOVAINFER_EXACT": "1", "NOVAINFER_DTYPE": "float16"})
    # The defaults stay `auto`: the engine resolves them for its device and checkpoint.
    engine = parse_config([]).engine
    assert (engine.dtype, engine.quantization, engine.exact) == ("auto", "auto", False)
    assert config_to_args(parse_config(["--exact"])) == ["--exact"]


def test_one_default_cache_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tokenizer pool, the weight loader and the fused CPU kernels cache under one directory."""
    from services.engine_core.fused_cpu import extension
    from services.tokenizer_pool.tokenizer import cache_root

    assert resolve_cache_dir() == os.path.expanduser("~/.cache/novainfer") == extension.DEFAULT_CACHE_DIR
    assert cache_root(None) == os.path.join(resolve_cache_dir(), "tokenizers")
    monkeypatch.setenv("HOME", "/home/someone")
    assert resolve_cache_dir("~/cache") == "/home/someone/cache"
    assert cache_root("~/cache") == "/home/someone/cache/tokenizers"
