"""Prometheus metrics of the gateway: HTTP traffic, request latencies, token counts and
the engines' own stats (docs/metrics.md documents each one).

Everything lives in a private CollectorRegistry, so several apps in one process (tests)
do not collide. Engine stats arrive as cumulative snapshots (EngineStats), so they are
exported by a collector that reads the latest snapshot at scrape time instead of
prometheus Counters that would need increments.

With `--metrics-compat vllm` the same measurements are also exported under vLLM's names
(VLLM_PREFIX), with vLLM's types, units and `model_name` / `engine` labels, because the
Inference Gateway's endpoint picker, KEDA examples and community dashboards hard-code them.
docs/metrics.md has the table, which tests/gateway/test_metrics_compat.py checks against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.protocol import EngineStats, RequestDelta

PREFIX = "novainfer_"
VLLM_PREFIX = "vllm:"
VLLM_FINISHED_REASONS = ("stop", "length", "abort")
"""vLLM counts these in vllm:request_success_total; its errors end as abort, ours apart as error."""
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
REQUEST_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
)


class _EngineCollector(Collector):
    """Exports the latest EngineStats of each engine and which components are up."""

    def __init__(self, model_name: str, vllm_compat: bool, block_size: int) -> None:
        self.model_name = model_name
        self.vllm_compat = vllm_compat
        self.block_size = block_size
        self.stats: dict[int, EngineStats] = {}
        self.components: Callable[[], list[tuple[str, int, bool]]] = list
        """(component, index, up) for each worker and engine, read at scrape time."""

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name", "engine"]
        gauges = [
            ("num_requests_running", "Requests in the engine's running batch.", "num_running"),
            ("num_requests_waiting", "Requests queued in the engine, not yet running.", "num_waiting"),
            ("num_requests_preempted", "Requests preempted and waiting to resume.", "num_preempted"),
            ("kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0-1).", "kv_usage"),
            ("kv_cache_num_blocks", "KV-cache blocks the engine has in total.", "num_blocks"),
            ("engine_last_step_seconds", "Duration of the engine's latest step.", "last_step_time_s"),
            ("engine_batch_size", "Requests in the engine's latest step.", "last_batch_size"),
            ("engine_batched_tokens", "Tokens processed in the engine's latest step.", "last_num_batched_tokens"),
        ]
        counters = [
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_queries_total"),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", "prefix_hits_total"),
            ("num_preemptions", "Preemptions since the engine started.", "preemptions_total"),
            ("engine_steps", "Engine steps since the engine started.", "steps_total"),
            *_SPEC_COUNTERS,
        ]
        snapshot = sorted(self.stats.items())
        for name, doc, field in gauges:
            fam = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            for idx, st in snapshot:
                fam.add_metric([self.model_name, str(idx)], getattr(st, field))
            yield fam
        for name, doc, field in counters:
            counter = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            for idx, st in snapshot:
                counter.add_metric([self.model_name, str(idx)], getattr(st, field))
            yield counter
        yield _accepted_per_pos(PREFIX, self.model_name, snapshot)
        ratio = GaugeMetricFamily(
            PREFIX + "spec_decode_acceptance_ratio",
            "Speculative decoding: accepted / verified draft tokens since the engine started (0 before any).",
            labels=labels,
        )
        mean = GaugeMetricFamily(
            PREFIX + "spec_decode_mean_accepted_length",
            "Speculative decoding: tokens per verification row since the engine started, the target's own "
            "token included (1 + accepted / drafts; 0 before any).",
            labels=labels,
        )
        for idx, st in snapshot:
            tokens, drafts = st.spec_num_draft_tokens, st.spec_num_drafts
            ratio.add_metric([self.model_name, str(idx)], st.spec_num_accepted_tokens / tokens if tokens else 0.0)
            mean.add_metric([self.model_name, str(idx)], 1 + st.spec_num_accepted_tokens / drafts if drafts else 0.0)
        yield ratio
        yield mean
        up = GaugeMetricFamily(
            PREFIX + "component_up",
            "1 if the component reported within engine_timeout_s, else 0.",
            labels=["model_name", "component", "index"],
        )
        for component, i, ok in self.components():
            up.add_metric([self.model_name, component, str(i)], 1.0 if ok else 0.0)
        yield up
        if self.vllm_compat:
            yield from self._collect_vllm(snapshot)

    def _collect_vllm(self, snapshot: list[tuple[int, EngineStats]]) -> Iterator[Metric]:
        labels = ["model_name", "engine"]
        gauges = [
            ("num_requests_running", "Number of requests in model execution batches.", "num_running"),
            ("num_requests_waiting", "Number of requests waiting to be processed.", "num_waiting"),
            ("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", "kv_usage"),
        ]
        counters = [
            (
                "prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
                "prefix_queries_total",
            ),
            ("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", "prefix_hits_total"),
            ("num_preemptions", "Cumulative number of preemption from the engine.", "preemptions_total"),
            *_SPEC_COUNTERS,
        ]
        for name, doc, field in gauges:
            fam = GaugeMetricFamily(VLLM_PREFIX + name, doc, labels=labels)
            for idx, st in snapshot:
                fam.add_metric([self.model_name, str(idx)], getattr(st, field))
            yield fam
        for name, doc, field in counters:
            counter = CounterMetricFamily(VLLM_PREFIX + name, doc, labels=labels)
            for idx, st in snapshot:
                counter.add_metric([self.model_name, str(idx)], getattr(st, field))
            yield counter
        yield _accepted_per_pos(VLLM_PREFIX, self.model_name, snapshot)
        # vLLM's info gauge: constant 1, the cache configuration in its labels.
        info = GaugeMetricFamily(
            VLLM_PREFIX + "cache_config_info",
            "Information of the LLMEngine CacheConfig.",
            labels=[*labels, "block_size", "num_gpu_blocks"],
        )
        for idx, st in snapshot:
            info.add_metric([self.model_name, str(idx), str(self.block_size), str(st.num_blocks)], 1.0)
        yield info


_SPEC_COUNTERS = [
    ("spec_decode_num_drafts", "Speculative decoding: verification rows that carried drafts.", "spec_num_drafts"),
    ("spec_decode_num_draft_tokens", "Speculative decoding: draft tokens verified.", "spec_num_draft_tokens"),
    (
        "spec_decode_num_accepted_tokens",
        "Speculative decoding: draft tokens accepted.",
        "spec_num_accepted_tokens",
    ),
]
"""The same names natively and under vLLM's prefix, as vLLM's SpecDecodingProm has them."""


def _accepted_per_pos(prefix: str, model_name: str, snapshot: list[tuple[int, EngineStats]]) -> Metric:
    counter = CounterMetricFamily(
        prefix + "spec_decode_num_accepted_tokens_per_pos",
        "Speculative decoding: accepted draft tokens by position in their row (0: the first draft).",
        labels=["model_name", "engine", "position"],
    )
    for idx, st in snapshot:
        for pos, n in enumerate(st.spec_num_accepted_tokens_per_pos):
            counter.add_metric([model_name, str(idx), str(pos)], n)
    return counter


class RequestTimer:
    """One engine request's latency bookkeeping: what TTFT, inter-token latency, queue time
    and end-to-end latency are measured from, and which counts it has contributed."""

    __slots__ = (
        "arrival",
        "arrival_wall",
        "last_token",
        "output_tokens",
        "prompt_counted",
        "queue_observed",
        "started",
    )

    def __init__(self, arrival: float, arrival_wall: float) -> None:
        self.arrival = arrival
        """time.monotonic() at arrival: the latencies."""
        self.arrival_wall = arrival_wall
        """time.time() at arrival: queue time, against the engine's wall-clock scheduling time."""
        self.started = False
        self.last_token = arrival
        self.output_tokens = 0
        self.prompt_counted = False
        self.queue_observed = False


class _Fanout:
    """One measurement recorded into the native series and, with vLLM compatibility, its
    vLLM-named twin."""

    def __init__(self, children: list[Histogram | Counter]) -> None:
        self.children = children

    def observe(self, value: float) -> None:
        for child in self.children:
            child.observe(value)  # type: ignore[union-attr]

    def inc(self, amount: float = 1.0) -> None:
        for child in self.children:
            child.inc(amount)  # type: ignore[union-attr]


class GatewayMetrics:
    def __init__(self, model_name: str, vllm_compat: bool = False, block_size: int = 16) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        m = [model_name]
        self.prefixes = [PREFIX, VLLM_PREFIX] if vllm_compat else [PREFIX]
        self.http_requests = Counter(
            PREFIX + "http_requests",
            "HTTP requests answered, by endpoint and status code.",
            ["model_name", "endpoint", "status"],
            registry=reg,
        )
        self.model_name = model_name
        self.in_flight = Gauge(
            PREFIX + "requests_in_flight", "API requests being served.", ["model_name"], registry=reg
        ).labels(*m)
        self._finished = Counter(
            PREFIX + "requests_finished",
            "Engine requests finished, by finish reason (stop, length, abort, error).",
            ["model_name", "finish_reason"],
            registry=reg,
        )
        self._vllm_success = (
            Counter(
                VLLM_PREFIX + "request_success",
                "Count of successfully processed requests.",
                ["model_name", "finished_reason"],
                registry=reg,
            )
            if vllm_compat
            else None
        )

        # Per-token paths use pre-bound children: no label lookup per observation.
        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> _Fanout:
            return _Fanout(
                [
                    Histogram(p + name, doc, ["model_name"], buckets=buckets, registry=reg).labels(*m)
                    for p in self.prefixes
                ]
            )

        def counter(name: str, doc: str, prefixes: list[str] | None = None) -> _Fanout:
            return _Fanout(
                [Counter(p + name, doc, ["model_name"], registry=reg).labels(*m) for p in prefixes or self.prefixes]
            )

        self.ttft = histogram(
            "time_to_first_token_seconds", "Arrival at the gateway to the first output token.", TTFT_BUCKETS
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Time between consecutive output tokens of a request.", ITL_BUCKETS
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Arrival at the gateway to the request's end.", REQUEST_BUCKETS
        )
        self.queue_time = histogram(
            "request_queue_time_seconds", "Arrival at the gateway to first scheduled by the engine.", REQUEST_BUCKETS
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of engine requests.")
        self.cached_prompt_tokens = counter(
            "prompt_cached_tokens", "Prompt tokens served from the prefix cache.", prefixes=[PREFIX]
        )
        self.generation_tokens = counter("generation_tokens", "Output tokens generated.")
        self._engines = _EngineCollector(model_name, vllm_compat, block_size)
        reg.register(self._engines)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def count_http(self, endpoint: str, status: int) -> None:
        self.http_requests.labels(self.model_name, endpoint, str(status)).inc()

    def on_engine_stats(self, stats: EngineStats) -> None:
        self._engines.stats[stats.engine_index] = stats

    def watch_components(self, components: Callable[[], list[tuple[str, int, bool]]]) -> None:
        self._engines.components = components

    def on_delta(self, timer: RequestTimer, delta: RequestDelta, now: float) -> None:
        if not timer.prompt_counted and delta.num_prompt_tokens:
            timer.prompt_counted = True
            self.prompt_tokens.inc(delta.num_prompt_tokens)
            if delta.num_cached_tokens:
                self.cached_prompt_tokens.inc(delta.num_cached_tokens)
        if not timer.queue_observed and delta.first_scheduled_time is not None:
            timer.queue_observed = True
            self.queue_time.observe(max(0.0, delta.first_scheduled_time - timer.arrival_wall))
        total = delta.num_output_tokens or timer.output_tokens + len(delta.token_ids)
        new = total - timer.output_tokens
        if new <= 0:
            return
        timer.output_tokens = total
        self.generation_tokens.inc(new)
        if not timer.started:
            timer.started = True
            self.ttft.observe(now - timer.arrival)
        else:
            # Tokens that arrive together shared the gap since the previous delta.
            gap = (now - timer.last_token) / new
            for _ in range(new):
                self.itl.observe(gap)
        timer.last_token = now

    def on_finish(self, timer: RequestTimer, now: float, reason: str | None) -> None:
        self.e2e.observe(now - timer.arrival)
        self._finished.labels(self.model_name, reason or "unknown").inc()
        if self._vllm_success is not None and reason in VLLM_FINISHED_REASONS:
            self._vllm_success.labels(self.model_name, reason).inc()
