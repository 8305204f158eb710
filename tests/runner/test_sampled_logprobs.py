"""The logprobs a step reads back (one device->host copy: ids and logprobs travel as one float64 tensor)
are transformers' log-softmax of the same model's logits: the chosen token's, and the top k ids with
theirs, in order, for a batch of requests asking different k (and one asking none)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from steerserve.types.requests import GenerationRequest, SamplingParams
from tests.engine.helpers import tiny_engine


def test_sampled_logprobs_are_transformers_log_softmax(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    built = tiny_engine(model_dir)
    g = torch.Generator().manual_seed(7)
    ks = [5, 0, None, 2]
    prompts = [tuple(torch.randint(0, 300, (6 + 3 * i,), generator=g).tolist()) for i in range(len(ks))]
    try:
        for i, (prompt, k) in enumerate(zip(prompts, ks, strict=True)):
            sp = SamplingParams(max_tokens=5, temperature=0.8, seed=i, logprobs=k, ignore_eos=True)
            built.core.add(GenerationRequest(f"r{i}", prompt, sp))
        tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(ks))}
        lps: dict[str, list] = {f"r{i}": [] for i in range(len(ks))}
        while built.core.has_work():
            for out in built.core.step():
                tokens[out.request_id].extend(out.token_ids)
                lps[out.request_id].extend(out.logprobs)
    finally:
        built.close()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    for i, (prompt, k) in enumerate(zip(prompts, ks, strict=True)):
        rid, toks = f"r{i}", tokens[f"r{i}"]
        if k is None:
            assert lps[rid] == []
            continue
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + tuple(toks)])).logits[0].float()
        ref = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)  # [n, V]: the row each token came from
        assert [lp.token_id for lp in lps[rid]] == toks
        for j, lp in enumerate(lps[rid]):
            assert abs(lp.logprob - ref[j, toks[j]].item()) < 1e-4
            want = torch.topk(ref[j], k) if k else None
            assert len(lp.top) == k
            if k:
                assert [t for t, _ in lp.top] == want.indices.tolist()
                assert all(isinstance(t, int) for t, _ in lp.top)
                torch.testing.assert_close(
                    torch.tensor([v for _, v in lp.top]), want.values, atol=1e-4, rtol=0
                )
