"""Prometheus metrics for generations from every entry point (UI, API, remote backend).

    GET /metrics   Prometheus text format
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

OUTCOMES = {"stop": "completed", "length": "completed", "cancelled": "stopped", "error": "error"}


class Metrics:
    """One registry per served model (so several apps in one process don't collide)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, runner, waiting=lambda: 0):
        self.registry = CollectorRegistry()
        self.requests = Counter("chat_requests", "Generations by outcome", ["outcome"],
                                registry=self.registry)
        for outcome in set(OUTCOMES.values()):
            self.requests.labels(outcome)
        self.tokens = Counter("chat_generated_tokens", "Tokens generated", registry=self.registry)
        active = Gauge("chat_active_generations", "Generations running now", registry=self.registry)
        active.set_function(lambda: runner.active)
        depth = Gauge("chat_queue_depth", "Requests waiting for the model", registry=self.registry)
        depth.set_function(waiting)
        self.ttft = Histogram("chat_time_to_first_token_seconds", "Time to first token",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                              registry=self.registry)
        self.rate = Histogram("chat_tokens_per_second", "Decoding speed per generation",
                              buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
                              registry=self.registry)
        runner.finish_listeners.append(self.observe)

    def observe(self, stream) -> None:
        self.requests.labels(OUTCOMES.get(stream.finish_reason, "error")).inc()
        self.tokens.inc(stream.new_tokens)
        if stream.time_to_first_token is not None:
            self.ttft.observe(stream.time_to_first_token)
        if stream.tokens_per_second is not None:
            self.rate.observe(stream.tokens_per_second)

    def render(self) -> bytes:
        return generate_latest(self.registry)
