"""lm-evaluation-harness against a real server: its `local-completions` model (OpenAI completions with
echo and logprobs) on the tiny tasks in lm_eval_tasks/ (local files, no download) gives the same
per-document loglikelihoods and generations as lm-eval's own `hf` model on the same weights; and
`model="tiny:cold"` evaluates the steered variant, equal to the `hf` model with a plain forward hook
adding the variant's vector."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from tests.scoring.conftest import VECTOR_LAYER, vector
from tests.steering.reference import _register

# NOTE: lm_eval (datasets, pyarrow) is imported inside the test, not at collection: the whole suite's
# process then only loads it when this test runs

TASKS = str(Path(__file__).parent / "lm_eval_tasks")
STRENGTH = 3.0


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")


def _evaluate(lm, tasks) -> dict[str, list]:
    """{task: [per-document responses]}, in document order (loglikelihoods, or generated text). In a
    thread of its own: local-completions calls asyncio.run(), which refuses a thread whose event loop
    another test left running."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(_evaluate_here, lm, tasks).result()


def _evaluate_here(lm, tasks) -> dict[str, list]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=TaskManager(include_path=TASKS, include_defaults=False),
        log_samples=True, bootstrap_iters=0, random_seed=0,
    )  # fmt: skip
    per_task = {}
    for task, samples in out["samples"].items():
        samples = sorted(samples, key=lambda s: s["doc_id"])
        per_task[task] = [[r[0] for r in s["resps"]] for s in samples]
    return per_task


def _served(server, model: str, tokenizer: str):
    from lm_eval.api.registry import get_model

    return get_model("local-completions")(
        base_url=server.url + "/v1/completions", model=model, tokenizer=tokenizer,
        tokenizer_backend="huggingface", tokenized_requests=True, num_concurrent=4, max_retries=1,
    )  # fmt: skip


def _hf(model_dir: str):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    return HFLM(pretrained=model, tokenizer=model_dir, batch_size=1, device="cpu"), model


def _loglikelihoods(resps) -> torch.Tensor:
    return torch.tensor([[ll for ll, _ in doc] for doc in resps])


@pytest.mark.parametrize("scoring_server", ["gpt2"], indirect=True)  # per arch: test_prompt_logprobs.py
def test_local_completions_equals_the_hf_model(scoring_server):
    pytest.importorskip("lm_eval")
    r = httpx.post(
        scoring_server.url + "/v1/variants",
        json={"id": "cold", "steering": [{"vector": "v", "mode": "add", "strength": STRENGTH}]},
    )
    assert r.status_code in (201, 409), r.text
    model_dir = scoring_server.model_dir
    hf, hf_model = _hf(model_dir)

    ours = _evaluate(_served(scoring_server, "tiny", model_dir), ["steer_mc", "steer_gen"])
    theirs = _evaluate(hf, ["steer_mc", "steer_gen"])
    ll_ours, ll_theirs = _loglikelihoods(ours["steer_mc"]), _loglikelihoods(theirs["steer_mc"])
    assert ll_ours.shape == (6, 4)
    torch.testing.assert_close(ll_ours, ll_theirs, atol=1e-3, rtol=0)
    # the greedy flags, and the generations
    assert [[g for _, g in d] for d in ours["steer_mc"]] == [[g for _, g in d] for d in theirs["steer_mc"]]
    assert ours["steer_gen"] == theirs["steer_gen"]

    # the steered variant through the model name, against the hf model with a plain hook
    steered = _evaluate(_served(scoring_server, "tiny:cold", model_dir), ["steer_mc"])
    direction = torch.tensor(vector())
    handle = _register(hf_model, VECTOR_LAYER, "resid_post", lambda h: h + STRENGTH * direction)
    try:
        hooked = _evaluate(hf, ["steer_mc"])
    finally:
        handle.remove()
    ll_steered, ll_hooked = _loglikelihoods(steered["steer_mc"]), _loglikelihoods(hooked["steer_mc"])
    torch.testing.assert_close(ll_steered, ll_hooked, atol=1e-3, rtol=0)
    assert (ll_steered - ll_ours).abs().max() > 0.05  # the variant changes the scores
