"""Our side of the parity tests: the steerkernels ops exactly as the server calls them (a TopK SAE's
per-token rank threshold from runner/steering/banks.py), on one backend."""

from __future__ import annotations

import torch

import steerkernels as sk
from steerserve.registry import SAEWeights
from steerserve.runner.steering.banks import topk_token_threshold

MODES = {"clamp": 0, "scale": 1, "ablate": 2}
BACKENDS = ("torch", "cpu", "triton")


def token_threshold(w: SAEWeights, x: torch.Tensor) -> torch.Tensor | None:
    if w.architecture != "topk":
        return None
    return topk_token_threshold(w, x, torch.ones(x.shape[0], dtype=torch.bool, device=x.device))


def all_acts(w: SAEWeights, x: torch.Tensor, backend: str) -> torch.Tensor:
    """[T, d_sae] every feature's activation through `sae_feature_acts` (what gates read)."""
    T = x.shape[0]
    slot = torch.zeros(T, dtype=torch.int64, device=x.device)
    feat = torch.arange(w.d_sae, device=x.device)[None]  # one slot naming every feature
    return sk.sae_feature_acts(
        x, slot, feat, w.W_enc, w.b_enc, w.b_dec, w.threshold, w.apply_b_dec_to_input,
        token_threshold=token_threshold(w, x), backend=backend,
    )  # fmt: skip


def top_k(w: SAEWeights, x: torch.Tensor, k: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`sae_encode_topk` as /v1/inspect and return_features call it (runner/steering/capture.py)."""
    return sk.sae_encode_topk(
        x, w.W_enc, w.b_enc, w.b_dec, w.threshold, w.apply_b_dec_to_input, k, sae_k=w.k, backend=backend
    )


def dense(values: torch.Tensor, indices: torch.Tensor, d_sae: int) -> torch.Tensor:
    return torch.zeros(values.shape[0], d_sae, device=values.device).scatter(1, indices, values)


def edit(
    w: SAEWeights, x: torch.Tensor, feats: torch.Tensor, mode: str, values: torch.Tensor, backend: str
) -> torch.Tensor:
    """`sae_edit` of features feats [T, F] on every token of x (each token its own slot), out of place."""
    T, F = feats.shape
    slot = torch.arange(T, device=x.device)
    modes = torch.full((T, F), MODES[mode], dtype=torch.int64, device=x.device)
    return sk.sae_edit(
        x.clone(), slot, feats, w.W_enc, w.b_enc, w.W_dec, w.b_dec, w.threshold, w.apply_b_dec_to_input,
        modes, values.float(), token_threshold=token_threshold(w, x), backend=backend,
    )  # fmt: skip
