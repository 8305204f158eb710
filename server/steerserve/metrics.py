"""Prometheus collectors, named like vLLM's with the `steerserve:` prefix (API.md).

Each server owns its own CollectorRegistry, so several servers can live in one process (tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80)


class EngineMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name, doc):
            return Gauge(f"steerserve:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name, doc):
            return Counter(f"steerserve:{name}", doc, labels, registry=r).labels(model_name)

        def histogram(name, doc):
            return Histogram(f"steerserve:{name}", doc, labels, buckets=_LATENCY_BUCKETS, registry=r).labels(
                model_name
            )

        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens of finished requests.")
        self.num_preemptions = counter(
            "num_preemptions", "Requests preempted (their KV dropped, recomputed)."
        )
        self.steered_requests = counter("steered_requests", "Finished requests that carried steering.")
        self.time_to_first_token = histogram("time_to_first_token_seconds", "Arrival to first token.")
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Time between output tokens.")
        self.e2e_request_latency = histogram("e2e_request_latency_seconds", "Arrival to finish.")
        self._success = Counter(
            "steerserve:request_success",
            "Finished requests by reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self._model = model_name
        self._preemptions_seen = 0

    def observe_step(self, stats) -> None:
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        if stats.num_preemptions > self._preemptions_seen:
            self.num_preemptions.inc(stats.num_preemptions - self._preemptions_seen)
            self._preemptions_seen = stats.num_preemptions

    def observe_finish(self, state, reason, e2e_seconds: float) -> None:
        self.prompt_tokens.inc(state.num_prompt_tokens)
        self.generation_tokens.inc(len(state.output_token_ids))
        self.e2e_request_latency.observe(e2e_seconds)
        self._success.labels(self._model, reason.value if reason else "unknown").inc()
        if state.request.steering is not None:
            self.steered_requests.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
