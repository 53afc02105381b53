"""Prometheus metrics, in a registry owned by one app (no process-wide globals).

Every quantity is measured once, under its `lmq_*` name, and exported a second time under the
name vLLM's dashboards read (`VLLM_NAMES`, with vLLM's `model_name` label): the `vllm:*` families
are copies of the `lmq_*` ones made at scrape time, from the same collection, so the two always
agree."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from lmq.engine import EngineStats
from lmq.sequence import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# lmq family -> (vLLM family, vLLM's type for it). Only quantities lmq measures the way vLLM
# does; docs/metrics.md has the table (and what is not exported, and why).
VLLM_NAMES: dict[str, list[tuple[str, str]]] = {
    "lmq_num_requests_running": [("vllm:num_requests_running", "gauge")],
    "lmq_num_requests_waiting": [("vllm:num_requests_waiting", "gauge")],
    "lmq_kv_cache_usage_ratio": [("vllm:kv_cache_usage_perc", "gauge"), ("vllm:gpu_cache_usage_perc", "gauge")],
    "lmq_num_preemptions": [("vllm:num_preemptions", "counter")],
    "lmq_prefix_cache_queries": [("vllm:prefix_cache_queries", "counter")],
    "lmq_prefix_cache_hits": [("vllm:prefix_cache_hits", "counter")],
    "lmq_prompt_tokens": [("vllm:prompt_tokens", "counter")],
    "lmq_generation_tokens": [("vllm:generation_tokens", "counter")],
    "lmq_request_finished": [("vllm:request_success", "counter")],
    "lmq_time_to_first_token_seconds": [("vllm:time_to_first_token_seconds", "histogram")],
    "lmq_time_per_output_token_seconds": [("vllm:request_time_per_output_token_seconds", "histogram")],
    "lmq_e2e_request_latency_seconds": [("vllm:e2e_request_latency_seconds", "histogram")],
    "lmq_request_prompt_tokens": [("vllm:request_prompt_tokens", "histogram")],
    "lmq_request_generation_tokens": [("vllm:request_generation_tokens", "histogram")],
}


def _1_2_5_buckets(most: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `most` (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > most:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class _EngineCollector(Collector):
    """Gauges and counters read from the engine (EngineStats) at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        yield GaugeMetricFamily("lmq_num_requests_running", "Sequences running", value=s.num_running)
        yield GaugeMetricFamily("lmq_num_requests_waiting", "Sequences waiting", value=s.num_waiting)
        yield GaugeMetricFamily("lmq_kv_cache_usage_ratio", "Share of KV blocks in use (0 to 1)",
                                value=1 - s.num_free_blocks / s.num_blocks)
        yield GaugeMetricFamily("lmq_kv_cache_free_blocks", "Free KV blocks", value=s.num_free_blocks)
        yield GaugeMetricFamily("lmq_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up",
                                value=s.prefix_cache_hits / max(s.prefix_cache_queries, 1))
        yield CounterMetricFamily("lmq_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  value=s.prefix_cache_queries)
        yield CounterMetricFamily("lmq_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                  value=s.prefix_cache_hits)
        yield GaugeMetricFamily("lmq_num_preemptions", "Preemptions so far", value=s.num_preemptions)
        yield GaugeMetricFamily("lmq_num_aborted_requests", "Requests aborted so far", value=s.num_aborted)
        yield GaugeMetricFamily("lmq_lora_slot_pins", "Running sequences pinning an adapter slot",
                                value=s.num_lora_pins)
        yield GaugeMetricFamily("lmq_lora_requests", "Unfinished requests on adapters", value=s.num_lora_requests)


class _Exported(Collector):
    """What /metrics shows: the lmq registry collected once, each family followed by its vLLM
    copies (renamed, typed as vLLM types it, labelled with model_name)."""

    def __init__(self, source: CollectorRegistry, model_name: str) -> None:
        self.source, self.model_name = source, model_name

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            yield family
            for name, kind in VLLM_NAMES.get(family.name, ()):
                yield self._copy(family, name, kind)

    def _copy(self, family: Metric, name: str, kind: str) -> Metric:
        out = Metric(name, family.documentation, kind)
        for s in family.samples:
            suffix = s.name[len(family.name):]
            if kind == "counter" and family.type == "gauge":  # a running total kept by the engine
                suffix = "_total"
            out.samples.append(s._replace(name=name + suffix, labels={"model_name": self.model_name, **s.labels}))
        return out


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats], model_name: str = "", max_model_len: int = 1 << 20) -> None:
        self.source = r = CollectorRegistry()
        self.requests = Counter("lmq_requests", "Finished requests by HTTP status", ["status"], registry=r)
        self.prompt_tokens = Counter("lmq_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("lmq_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("lmq_request_finished", "Completions finished, by finish reason (per choice)",
                                ["finished_reason"], registry=r)
        self.ttft = Histogram("lmq_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("lmq_time_per_output_token_seconds",
                              "Per request: mean time per output token after the first", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.e2e = Histogram("lmq_e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=_LATENCY_BUCKETS, registry=r)
        tokens = _1_2_5_buckets(max_model_len)
        self.request_prompt = Histogram("lmq_request_prompt_tokens", "Prompt tokens per request", buckets=tokens,
                                        registry=r)
        self.request_generation = Histogram("lmq_request_generation_tokens",
                                            "Generated tokens per request (all its choices)", buckets=tokens,
                                            registry=r)
        r.register(_EngineCollector(stats))
        self.registry = CollectorRegistry()
        self.registry.register(_Exported(self.source, model_name))

    def observe_request(self, out: RequestOutput, arrival: float, end: float) -> None:
        """One engine request that ended with its response (arrival: when the API call came)."""
        prompt = len(out.prompt_token_ids)
        lengths = [len(c.token_ids) for c in out.outputs]
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(sum(lengths))
        self.request_prompt.observe(prompt)
        self.request_generation.observe(sum(lengths))
        for c in out.outputs:
            if c.finish_reason is not None:
                self.finished.labels(c.finish_reason).inc()
        self.e2e.observe(end - arrival)
        if out.first_token_time is not None:
            self.ttft.observe(out.first_token_time - arrival)
            longest = max(lengths, default=0)
            if longest > 1:
                self.tpot.observe((end - out.first_token_time) / (longest - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
