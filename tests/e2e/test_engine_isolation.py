"""A running request keeps the SAE it was admitted with, on a real server: deleting its SAE while it
streams `return_features`, then storing other weights under the same id, changes nothing for it (its
features stay SAELens' own encode of the hidden states, with the weights it started with), and the
engine stays healthy."""

from __future__ import annotations

import io
import json

import httpx
import torch
from safetensors.torch import save
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.e2e.conftest import D_MODEL, D_SAE, sae_state
from tests.e2e.test_interp_api import site_states
from tests.registry.helpers import rand_state, ref_saelens_encode, saelens_cfg

TEXT = "The weather in Alaska is always"
MAX_TOKENS = 300  # long enough that the registry changes while the request still generates


def upload(url: str, sae_id: str, state: dict) -> None:
    cfg = saelens_cfg("standard", 6, hook="blocks.0.hook_resid_post", d_in=D_MODEL, d_sae=D_SAE)
    files = {
        "cfg": ("cfg.json", json.dumps(cfg), "application/json"),
        "weights": ("sae.safetensors", io.BytesIO(save(state)), "application/octet-stream"),
    }
    r = httpx.post(url + "/v1/saes", files=files, data={"id": sae_id}, timeout=60)
    assert r.status_code == 201, r.text


def test_deleting_and_replacing_a_captured_sae_mid_stream(server):
    original = sae_state()
    upload(server.url, "doomed", original)
    body = {
        "prompt": TEXT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True,
        "return_features": {"sae": "doomed", "top_k": 3},
    }  # fmt: skip
    chunks: list[dict] = []
    changed_at = None
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunks.append(json.loads(line[6:]))
            if changed_at is None and chunks[-1]["choices"][0].get("features"):
                assert httpx.delete(server.url + "/v1/saes/doomed", timeout=30).status_code in (200, 204)
                upload(server.url, "doomed", rand_state("standard", D_MODEL, D_SAE, seed=99))  # other weights
                changed_at = len(chunks)
    assert changed_at is not None and len(chunks) > changed_at + 10, "the request ended before the change"
    assert not [c for c in chunks if "error" in c], [c for c in chunks if "error" in c]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    features = [f for c in chunks for f in c["choices"][0].get("features") or []]
    prompt_ids = AutoTokenizer.from_pretrained(server.model_dir)(TEXT)["input_ids"]
    n = len(prompt_ids)
    # activations of a generated token arrive when it is fed back: all but the last one have them
    assert [f["position"] for f in features] == list(range(n, n + MAX_TOKENS - 1))
    model = AutoModelForCausalLM.from_pretrained(server.model_dir, attn_implementation="eager").eval()
    h = site_states(model, prompt_ids + [f["token_id"] for f in features])
    vals, idx = ref_saelens_encode("standard", original, h).topk(3, dim=-1)  # the weights it started with
    for f in features:
        p = f["position"]
        expected = [(int(i), float(v)) for i, v in zip(idx[p], vals[p], strict=True) if v > 0]
        assert [x["index"] for x in f["features"]] == [i for i, _ in expected], p
        got = torch.tensor([x["activation"] for x in f["features"]], dtype=torch.float64)
        assert torch.allclose(
            got, torch.tensor([v for _, v in expected], dtype=torch.float64), rtol=1e-3, atol=1e-3
        ), p

    assert httpx.get(server.url + "/health").status_code == 200
    r = httpx.post(
        server.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=60
    )
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
    assert httpx.delete(server.url + "/v1/saes/doomed", timeout=30).status_code in (200, 204)
