"""Echo and prompt logprobs through a real server equal transformers' log-softmax of the same model's
logits at every prompt position: unsteered, and steered against a plain forward hook adding the same
vector at resid_post (positions "all" and "prompt" steer the prompt; "generated" leaves it as is)."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from tests.scoring.conftest import VECTOR_LAYER, vector
from tests.steering.reference import _load, _register

PROMPT = "The weather in Oslo is cold and grey today"  # 42 bytes: the byte tokenizer adds no BOS
IDS = list(PROMPT.encode())
STRENGTH = 3.0


def reference(model_dir: str, ids: list[int], strength: float = 0.0) -> torch.Tensor:
    """[P-1, V] log-softmax of the HF model's logits at positions 0..P-2, with `strength * vector`
    added to the output of decoder layer VECTOR_LAYER by a plain forward hook."""
    model = _load(model_dir)
    direction = torch.tensor(vector())
    handle = _register(model, VECTOR_LAYER, "resid_post", lambda h: h + strength * direction)
    try:
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0].float()
    finally:
        handle.remove()
    return logits.log_softmax(-1)[:-1]


def assert_prompt_logprobs(entries: list, ids: list[int], ref: torch.Tensor, k: int) -> None:
    """vLLM's shape: null, then {token_id: {logprob, rank, decoded_token}} with the token and the top k."""
    assert entries[0] is None and len(entries) == len(ids)
    for pos, entry in enumerate(entries[1:]):
        target = ids[pos + 1]
        row = ref[pos]
        own = entry[str(target)]
        assert own["logprob"] == pytest.approx(float(row[target]), abs=2e-4), pos
        assert own["rank"] == int((row > row[target]).sum()) + 1
        top = row.topk(k)
        for rank, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist(), strict=True), 1):
            if t != target:
                assert entry[str(t)] == {"logprob": pytest.approx(v, abs=2e-4), "rank": rank,
                                         "decoded_token": entry[str(t)]["decoded_token"]}  # fmt: skip
        assert len(entry) == len(set(top.indices.tolist()) | {target})


def test_echo_scores_the_prompt_like_transformers(scoring_server):
    """The openai SDK's scoring call: echo, logprobs, max_tokens 0."""
    client = openai.OpenAI(base_url=scoring_server.url + "/v1", api_key="x", max_retries=0)
    out = client.completions.create(model="tiny", prompt=PROMPT, echo=True, logprobs=2, max_tokens=0)
    choice = out.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(IDS) and out.usage.completion_tokens == 0
    lp = choice.logprobs
    ref = reference(scoring_server.model_dir, IDS)
    assert "".join(lp.tokens) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [float(ref[i, IDS[i + 1]]) for i in range(len(IDS) - 1)]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=2e-4)
    offsets = [0]
    for t in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp.text_offset == offsets
    for pos in range(1, len(IDS)):  # the token itself and the top 2, keyed by text
        top = ref[pos - 1].topk(2)
        entry = lp.top_logprobs[pos]
        assert entry[lp.tokens[pos]] == pytest.approx(want[pos - 1], abs=2e-4)
        assert len(entry) <= 3
        for t, v in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            if t < 128:  # ASCII: one byte, its own text (other bytes decode to U+FFFD and collide)
                assert entry[chr(t)] == pytest.approx(v, abs=2e-4)


def test_echo_with_generation_appends_the_completion(scoring_server):
    body = {
        "prompt": IDS,
        "echo": True,
        "logprobs": 1,
        "max_tokens": 3,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    r = httpx.post(scoring_server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(IDS) + 3 and choice["text"].startswith(PROMPT)
    assert choice["text"] == "".join(lp["tokens"])
    assert lp["text_offset"][len(IDS)] == len(PROMPT)  # the sampled tokens' offsets follow the prompt
    ref = reference(scoring_server.model_dir, IDS)
    assert lp["token_logprobs"][1 : len(IDS)] == pytest.approx(
        [float(ref[i, IDS[i + 1]]) for i in range(len(IDS) - 1)], abs=2e-4
    )
    # streamed: the first chunk starts with the prompt
    chunks = []
    with httpx.stream("POST", scoring_server.url + "/v1/completions", json=body | {"stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                chunks.append(httpx.Response(200, content=line[6:]).json())
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == choice["text"]
    streamed_lps = [x for c in chunks if c["choices"] for x in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed_lps[: len(IDS)] == pytest.approx(lp["token_logprobs"][: len(IDS)], abs=1e-6)


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_steered_prompt_logprobs_equal_a_forward_hook(scoring_server, positions):
    """/v1/completions `prompt_logprobs` under a vector add, with its unsteered twin beside it."""
    steering = [{"vector": "v", "mode": "add", "strength": STRENGTH, "positions": positions}]
    body = {
        "prompt": IDS, "max_tokens": 1, "prompt_logprobs": 3, "steering": steering, "return_unsteered": True,
        "temperature": 0.0,
    }  # fmt: skip
    r = httpx.post(scoring_server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    steered, twin = r.json()["choices"]
    assert steered["steered"] and not twin["steered"]
    plain = reference(scoring_server.model_dir, IDS)
    hooked = reference(scoring_server.model_dir, IDS, STRENGTH)
    assert (hooked - plain).abs().max() > 0.05  # the vector moves the scores: the test can fail
    assert_prompt_logprobs(steered["prompt_logprobs"], IDS, plain if positions == "generated" else hooked, 3)
    assert_prompt_logprobs(twin["prompt_logprobs"], IDS, plain, 3)


def test_generate_and_chat_report_prompt_logprobs(scoring_server):
    steering = [{"vector": "v", "mode": "add", "strength": STRENGTH}]
    body = {
        "prompt": IDS,
        "max_tokens": 2,
        "prompt_logprobs": 1,
        "steering": steering,
        "return_unsteered": True,
    }
    r = httpx.post(scoring_server.url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert_prompt_logprobs(out["prompt_logprobs"], IDS, reference(scoring_server.model_dir, IDS, STRENGTH), 1)
    assert_prompt_logprobs(
        out["unsteered"]["prompt_logprobs"], IDS, reference(scoring_server.model_dir, IDS), 1
    )

    events = []
    with httpx.stream("POST", scoring_server.url + "/generate", json=body | {"stream": True}) as s:
        events = [
            httpx.Response(200, content=x[6:]).json() for x in s.iter_lines() if x.startswith("data: {")
        ]
    streamed = {e["index"]: e["prompt_logprobs"] for e in events if "prompt_logprobs" in e}
    assert sorted(streamed) == [0, 1]  # the steered choice and its twin, each once
    for index, whole in ((0, out["prompt_logprobs"]), (1, out["unsteered"]["prompt_logprobs"])):
        got = [None if e is None else {t: v["logprob"] for t, v in e.items()} for e in streamed[index]]
        want = [None if e is None else {t: v["logprob"] for t, v in e.items()} for e in whole]
        assert got == [None if w is None else pytest.approx(w, abs=1e-5) for w in want]

    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Is it cold in Oslo?"}]
    chat_ids = AutoTokenizer.from_pretrained(scoring_server.model_dir).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    body = {"messages": messages, "max_tokens": 1, "prompt_logprobs": 0, "steering": steering}
    r = httpx.post(scoring_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert r.json()["usage"]["prompt_tokens"] == len(chat_ids)
    assert_prompt_logprobs(
        choice["prompt_logprobs"], chat_ids, reference(scoring_server.model_dir, chat_ids, STRENGTH), 0
    )


def test_max_tokens_zero_needs_echo(scoring_server):
    r = httpx.post(scoring_server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    r = httpx.post(scoring_server.url + "/generate", json={"prompt": PROMPT, "prompt_logprobs": 10**6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text
