"""The server's Prometheus metrics (prometheus-client), served at GET /metrics.

Counters and histograms are updated as requests finish; the gauges (requests running and waiting, KV
pages in use) are read from the engine when /metrics is scraped. Each app has its own registry, so
several servers in one process (tests) do not collide.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = {"model_name": model_name}
        self._labels = labels
        self.running = Gauge("msc_requests_running", "requests in the engines' running batches", ["model_name"], registry=r)
        self.waiting = Gauge("msc_requests_waiting", "requests waiting for a place in a batch (or preempted)", ["model_name"], registry=r)
        self.kv_used = Gauge("msc_kv_pages_used", "KV cache pages that sequences hold", ["model_name"], registry=r)
        self.kv_total = Gauge("msc_kv_pages_total", "KV cache pages of all engines", ["model_name"], registry=r)
        self.kv_cached = Gauge("msc_kv_pages_cached", "KV pages named in the prefix caches (held or evictable)",
                               ["model_name"], registry=r)
        self.prefix_queried = Counter("msc_prefix_cache_queried_tokens", "prompt tokens looked up in the prefix caches",
                                      ["model_name"], registry=r)
        self.prefix_hits = Counter("msc_prefix_cache_hit_tokens", "prompt tokens found in the prefix caches (not computed)",
                                   ["model_name"], registry=r)
        self._prefix_seen = {"prefix_cache_queried_tokens": 0, "prefix_cache_hit_tokens": 0}
        self.prompt_tokens = Counter("msc_prompt_tokens", "prompt tokens of finished requests", ["model_name"], registry=r)
        self.generation_tokens = Counter("msc_generation_tokens", "tokens generated", ["model_name"], registry=r)
        self.finished = Counter("msc_requests_finished", "requests finished, by reason", ["model_name", "finish_reason"], registry=r)
        self.errors = Counter("msc_request_errors", "requests answered with an error, by HTTP status", ["model_name", "status"], registry=r)
        self.ttft = Histogram("msc_time_to_first_token_seconds", "from arrival to the first generated token",
                              ["model_name"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("msc_time_per_output_token_seconds", "between generated tokens of a request (mean per request)",
                              ["model_name"], buckets=TPOT_BUCKETS, registry=r)
        self.latency = Histogram("msc_request_latency_seconds", "from arrival to the last token",
                                 ["model_name"], buckets=LATENCY_BUCKETS, registry=r)
        # NOTE: every series without a label of its own exists from the start (zero), as Prometheus advises:
        # a scrape before the first request shows them rather than nothing
        for metric in (self.running, self.waiting, self.kv_used, self.kv_total, self.kv_cached, self.prefix_queried,
                       self.prefix_hits, self.prompt_tokens, self.generation_tokens, self.ttft, self.tpot, self.latency):
            metric.labels(**labels)

    def request_done(self, prompt_tokens: int, completion_tokens: int, finish_reason: str, seconds: float,
                     first_token_s: float | None) -> None:
        lab = self._labels
        self.prompt_tokens.labels(**lab).inc(prompt_tokens)
        self.generation_tokens.labels(**lab).inc(completion_tokens)
        self.finished.labels(**lab, finish_reason=finish_reason).inc()
        self.latency.labels(**lab).observe(seconds)
        if first_token_s is not None:
            self.ttft.labels(**lab).observe(first_token_s)
            if completion_tokens > 1:
                self.tpot.labels(**lab).observe((seconds - first_token_s) / (completion_tokens - 1))

    def error(self, status: int) -> None:
        self.errors.labels(**self._labels, status=str(status)).inc()

    def render(self, engine_stats: dict) -> bytes:
        lab = self._labels
        self.running.labels(**lab).set(engine_stats.get("running", 0))
        self.waiting.labels(**lab).set(engine_stats.get("waiting", 0))
        self.kv_used.labels(**lab).set(engine_stats.get("kv_pages_used", 0))
        self.kv_total.labels(**lab).set(engine_stats.get("kv_pages_total", 0))
        self.kv_cached.labels(**lab).set(engine_stats.get("kv_pages_cached", 0))
        # NOTE: the engines report running totals; the counters advance by what is new since the last scrape
        for key, counter in (("prefix_cache_queried_tokens", self.prefix_queried),
                             ("prefix_cache_hit_tokens", self.prefix_hits)):
            now = engine_stats.get(key, 0)
            if now > self._prefix_seen[key]:
                counter.labels(**lab).inc(now - self._prefix_seen[key])
            self._prefix_seen[key] = now
        return generate_latest(self.registry)
