"""Prometheus metrics of one server instance (its own registry: two servers in one process never mix counts)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tablefree_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("tablefree_prompt_tokens", "prompt tokens of generation requests", registry=r)
        self.generated_tokens = Counter("tablefree_generation_tokens", "tokens generated", registry=r)
        self.queue_depth = Gauge("tablefree_queue_depth", "sequences waiting to join the batch", registry=r)
        self.queue_depth.set_function(lambda: engine.waiting)
        self.running = Gauge("tablefree_running_sequences", "sequences in the running batch", registry=r)
        self.running.set_function(lambda: engine.running)
        self.time_to_first_token = Histogram(
            "tablefree_time_to_first_token_seconds", "request arrival to first generated token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.time_per_output_token = Histogram(
            "tablefree_time_per_output_token_seconds", "decode time per generated token after the first",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1), registry=r,
        )
        self.latency = Histogram(
            "tablefree_request_latency_seconds", "end-to-end request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )

        r.register(DraftCounts(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class DraftCounts:
    """The engine's draft counters (`--draft-tokens`), read from it at each scrape: how many guessed tokens were checked
    and how many held, so acceptance is held / guessed."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        guessed, held = self.engine.draft_counts
        yield CounterMetricFamily("tablefree_draft_tokens", "tokens sequences guessed from their own text and had checked "
                                  "(--draft-tokens)", value=guessed)
        yield CounterMetricFamily("tablefree_draft_accepted_tokens", "guessed tokens that were the model's own choice",
                                  value=held)
