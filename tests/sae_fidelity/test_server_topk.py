"""Issue #19's TopK reproduction through a real `steerserve serve` (the demo model) on a real port: a
TopK SAE written by sae-lens is uploaded as its own files; `/v1/inspect` with top_k above the SAE's k
reports exactly the library's encode() (no feature the SAE sets to 0), and greedy steering with clamp /
scale of a feature the SAE has off on most tokens equals, token for token, the transformers model run
with a forward hook doing the library's encode -> edit -> decode + error."""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.sae_fidelity.conftest import resid_post
from tests.sae_fidelity.library import saelens_pair
from tests.server_process import ServerProcess

pytest.importorskip("sae_lens")
TEXT = "In Norway the weather is cold. The dog ran in the"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    args = ["--kv-cache-memory-gb", "0.05", "--max-num-seqs", "8", "--threads", "1"]
    proc = ServerProcess(args, str(logs / "server.log")).wait_healthy()  # no --model: the demo model
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def topk(server, tmp_path_factory):
    pair = saelens_pair("topk-4", tmp_path_factory.mktemp("lens-topk"), seed=21)
    files = {
        "cfg": ("cfg.json", (pair.folder / "cfg.json").read_bytes(), "application/json"),
        "weights": (
            "sae_weights.safetensors",
            (pair.folder / "sae_weights.safetensors").read_bytes(),
            "application/octet-stream",
        ),
    }
    r = httpx.post(server.url + "/v1/saes", files=files, data={"id": "lens-topk"}, timeout=60)
    assert r.status_code == 201, r.text
    assert (r.json()["architecture"], r.json()["k"]) == ("topk", 4)
    return pair


def test_inspect_top_k_above_k_is_the_library_encode(server, topk, demo_model):
    model, tok, _ = demo_model
    r = httpx.post(
        server.url + "/v1/inspect", json={"text": TEXT, "sae": "lens-topk", "top_k": 32}, timeout=60
    )
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    ids = [t["token_id"] for t in tokens]
    assert ids == tok(TEXT)["input_ids"]
    acts = topk.encode(resid_post(model, ids, 1))  # the library's encode() of the same hidden states
    assert bool((topk.ours.pre_activations(resid_post(model, ids, 1)) > 0).sum(1).gt(4).all())
    for t, want in zip(tokens, acts, strict=True):
        got = {f["index"]: f["activation"] for f in t["features"]}
        expect = {int(i): float(want[i]) for i in want.nonzero().flatten()}
        assert set(got) == set(expect), (t["position"], got, expect)  # never more than k = 4
        assert [got[i] for i in sorted(got)] == pytest.approx([expect[i] for i in sorted(expect)], rel=1e-4)


def hooked_generate(model, ids: list[int], edit) -> tuple[list[int], list[float]]:
    """Greedy decoding of the transformers model with a forward hook at layer 1's output applying
    `edit(x [n, d]) -> [n, d]` to every token; (token ids, their logprobs)."""

    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        edited = edit(h[0].float()).to(h.dtype)[None]
        return (edited, *out[1:]) if isinstance(out, tuple) else edited

    handle = model.transformer.h[1].register_forward_hook(hook)
    seq, logprobs = list(ids), []
    try:
        with torch.inference_mode():
            for _ in range(MAX_TOKENS):
                lp = model(torch.tensor([seq])).logits[0, -1].float().log_softmax(-1)
                seq.append(int(lp.argmax()))
                logprobs.append(float(lp[seq[-1]]))
    finally:
        handle.remove()
    return seq[len(ids) :], logprobs


def library_edit(pair, feature: int, mode: str, value: float):
    """The library's encode -> set/scale the feature -> decode + error, per token."""
    return lambda x: pair.edit(
        x, torch.full((x.shape[0], 1), feature), mode, torch.full((x.shape[0], 1), value)
    )


def relu_edit(pair, feature: int, mode: str, value: float):
    """What the server did before issue #19: the feature read as relu(pre) whatever its rank."""
    w = pair.ours

    def edit(x):
        old = w.pre_activations(x)[:, feature].relu()
        new = old * value if mode == "scale" else torch.full_like(old, value)
        return x + (new - old)[:, None] * w.W_dec[feature]

    return edit


@pytest.mark.parametrize(("mode", "value"), [("clamp", 6.0), ("scale", 3.0)])
def test_steering_equals_a_library_hook(mode, value, server, topk, demo_model):
    """Feature: clamp: the one most often off while relu(pre) > 0; scale: one on at some tokens, off at
    others. Greedy tokens and their logprobs (through /v1/completions) equal the library-hooked model's;
    the relu reading would give other logprobs (the case can fail)."""
    model, tok, _ = demo_model
    ids = tok(TEXT)["input_ids"]
    h = resid_post(model, ids, 1)
    acts, pre = topk.encode(h), topk.ours.pre_activations(h)
    off_but_positive = ((acts == 0) & (pre > 0)).sum(0)
    if mode == "scale":
        off_but_positive = off_but_positive * ((acts > 0).sum(0) > 0)
    feature = int(off_but_positive.argmax())
    assert int(off_but_positive[feature]) > 0
    steering = [{"feature": {"sae": "lens-topk", "index": feature}, "mode": mode,
                 ("value" if mode == "clamp" else "factor"): value}]  # fmt: skip
    common = {
        "prompt": TEXT,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "steering": steering,
    }
    r = httpx.post(server.url + "/generate", json=common, timeout=120)
    assert r.status_code == 200, r.text
    c = httpx.post(
        server.url + "/v1/completions", json={**common, "model": "demo", "logprobs": 0}, timeout=120
    )
    assert c.status_code == 200, c.text
    want_ids, want_lp = hooked_generate(model, ids, library_edit(topk, feature, mode, value))
    assert r.json()["token_ids"] == want_ids
    got_lp = c.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert got_lp == pytest.approx(want_lp, abs=2e-3)
    _, relu_lp = hooked_generate(model, ids, relu_edit(topk, feature, mode, value))
    assert relu_lp != pytest.approx(want_lp, abs=2e-2), "the relu reading must differ (a test that can fail)"
