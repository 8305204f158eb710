"""Prompt logprobs inside the engine: chunked prefill reports each position once, preemption (a cache
too small for the batch: requests recomputed from their first token) reports none twice, and max_tokens 0
scores the prompt and finishes with no token; every value equals transformers' log-softmax."""

from __future__ import annotations

import torch

from steerserve.runner.model_loader import build_random_model
from steerserve.sampling import sampler
from steerserve.types.requests import FinishReason, GenerationRequest, SamplingParams
from tests.engine.helpers import tiny_engine

PROMPT_LEN, MAX_TOKENS, N = 40, 60, 5


def _prompt(i: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(100 + i)
    return tuple(torch.randint(0, 256, (PROMPT_LEN,), generator=g).tolist())


def test_chunked_and_preempted_requests_report_each_prompt_token_once(monkeypatch):
    monkeypatch.setattr(sampler, "_SCORE_BLOCK", 7 * 300)  # rows scored 7 at a time: the blocked path
    # 256 cache tokens for 5 requests of 100 tokens: some are preempted and recomputed
    core = tiny_engine("random:gpt2", max_num_seqs=8, budget_tokens=64, chunk=16, block_size=16,
                       kv_gb=256 * 1024 / 2**30, max_model_len=256).core  # fmt: skip
    reqs = [
        GenerationRequest(
            f"r{i}",
            _prompt(i),
            SamplingParams(
                max_tokens=0 if i == N - 1 else MAX_TOKENS,
                temperature=0.0,
                ignore_eos=True,
                prompt_logprobs=2,
            ),
        )  # fmt: skip
        for i in range(N)
    ]
    for r in reqs:
        core.add(r)
    got: dict[str, list] = {r.request_id: [] for r in reqs}
    reasons, n_tokens = {}, {r.request_id: 0 for r in reqs}
    while core.has_work():
        for out in core.step():
            got[out.request_id].extend(out.prompt_logprobs)
            n_tokens[out.request_id] += len(out.token_ids)
            if out.finish_reason is not None:
                reasons[out.request_id] = out.finish_reason
    assert core.scheduler.num_preemptions > 0, "the test needs preemption"
    assert reasons == {r.request_id: FinishReason.LENGTH for r in reqs}
    assert n_tokens == {r.request_id: 0 if r.sampling.max_tokens == 0 else MAX_TOKENS for r in reqs}

    model, _ = build_random_model("gpt2")
    for r in reqs:
        with torch.inference_mode():
            ref = model(torch.tensor([r.prompt_token_ids])).logits[0, :-1].float().log_softmax(-1)
        lps = got[r.request_id]
        assert [lp.token_id for lp in lps] == list(r.prompt_token_ids[1:])  # each position once, in order
        want = ref.gather(-1, torch.tensor(r.prompt_token_ids[1:])[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in lps]), want, atol=2e-4, rtol=0)
        top = ref.topk(2)
        assert [[t for t, _ in lp.top] for lp in lps] == top.indices.tolist()
        assert [lp.rank for lp in lps] == ((ref > want[:, None]).sum(-1) + 1).tolist()
