"""/metrics has every name API.md promises plus the production and steering ones, and the steering
metrics move when steered requests run: interventions by mode, SAEs on the device, cache hits, specs
in flight."""

from __future__ import annotations

import httpx

from tests.production.conftest import ADMIN_KEY, USER_KEYS, auth
from tests.production.helpers import GREEDY, upload_sae

API_MD = [
    "steerserve:num_requests_running", "steerserve:num_requests_waiting", "steerserve:kv_cache_usage_perc",
    "steerserve:prompt_tokens_total", "steerserve:generation_tokens_total",
    "steerserve:time_to_first_token_seconds_count", "steerserve:inter_token_latency_seconds_count",
    "steerserve:e2e_request_latency_seconds_count", "steerserve:request_success_total",
    "steerserve:steered_requests_total",
]  # fmt: skip
OURS = [
    "steerserve:num_preemptions_total", "steerserve:request_queue_time_seconds_count",
    "steerserve:request_rejected_total", "steerserve:steering_interventions_total",
    "steerserve:steering_specs_in_flight", "steerserve:num_requests_waiting_for_steering_row",
    "steerserve:saes_on_device", "steerserve:registry_cache_hits_total", "steerserve:registry_cache_misses_total",
    "steerserve:steering_step_registry_reads_total", "steerserve:engine_step_seconds_total",
    "steerserve:engine_steps_total", "steerserve:engine_idle_seconds_total",
    "steerserve:gc_pause_seconds_total", "steerserve:gc_frozen_objects",
]  # fmt: skip


def test_metrics_are_complete_and_steering_ones_move(keyed_server):
    server, headers = keyed_server, auth(USER_KEYS[0])
    text = httpx.get(server.url + "/metrics").text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    assert set(API_MD + OURS) <= names, set(API_MD + OURS) - names

    assert upload_sae(server.url, "metered", auth(ADMIN_KEY)).status_code == 201
    m = server.metric
    before = {
        "add": m("steerserve:steering_interventions_total", mode="feature_add"),
        "clamp": m("steerserve:steering_interventions_total", mode="feature_clamp"),
        "bias": m("steerserve:steering_interventions_total", mode="feature_logit_bias"),
        "miss": m("steerserve:registry_cache_misses_total", cache="sae_device"),
        "hit": m("steerserve:registry_cache_hits_total", cache="sae_device"),
        "queued": m("steerserve:request_queue_time_seconds_count"),
        "steered": m("steerserve:steered_requests_total"),
        "steps": m("steerserve:engine_steps_total"),
        "step_s": m("steerserve:engine_step_seconds_total"),
        "idle_s": m("steerserve:engine_idle_seconds_total"),
    }
    steer = {
        "steering": [
            {"feature": {"sae": "metered", "index": 1}, "mode": "add", "strength": 2.0},
            {"feature": {"sae": "metered", "index": 2}, "mode": "clamp", "value": 1.0},
        ],
        "feature_logit_bias": [{"feature": {"sae": "metered", "index": 5}, "strength": 1.0}],
    }
    # at the first chunk of a streamed call the spec holds its row (its 4 choices share it)
    with httpx.stream("POST", server.url + "/v1/completions", headers=headers, timeout=60,
                      json={"prompt": "Watch", "max_tokens": 50, "n": 4, "stream": True, **GREEDY, **steer}) as r:  # fmt: skip
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        assert m("steerserve:steering_specs_in_flight") == 1
        assert m("steerserve:num_requests_running") == 4
        assert "data: [DONE]" in list(lines)
    assert m("steerserve:steering_specs_in_flight") == 0
    short = {"prompt": "Again", "max_tokens": 3, **GREEDY, **steer}
    r = httpx.post(server.url + "/v1/completions", json=short, headers=headers, timeout=60)
    assert r.status_code == 200, r.text

    assert m("steerserve:steering_interventions_total", mode="feature_add") == before["add"] + 5
    assert m("steerserve:steering_interventions_total", mode="feature_clamp") == before["clamp"] + 5
    assert m("steerserve:steering_interventions_total", mode="feature_logit_bias") == before["bias"] + 5
    assert m("steerserve:steered_requests_total") == before["steered"] + 5
    assert m("steerserve:request_queue_time_seconds_count") == before["queued"] + 5
    assert m("steerserve:saes_on_device") >= 1
    assert m("steerserve:registry_cache_misses_total", cache="sae_device") >= before["miss"] + 1
    assert m("steerserve:registry_cache_hits_total", cache="sae_device") > before["hit"]
    assert m("steerserve:registry_cache_misses_total", cache="logit_effect") >= 1
    assert m("steerserve:registry_cache_hits_total", cache="logit_effect") >= 1
    # the engine thread's time: one step per token of each call (its choices step together; up to 3 more
    # if the engine thread took a choice from its inbox before the others), and idle time between calls
    assert before["steps"] + 50 + 3 <= m("steerserve:engine_steps_total") <= before["steps"] + 50 + 3 + 3
    assert m("steerserve:engine_step_seconds_total") > before["step_s"]
    assert m("steerserve:engine_idle_seconds_total") > before["idle_s"]
    # every SAE the steps used was loaded when the call was planned: no registry read inside a step
    assert m("steerserve:steering_step_registry_reads_total") == 0


def test_the_start_up_heap_is_frozen_and_collections_are_timed(keyed_server):
    """The served process froze what start-up built (gc_heap.py): the collector skips the model, torch and
    the app (a loaded server holds ~500k tracked objects: a full collection of them took ~290 ms with
    every thread stopped); the pauses left are counted by generation."""
    m = keyed_server.metric
    assert m("steerserve:gc_frozen_objects") > 100_000
    r = httpx.post(
        keyed_server.url + "/v1/completions",
        json={"prompt": "Collect", "max_tokens": 4, **GREEDY},
        headers=auth(USER_KEYS[0]),
        timeout=60,
    )
    assert r.status_code == 200, r.text
    # serving allocates: the youngest generation has been collected, and none of it took long
    assert 0 < m("steerserve:gc_pause_seconds_total", generation="0") < 1.0
    assert m("steerserve:gc_pause_seconds_total", generation="2") < 1.0
