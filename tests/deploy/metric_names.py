"""The metric names deployment files may refer to, and the ones a PromQL expression uses."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from services.gateway.metrics import GatewayMetrics
from shared.protocol import EngineStats


def exported_metric_names() -> set[str]:
    """Every series name /metrics can serve (with --metrics-compat vllm and one engine),
    histograms also under their family name."""
    metrics = GatewayMetrics("m", vllm_compat=True)
    metrics.on_engine_stats(EngineStats())
    metrics.count_http("/health", 200)
    metrics.watch_components(lambda: [("engine", 0, True)])
    names = {s.name for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    return names | {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def metric_names(promql: str) -> set[str]:
    """NovaInfer / vLLM series named in a PromQL expression (recording rules, `novainfer:...`, excluded)."""
    return set(re.findall(r"(?<![\w:])(?:novainfer_|vllm:)[a-z0-9_]+", promql))
