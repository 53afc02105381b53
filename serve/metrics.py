"""Prometheus metrics, in a registry owned by one app (no process-wide globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from lmq.engine import EngineStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineCollector(Collector):
    """Gauges read from the engine at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.stats()
        yield GaugeMetricFamily("lmq_num_requests_running", "Sequences running", value=s.num_running)
        yield GaugeMetricFamily("lmq_num_requests_waiting", "Sequences waiting", value=s.num_waiting)
        yield GaugeMetricFamily("lmq_kv_cache_usage_ratio", "Share of KV blocks in use",
                                value=1 - s.num_free_blocks / s.num_blocks)
        yield GaugeMetricFamily("lmq_kv_cache_free_blocks", "Free KV blocks", value=s.num_free_blocks)
        yield GaugeMetricFamily("lmq_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up",
                                value=s.prefix_cache_hits / max(s.prefix_cache_queries, 1))
        yield GaugeMetricFamily("lmq_num_preemptions", "Preemptions so far", value=s.num_preemptions)
        yield GaugeMetricFamily("lmq_num_aborted_requests", "Requests aborted so far", value=s.num_aborted)
        yield GaugeMetricFamily("lmq_lora_slot_pins", "Running sequences pinning an adapter slot",
                                value=s.num_lora_pins)
        yield GaugeMetricFamily("lmq_lora_requests", "Unfinished requests on adapters", value=s.num_lora_requests)


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lmq_requests", "Finished requests by HTTP status", ["status"], registry=r)
        self.prompt_tokens = Counter("lmq_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("lmq_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("lmq_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("lmq_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("lmq_e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(stats))

    def observe_request(self, prompt_tokens: int, completion_tokens: int, arrival: float,
                        first_token: float | None, end: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.e2e.observe(end - arrival)
        if first_token is not None:
            self.ttft.observe(first_token - arrival)
            if completion_tokens > 1:
                self.tpot.observe((end - first_token) / (completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
