"""SiteBank's feature edits as a slot-local SAE: the same result as `sae_edit` on the whole SAE, through
column growth, row clears and reuse; slots without work at a site stay bit-identical."""

from __future__ import annotations

import pytest
import torch

import steerkernels
from steerserve.config import SteeringConfig
from steerserve.registry import SAEWeights
from steerserve.runner.steering.banks import SiteBank
from steerserve.types.sites import Site

D, D_SAE, ROWS = 24, 40, 5
MODES = {"feature_clamp": 0, "feature_scale": 1, "feature_ablate": 2}


def sae(gen, architecture: str) -> SAEWeights:
    return SAEWeights(
        W_enc=torch.randn(D, D_SAE, generator=gen) / D**0.5,
        b_enc=torch.randn(D_SAE, generator=gen) * 0.2,
        W_dec=torch.randn(D_SAE, D, generator=gen),
        b_dec=torch.randn(D, generator=gen) * 0.1,
        architecture=architecture,
        site=Site(0, "resid_post"),
        apply_b_dec_to_input=True,
        threshold=torch.rand(D_SAE, generator=gen) * 0.3 if architecture == "jumprelu" else None,
    )


def expected(h, token_slot, edits_by_slot, w: SAEWeights) -> torch.Tensor:
    """`sae_edit` on the whole SAE (torch reference) with the same edits as padded [2R, F] tables."""
    F = max(len(e) for e in edits_by_slot.values())
    feat = torch.full((2 * ROWS, F), -1, dtype=torch.int64)
    mode = torch.zeros((2 * ROWS, F), dtype=torch.int64)
    value = torch.zeros((2 * ROWS, F))
    for slot, edits in edits_by_slot.items():
        for j, (index, kind, v) in enumerate(edits):
            feat[slot, j], mode[slot, j], value[slot, j] = index, MODES[kind], v
    return steerkernels.sae_edit(
        h.clone(), token_slot, feat, w.W_enc, w.b_enc, w.W_dec, w.b_dec, w.threshold,
        w.apply_b_dec_to_input, mode, value, backend="torch",
    )  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("architecture", ["relu", "jumprelu"])
def test_slot_local_edits_equal_sae_edit_on_the_whole_sae(backend, architecture, monkeypatch):
    if backend == "cpu" and not steerkernels.cpu.available():
        pytest.skip("the C++ CPU backend cannot be built here")
    monkeypatch.setenv("STEERKERNELS_BACKEND", backend)
    gen = torch.Generator().manual_seed(7)
    w = sae(gen, architecture)
    bank = SiteBank(ROWS, D, SteeringConfig(max_steering_rows=ROWS), torch.device("cpu"))
    uid = "sae-uid"
    plan = {  # row -> [(positions, index, kind, value)]; row 1 grows its columns 1 -> 2 -> 4 -> 8
        0: [("all", 3, "feature_clamp", 4.0)],
        1: [
            ("all", i, kind, v)
            for i, kind, v in [
                (5, "feature_scale", 3.0),
                (5, "feature_clamp", 1.0),
                (D_SAE - 1, "feature_ablate", 0.5),
                (0, "feature_clamp", -2.0),
                (9, "feature_scale", 0.0),
                (11, "feature_clamp", 2.5),
            ]
        ],  # fmt: skip
        3: [("generated", 7, "feature_clamp", 6.0), ("prompt", 8, "feature_ablate", 0.0)],
    }
    for row, items in plan.items():
        for positions, index, kind, value in items:
            bank.add_edit(row, positions, uid, w, index, kind, value)
    assert bank.edits[uid].enc.shape[1] == 8, "six edits in one slot: the columns doubled to 8"

    def by_slot() -> dict[int, list]:
        out: dict[int, list] = {}
        for row, items in plan.items():
            for positions, index, kind, value in items:
                for slot in {
                    "all": (2 * row, 2 * row + 1),
                    "prompt": (2 * row,),
                    "generated": (2 * row + 1,),
                }[positions]:
                    out.setdefault(slot, []).append((index, kind, value))
        return out

    token_slot = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, -1, 3, 2, 9, 8])  # row 2 and row 4 have no edits
    h = torch.randn(len(token_slot), D, generator=gen) * 2
    got = h.clone()
    bank.apply(got, token_slot)
    want = expected(h, token_slot, by_slot(), w)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    idle = torch.tensor([s < 0 or s // 2 not in plan for s in token_slot.tolist()])
    assert torch.equal(got[idle], h[idle]), "tokens of rows without edits here are not written"
    assert not torch.allclose(got[~idle], h[~idle])

    bank.clear_row(1)  # its slots now have no work; the others keep theirs
    plan.pop(1)
    bank.add_edit(1, "all", uid, w, 30, "feature_clamp", 5.0)  # the row reused by another spec
    plan[1] = [("all", 30, "feature_clamp", 5.0)]
    got = h.clone()
    bank.apply(got, token_slot)
    torch.testing.assert_close(got, expected(h, token_slot, by_slot(), w), rtol=2e-5, atol=2e-5)

    for row in list(plan):
        bank.clear_row(row)
    assert bank.idle and uid not in bank.edits
