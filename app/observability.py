"""Prometheus metrics and request ids."""

from __future__ import annotations

import contextvars
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every log record (format with %(request_id)s)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class _EngineCollector:
    """Counters read from the engine at scrape time: steps, busy seconds, prompt-set cache hits/misses."""

    def __init__(self, engine_ref):
        self.engine_ref = engine_ref

    def collect(self):
        engine = self.engine_ref()
        stats = engine.stats() if engine is not None else None
        steps = CounterMetricFamily("promptserve_engine_steps", "model steps run")
        busy = CounterMetricFamily("promptserve_engine_busy_seconds", "seconds spent running the model")
        hits = CounterMetricFamily("promptserve_prompt_set_cache_hits", "device prompt-set cache hits")
        misses = CounterMetricFamily("promptserve_prompt_set_cache_misses", "device prompt-set cache misses")
        threads = GaugeMetricFamily("promptserve_engine_threads", "CPU threads the model runs on now (fewer while "
                                    "other processes hold the cores)")
        kv = GaugeMetricFamily("promptserve_kv_cache_bytes", "KV cache allocated now (it grows as admitted "
                               "sequences need, within its budget)")
        kv_budget = GaugeMetricFamily("promptserve_kv_cache_budget_bytes", "the KV cache's memory budget")
        prompt_tokens = CounterMetricFamily("promptserve_prompt_cache_prompt_tokens", "prompt tokens of the "
                                            "generate requests that could start from the prompt cache")
        prompt_hits = CounterMetricFamily("promptserve_prompt_cache_hit_tokens", "prompt tokens copied from the "
                                          "prompt cache instead of prefilled")
        prompt_bytes = GaugeMetricFamily("promptserve_prompt_cache_bytes", "keys and values the prompt cache holds")
        drafted = CounterMetricFamily("promptserve_speculative_draft_tokens", "tokens proposed by speculative "
                                      "decoding and checked by the model")
        accepted = CounterMetricFamily("promptserve_speculative_accepted_tokens", "proposed tokens the model chose "
                                       "too (each a decode step saved)")
        if stats is not None:
            steps.add_metric([], stats.steps)
            busy.add_metric([], stats.busy_seconds)
            hits.add_metric([], stats.prefix_hits)
            misses.add_metric([], stats.prefix_misses)
            threads.add_metric([], stats.threads)
            kv.add_metric([], stats.kv_cache_bytes)
            kv_budget.add_metric([], stats.kv_cache_budget_bytes)
            prompt_tokens.add_metric([], stats.prompt_cache_prompt_tokens)
            prompt_hits.add_metric([], stats.prompt_cache_hit_tokens)
            prompt_bytes.add_metric([], stats.prompt_cache_bytes)
            drafted.add_metric([], stats.speculative_draft_tokens)
            accepted.add_metric([], stats.speculative_accepted_tokens)
        yield from (steps, busy, hits, misses, threads, kv, kv_budget, prompt_tokens, prompt_hits, prompt_bytes,
                    drafted, accepted)


class Metrics:
    def __init__(self, engine_ref):
        """engine_ref: a callable returning the engine, or None while it loads."""
        r = self.registry = CollectorRegistry()
        self.requests = Counter("promptserve_requests_total", "finished task requests", ["task", "status"],
                                registry=r)
        self.tokens = Counter("promptserve_tokens_total", "tokens processed", ["task", "kind"], registry=r)
        self.ttft = Histogram("promptserve_time_to_first_token_seconds", "time to first token", ["task"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("promptserve_request_latency_seconds", "end-to-end request latency", ["task"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.uploads = Counter("promptserve_prompt_set_uploads_total", "accepted prompt-set uploads", ["task"],
                               registry=r)
        queue = Gauge("promptserve_queue_depth", "requests waiting for a batch row", registry=r)
        running = Gauge("promptserve_running_batch_size", "sequences in the running batch", registry=r)
        resident = Gauge("promptserve_prompt_sets_resident", "prompt sets resident on the device", registry=r)
        queue.set_function(lambda: engine_ref().stats().waiting if engine_ref() else 0)
        running.set_function(lambda: engine_ref().stats().running if engine_ref() else 0)
        resident.set_function(lambda: engine_ref().stats().prefixes_resident if engine_ref() else 0)
        r.register(_EngineCollector(engine_ref))

    def observe(self, task: str, status: str, latency: float | None = None, ttft: float | None = None,
                prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        self.requests.labels(task=task, status=status).inc()
        if prompt_tokens:
            self.tokens.labels(task=task, kind="prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels(task=task, kind="completion").inc(completion_tokens)
        if latency is not None:
            self.latency.labels(task=task).observe(latency)
        if ttft is not None:
            self.ttft.labels(task=task).observe(ttft)
