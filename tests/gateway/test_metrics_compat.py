"""`--metrics-compat vllm`: /metrics exports vLLM's series exactly as docs/metrics.md's table says."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.fakes import MODEL, Gateway, GatewayFactory
from tests.gateway.test_gateway_openai import async_client

TABLE = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
# What the issue (and the tools it names) require at the least.
REQUIRED = {
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:num_preemptions_total",
    "vllm:cache_config_info",
    "vllm:spec_decode_num_drafts_total",
    "vllm:spec_decode_num_draft_tokens_total",
    "vllm:spec_decode_num_accepted_tokens_total",
    "vllm:spec_decode_num_accepted_tokens_per_pos_total",
}


def compat_table() -> dict[str, tuple[str, set[str]]]:
    """name as exposed -> (type, label names), from the marked table in docs/metrics.md."""
    text = TABLE.read_text()
    body = text.split("<!-- vllm-compat-table -->")[1].split("<!-- /vllm-compat-table -->")[0]
    rows: dict[str, tuple[str, set[str]]] = {}
    for line in body.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = (cells[1], set(re.findall(r"`([a-z_]+)`", cells[2])))
    return rows


def families(text: bytes) -> dict[str, tuple[str, list[tuple[str, dict[str, str]]]]]:
    return {
        fam.name: (fam.type, [(s.name, s.labels) for s in fam.samples])
        for fam in text_string_to_metric_families(text.decode())
    }


def test_table_covers_required_names() -> None:
    table = compat_table()
    assert set(table) >= REQUIRED
    assert all(name.startswith("vllm:") for name in table)


async def test_vllm_series_match_table(make_gateway: GatewayFactory) -> None:
    gw: Gateway = await make_gateway(metrics_compat="vllm")
    # One finished request and fresh engine stats, so every series has a sample.
    await async_client(gw).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    status, text = await gw.get("/metrics")
    assert status == 200
    fams = families(text)
    for name, (kind, labels) in compat_table().items():
        family = name.removesuffix("_total") if kind == "counter" else name
        assert family in fams, f"{name} missing from /metrics"
        got_kind, samples = fams[family]
        assert got_kind == kind, f"{name}: {got_kind} != {kind}"
        exposed = [(s, lbl) for s, lbl in samples if not s.endswith("_created")]
        assert exposed, f"{name} has no samples"
        for sample, lbl in exposed:
            if kind == "histogram":
                assert sample in (name + "_bucket", name + "_sum", name + "_count"), sample
                lbl = {k: v for k, v in lbl.items() if k != "le"}
            else:
                assert sample == name, sample
            assert set(lbl) == labels, f"{name}: labels {sorted(lbl)} != {sorted(labels)}"
            assert lbl["model_name"] == MODEL
    # Same measurements as the native series.
    native = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text.decode())
        for s in f.samples
    }
    engine = (("engine", "0"), ("model_name", MODEL))
    assert native[("vllm:num_requests_waiting", engine)] == native[("novainfer_num_requests_waiting", engine)] == 2
    assert native[("vllm:kv_cache_usage_perc", engine)] == 0.25
    assert native[("vllm:prefix_cache_hits_total", engine)] == 40
    assert native[("vllm:generation_tokens_total", (("model_name", MODEL),))] == 3
    assert native[("vllm:time_to_first_token_seconds_count", (("model_name", MODEL),))] == 1
    assert native[("vllm:request_success_total", (("finished_reason", "stop"), ("model_name", MODEL)))] == 1
    assert native[("vllm:spec_decode_num_drafts_total", engine)] == 5
    assert native[("vllm:spec_decode_num_accepted_tokens_total", engine)] == 8
    assert native[("novainfer_spec_decode_num_draft_tokens_total", engine)] == 12
    per_pos = (("engine", "0"), ("model_name", MODEL), ("position", "1"))
    assert native[("vllm:spec_decode_num_accepted_tokens_per_pos_total", per_pos)] == 3
    assert native[("novainfer_spec_decode_acceptance_ratio", engine)] == 8 / 12
    assert native[("novainfer_spec_decode_mean_accepted_length", engine)] == 1 + 8 / 5
    info = [lbl for s, lbl in fams["vllm:cache_config_info"][1]]
    assert info[0]["block_size"] == str(gw.config.engine.block_size)


async def test_no_vllm_series_by_default(gateway: Gateway) -> None:
    _, text = await gateway.get("/metrics")
    assert b"vllm:" not in text
