"""`prompt_scores` (the prompt-logprob pass) scores in cache-sized blocks of rows; every block size gives
torch's own log-softmax of the fp32 logits, bit for bit, with the top k and the ranks it implies."""

from __future__ import annotations

import pytest
import torch

from steerserve.sampling import sampler


def reference(logits: torch.Tensor, targets: torch.Tensor, k: int):
    ls = logits.float().log_softmax(-1)
    chosen = ls.gather(-1, targets[:, None])
    return chosen.squeeze(-1), ls.topk(k, dim=-1) if k else None, (ls > chosen).sum(-1) + 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block", [None, 7 * 1031, 1])  # the default; 7 rows at a time; one row at a time
def test_blocks_equal_one_log_softmax(monkeypatch, dtype, block):
    if block is not None:
        monkeypatch.setattr(sampler, "_CPU_SCORE_BLOCK", block)
    g = torch.Generator().manual_seed(11)
    rows, vocab, k = 45, 1031, 3  # 45 rows: the last block of 7 is short
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    want_lp, want_top, want_rank = reference(logits, targets, k)
    got = sampler.prompt_scores(logits, targets, k)
    assert torch.equal(got.logprobs, want_lp)
    assert torch.equal(got.top_ids, want_top.indices) and torch.equal(got.top_logprobs, want_top.values)
    assert torch.equal(got.ranks, want_rank)
    assert got.ranks.min() >= 1 and got.ranks.max() > k  # most targets are not in the top k


def test_no_top_k_and_no_ranks_when_not_asked():
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(9, 300, generator=g)
    targets = torch.randint(0, 300, (9,), generator=g)
    got = sampler.prompt_scores(logits, targets, 0, ranks=False)
    assert got.top_ids is None and got.top_logprobs is None and got.ranks is None
    assert torch.equal(got.logprobs, reference(logits, targets, 0)[0])
