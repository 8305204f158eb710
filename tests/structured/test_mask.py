"""The sampler's grammar mask (both paths: xgrammar's CPU kernel, and the shifts used on other devices)
against a plain reading of the bitmask: bit j of word w allows token 32w + j."""

from __future__ import annotations

import pytest
import torch

from steerserve.sampling import sampler


def _reference(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    out = logits.clone()
    for r in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if not (int(bitmask[r, t // 32]) >> (t % 32)) & 1:
                out[r, t] = float("-inf")
    return out


@pytest.mark.parametrize("path", ["cpu_kernel", "shifts"])
def test_mask_matches_bitmask(path):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 77, generator=gen)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, 3), dtype=torch.int32, generator=gen)
    bitmask[2] = -1  # an unconstrained row: untouched
    kept = logits.clone()
    if path == "cpu_kernel":  # NOTE: in place: the sampler owns its logits
        got = sampler._apply_grammar(logits.clone(), bitmask)
    else:  # what runs on CUDA, run here on CPU tensors
        got = sampler._mask_by_shifts(logits, bitmask)
        assert torch.equal(logits, kept)  # a new tensor
    assert torch.equal(got, _reference(kept, bitmask))
    assert torch.equal(got[2], kept[2])
    assert torch.isinf(got).any()
