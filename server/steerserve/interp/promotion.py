"""Search by effect: which features' direct logit effect ranks a token highest.

A feature's effect on token t relative to its effect on the whole vocabulary is the z-score
`z_f(t) = (u_t - mean u) . n_f / sqrt(n_f^T C n_f)`, with `n_f = N(W_dec[f]) - N(0)` the normalised
direction (runner/steering/resources.py), `u_t` the unembedding row of t, and `C` the covariance of the
unembedding rows. `C` (d x d) is computed once per model, so every feature of an SAE is scored with
two matrix products instead of materialising its `[d_sae, V]` effect table.
"""

from __future__ import annotations

import threading

import torch

from steerserve.runner.model_adapter import model_adapter
from steerserve.runner.steering.resources import SteeringResources
from steerserve.types.steering import SAERef


class PromotionIndex:
    def __init__(self, resources: SteeringResources):
        self.resources = resources
        self._lock = threading.Lock()
        self._stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # U, mean, C
        self._normed: dict[str, torch.Tensor] = {}  # sae uid -> [d_sae, d]

    def _unembedding_stats(self):
        if self._stats is None:
            U = model_adapter(self.resources.model).unembedding().weight.detach().float()  # [V, d]
            mean = U.mean(0)
            centered = U - mean
            self._stats = (U, mean, centered.t() @ centered / U.shape[0])
        return self._stats

    def _normed_directions(self, ref: SAERef) -> torch.Tensor:
        n = self._normed.get(ref.uid)
        if n is None:
            W_dec = self.resources.load_sae(ref).W_dec.float()  # [d_sae, d]
            adapter = model_adapter(self.resources.model)
            params = list(adapter.final_norm().parameters())
            dtype = params[0].dtype if params else W_dec.dtype
            rows = [adapter.normed(chunk, dtype).float() for chunk in W_dec.split(4096)]
            n = self._normed[ref.uid] = torch.cat(rows)
        return n

    @torch.inference_mode()
    def scores(self, ref: SAERef, token_id: int) -> torch.Tensor:
        """[d_sae] z-scores of `token_id` in each feature's direct logit effect."""
        with self._lock:
            U, mean, C = self._unembedding_stats()
            n = self._normed_directions(ref)  # [d_sae, d]
            centered_t = (U[token_id] - mean).to(n.device)
            spread = ((n @ C.to(n.device)) * n).sum(-1).clamp_min(1e-12).sqrt()  # [d_sae]
            return (n @ centered_t) / spread
