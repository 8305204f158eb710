"""Hostile input on the model-backed registry reads (issue 18, section 3): feature cards (`top_logits`)
and search by effect (`promotes`), on the e2e server. Each is a 4xx in the OpenAI shape naming the
parameter, never a 500: indices beyond int64, text that passes `str.isdigit()` but not `int()`."""

from __future__ import annotations

import httpx

SEARCH = "/v1/features/search"


def refused(r: httpx.Response, param: str, status: int) -> None:
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err


def test_feature_cards_and_search_by_effect_refuse_hostile_input(steerable):
    url = steerable.url
    refused(httpx.get(f"{url}/v1/saes/sae0/features/{2**70}"), "index", 404)
    refused(httpx.get(f"{url}/v1/saes/sae0/features/" + "9" * 5000), "index", 400)
    refused(httpx.get(f"{url}/v1/saes/sae0/features/²"), "index", 400)
    # "²" is two byte tokens here and passes str.isdigit(), but is no token id (int() raised: a 500)
    for promotes in ("²", "²²", "9" * 30, "x" * 5000):
        refused(httpx.get(url + SEARCH, params={"promotes": promotes}), "promotes", 400)
    card = httpx.get(f"{url}/v1/saes/sae0/features/4", timeout=60).json()
    assert card["label"] == "cold" and len(card["top_logits"]["promoted"]) == 10
    hits = httpx.get(url + SEARCH, params={"promotes": "7", "sae": "sae0", "limit": 3}, timeout=60).json()
    assert hits["token"] == "7" and len(hits["data"]) == 3, hits
    assert httpx.get(url + "/health").status_code == 200
