"""Prometheus collectors, named like vLLM's with the `steerserve:` prefix (API.md), plus the steering
ones no other server has (interventions by mode, steering specs in flight, requests waiting for a
steering row, SAEs on the device, registry cache hits).

Each server owns its own CollectorRegistry, so several servers can live in one process (tests).
Values kept by other parts (the SAE cache, the effect cache) are read through `sources` at scrape time.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from steerserve.types.requests import FinishReason
from steerserve.types.steering import InterventionKind

FINISH_REASONS = tuple(FinishReason)  # types.requests.FinishReason: one series per reason
CACHES = ("sae_device", "vector_device", "logit_effect")
REJECT_REASONS = ("queue_full", "draining", "engine_dead")
# one series per intervention type (types.steering.InterventionKind), plus the feature logit biases
INTERVENTION_MODES = (*InterventionKind, "feature_logit_bias")
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80)


@dataclass(frozen=True)
class MetricSources:
    """Readers of values other parts own, polled at each scrape (none may block for long)."""

    saes_on_device: Callable[[], int]
    cache_counts: Callable[[], dict[str, tuple[int, int]]]  # cache name -> (hits, misses)
    step_loads: Callable[[], int] = lambda: 0  # registry reads inside steps so far


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
        self.prefix_cache_queries = counter(
            "prefix_cache_queries", "Tokens of the requests looked up in the prefix cache."
        )
        self.prefix_cache_hits = counter(
            "prefix_cache_hits", "Tokens of prefix_cache_queries found cached (their KV not recomputed)."
        )
        self._prefix_seen = (0, 0)
        self.steered_requests = counter("steered_requests", "Finished requests that carried steering.")
        # NOTE: with the wall time between two scrapes these say how much of it the engine thread spent
        # stepping, and how much it waited with nothing to run (the rest: the HTTP side and the OS)
        self.engine_step_seconds = counter(
            "engine_step_seconds", "Wall time the engine thread spent in steps."
        )
        self.engine_steps = counter("engine_steps", "Engine steps run.")
        self.engine_idle_seconds = counter(
            "engine_idle_seconds", "Wall time the engine thread waited with no request and no job."
        )
        self._gc_pause = Counter(
            "steerserve:gc_pause_seconds",
            "Wall time the process spent in Python's cyclic garbage collector (every thread stops), by "
            "generation; the start-up heap is frozen (gc_heap.py), so this is what serving allocates.",
            ["model_name", "generation"],
            registry=r,
        )
        self.gc_frozen_objects = gauge(
            "gc_frozen_objects", "Objects of the start-up heap the garbage collector skips (gc.freeze)."
        )
        self.time_to_first_token = histogram("time_to_first_token_seconds", "Arrival to first token.")
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Time between output tokens.")
        self.e2e_request_latency = histogram("e2e_request_latency_seconds", "Arrival to finish.")
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "Arrival to first schedule (time spent waiting for a slot)."
        )
        self._rejected = Counter(
            "steerserve:request_rejected",
            "Calls refused before reaching the engine, by reason (queue_full, draining, engine_dead).",
            ["model_name", "reason"],
            registry=r,
        )
        self._interventions = Counter(
            "steerserve:steering_interventions",
            "Interventions (and feature logit biases) of finished steered requests, by mode.",
            ["model_name", "mode"],
            registry=r,
        )
        self.steering_specs_in_flight = gauge(
            "steering_specs_in_flight", "Distinct steering specs held on the device (one steering row each)."
        )
        self.num_requests_waiting_for_row = gauge(
            "num_requests_waiting_for_steering_row",
            "Waiting requests whose steering needs a row none is free for.",
        )
        self.saes_on_device = gauge("saes_on_device", "SAEs resident in the device SAE cache.")
        self._cache_hits = Counter(
            "steerserve:registry_cache_hits",
            "Lookups served from a cache (sae_device: SAE weights; vector_device: steering vectors; "
            "logit_effect: feature logit effects).",
            ["model_name", "cache"],
            registry=r,
        )
        self._cache_misses = Counter(
            "steerserve:registry_cache_misses",
            "Lookups that had to load or compute (same caches as registry_cache_hits).",
            ["model_name", "cache"],
            registry=r,
        )
        self._step_loads = counter(
            "steering_step_registry_reads",
            "SAEs, vectors or logit effects a step had to read from the registry: a call preloads them "
            "(api/plan.py), so this grows only when one was evicted before its step.",
        )
        self._step_loads_seen = 0
        self._success = Counter(
            "steerserve:request_success",
            "Finished requests by reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self._model = model_name
        self._preemptions_seen = 0
        self._cache_seen: dict[str, tuple[int, int]] = {}
        self.sources: MetricSources | None = None
        self.gc_pauses = None  # gc_heap.GCPauses while the server runs
        self._gc_seen = [0.0, 0.0, 0.0]
        # every labelled series exists from the start, at 0
        for labelled, values in (
            (self._success, FINISH_REASONS),
            (self._rejected, REJECT_REASONS),
            (self._interventions, INTERVENTION_MODES),
            (self._cache_hits, CACHES),
            (self._cache_misses, CACHES),
            (self._gc_pause, ("0", "1", "2")),
        ):
            for value in values:
                labelled.labels(model_name, value)

    def observe_step(self, stats) -> None:
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.steering_specs_in_flight.set(stats.num_steering_rows)
        self.num_requests_waiting_for_row.set(stats.num_waiting_for_row)
        if stats.num_preemptions > self._preemptions_seen:
            self.num_preemptions.inc(stats.num_preemptions - self._preemptions_seen)
            self._preemptions_seen = stats.num_preemptions
        queries, hits = stats.prefix_cache_queries, stats.prefix_cache_hits
        if (queries, hits) != self._prefix_seen:
            self.prefix_cache_queries.inc(queries - self._prefix_seen[0])
            self.prefix_cache_hits.inc(hits - self._prefix_seen[1])
            self._prefix_seen = (queries, hits)

    def observe_finish(self, state, reason, e2e_seconds: float, queue_seconds: float | None = None) -> None:
        self.prompt_tokens.inc(state.num_prompt_tokens)
        self.generation_tokens.inc(len(state.output_token_ids))
        self.e2e_request_latency.observe(e2e_seconds)
        if queue_seconds is not None:
            self.request_queue_time.observe(queue_seconds)
        self._success.labels(self._model, reason.value if reason else "unknown").inc()
        spec = state.request.steering
        if spec is not None:
            self.steered_requests.inc()
            if state.first_scheduled_time is not None:  # it ran, so its steering was applied
                for iv in spec.interventions:
                    self._interventions.labels(self._model, iv.kind).inc()
                if spec.logit_biases:
                    self._interventions.labels(self._model, "feature_logit_bias").inc(len(spec.logit_biases))

    def observe_rejected(self, reason: str) -> None:
        self._rejected.labels(self._model, reason).inc()

    def _poll_sources(self) -> None:
        if self.sources is None:
            return
        self.saes_on_device.set(self.sources.saes_on_device())
        for cache, (hits, misses) in self.sources.cache_counts().items():
            seen_hits, seen_misses = self._cache_seen.get(cache, (0, 0))
            self._cache_hits.labels(self._model, cache).inc(max(0, hits - seen_hits))
            self._cache_misses.labels(self._model, cache).inc(max(0, misses - seen_misses))
            self._cache_seen[cache] = (hits, misses)
        loads = self.sources.step_loads()
        self._step_loads.inc(max(0, loads - self._step_loads_seen))
        self._step_loads_seen = loads

    def _poll_gc(self) -> None:
        if self.gc_pauses is None:
            return
        self.gc_frozen_objects.set(gc.get_freeze_count())
        for gen, total in enumerate(list(self.gc_pauses.seconds)):
            self._gc_pause.labels(self._model, str(gen)).inc(max(0.0, total - self._gc_seen[gen]))
            self._gc_seen[gen] = max(total, self._gc_seen[gen])

    def render(self) -> bytes:
        self._poll_sources()
        self._poll_gc()
        return generate_latest(self.registry)
