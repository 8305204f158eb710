"""Sampler: seeded draws independent of the batch, filters that keep exactly the right tokens, bans."""

from __future__ import annotations

import pytest
import torch

from steerserve.runner.input_batch import SamplingBatches, build_sampling_batch, new_cached_request
from steerserve.sampling.sampler import Sampler
from steerserve.types.requests import SamplingParams
from steerserve.types.step import ScheduledRequest

V = 50


def cached(sp: SamplingParams, rid: str = "r", prompt=(1, 2, 3)):
    item = ScheduledRequest(rid, prompt, 0, (0,), True, len(prompt), prompt, sp, None)
    import random

    return new_cached_request(item, torch.device("cpu"), random.Random(0))


def sample(reqs, logits):
    batch = build_sampling_batch(reqs, V, torch.device("cpu"))
    return Sampler()(logits.clone(), batch)


def logits_rows(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, V, generator=g) * 3


def test_greedy_is_argmax():
    lg = logits_rows(4)
    reqs = [cached(SamplingParams(temperature=0.0), str(i)) for i in range(4)]
    assert sample(reqs, lg).token_ids.tolist() == lg.argmax(-1).tolist()


def test_seeded_sampling_does_not_depend_on_batch_neighbours():
    target = logits_rows(1, seed=5)[0]
    sp = SamplingParams(temperature=0.9, seed=1234)
    alone_req = cached(sp, "x")
    alone = [sample([alone_req], target[None]).token_ids.item() for _ in range(20)]
    crowd_req = cached(sp, "x")
    others = [cached(SamplingParams(temperature=1.0, seed=i), f"o{i}") for i in range(3)]
    crowd = []
    for step in range(20):
        lg = torch.cat([logits_rows(1, seed=100 + step), target[None], logits_rows(2, seed=200 + step)])
        crowd.append(sample([others[0], crowd_req, others[1], others[2]], lg).token_ids[1].item())
    assert alone == crowd
    assert len(set(alone)) > 1, "a sampled sequence should vary over 20 draws at temperature 0.9"


def test_sampling_follows_the_distribution():
    lg = torch.full((1, V), -1e4)
    lg[0, 3], lg[0, 7] = 0.0, torch.log(torch.tensor(3.0))  # p(3) = 1/4, p(7) = 3/4
    req = cached(SamplingParams(temperature=1.0, seed=0))
    draws = [sample([req], lg).token_ids.item() for _ in range(800)]
    assert set(draws) == {3, 7}
    assert 0.68 < draws.count(7) / 800 < 0.82


@pytest.mark.parametrize(
    ("sp", "allowed"),
    [
        (SamplingParams(temperature=1.0, top_k=3, seed=1), {0, 1, 2}),
        (SamplingParams(temperature=1.0, top_p=0.6, seed=1), {0, 1}),  # 0.4 + 0.3 crosses 0.6
        (SamplingParams(temperature=1.0, min_p=0.5, seed=1), {0, 1}),  # p >= 0.2
    ],
)
def test_filters_keep_exactly_the_right_tokens(sp, allowed):
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05] + [0.0] * (V - 5))
    lg = torch.log(probs.clamp_min(1e-12))[None]
    req = cached(sp)
    seen = {sample([req], lg).token_ids.item() for _ in range(300)}
    assert seen == allowed


def test_logit_bias_minus_100_bans_and_plus_100_forces():
    lg = logits_rows(2)
    top = lg.argmax(-1)
    ban = cached(SamplingParams(temperature=0.0, logit_bias=((int(top[0]), -100.0),)), "a")
    force = cached(SamplingParams(temperature=0.0, logit_bias=((11, 100.0),)), "b")
    out = sample([ban, force], lg).token_ids.tolist()
    assert out[0] != top[0].item() and out[1] == 11


def test_penalties_change_only_seen_tokens():
    lg = logits_rows(1)
    req = cached(SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=1.0), prompt=(4,))
    req.output_counts.update({9: 3})
    batch = build_sampling_batch([req], V, torch.device("cpu"))
    import steerkernels

    out = steerkernels.apply_logit_bias(lg.clone(), *batch.logit_terms())
    expected = lg.clone()
    expected[0, 9] -= 2.0 + 3 * 1.0  # presence once, frequency per occurrence; prompt token 4 untouched
    torch.testing.assert_close(out, expected)


def test_logprobs_are_the_models_log_softmax():
    lg = logits_rows(3)
    reqs = [cached(SamplingParams(temperature=0.0, logprobs=4), str(i)) for i in range(3)]
    out = sample(reqs, lg)
    ref = lg.log_softmax(-1)
    torch.testing.assert_close(out.logprobs, ref.gather(-1, out.token_ids[:, None])[:, 0])
    torch.testing.assert_close(out.top_logprobs, ref.topk(4, -1).values)


def _same_batch(a, b) -> bool:
    fields = ("temperature", "sparse_ids", "sparse_bias", "dense_idx", "penalty_ids", "penalty_counts")
    same = all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields)
    rows = (a.random_rows is None) == (b.random_rows is None)
    return same and rows and a.needs_processing == b.needs_processing and a.generators == b.generators


def test_sampling_batches_reuse_only_what_cannot_have_changed():
    """The runner's batch cache: the same live requests get the batch a fresh build gives (a copy, so a
    grammar mask set on one step's does not reach the next); a new request under an old id, new feature
    bias rows or penalty counts (which change every step) are built again."""
    batches = SamplingBatches()
    dev = torch.device("cpu")
    reqs = [
        cached(SamplingParams(temperature=0.0), "a"),
        cached(SamplingParams(temperature=0.7, seed=3), "b"),
    ]
    first = batches.get(reqs, V, dev)
    first.grammar_bitmask = torch.zeros(2, 2, dtype=torch.int32)
    again = batches.get(reqs, V, dev)
    assert again is not first and again.grammar_bitmask is None
    assert again.temperature is first.temperature  # reused, not built again
    assert _same_batch(again, build_sampling_batch(reqs, V, dev))
    # the same id, a new request: greedy now
    renewed = [reqs[0], cached(SamplingParams(temperature=0.0), "b")]
    got = batches.get(renewed, V, dev)
    assert got.random_rows is None and _same_batch(got, build_sampling_batch(renewed, V, dev))
    # feature bias rows: a new index tensor
    bank = torch.randn(3, V)
    for idx in (torch.tensor([[0], [2]]), torch.tensor([[1], [-1]])):
        got = batches.get(renewed, V, dev, (bank, idx))
        assert torch.equal(got.dense_idx, idx) and got.needs_processing
    # penalties: the counts of this step, every step
    pen = [cached(SamplingParams(temperature=0.0, frequency_penalty=1.0), "p", prompt=(4,))]
    assert batches.get(pen, V, dev).penalty_counts.tolist() == [[0]]
    pen[0].output_counts.update({9: 2})
    counts = batches.get(pen, V, dev)
    assert sorted(zip(counts.penalty_ids[0].tolist(), counts.penalty_counts[0].tolist(), strict=True)) == [
        (4, 0),
        (9, 2),
    ]
