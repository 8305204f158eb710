"""Feature capture: the top-k SAE features of chosen tokens, read inside the batched forward pass.

Per step the runner lists, for each request that captures, the rows of the packed batch to read; at the
SAE's site (after steering there) `sae_encode_topk` encodes just those rows; after the forward pass the
results are copied to the host together with the sampled tokens.

A request's SAE is resolved once, when the runner admits it (`admit`), and held until it finishes
(`forget`): deleting or replacing the SAE in the registry meanwhile changes nothing for that request.
`admit` takes it from the runner's cache, where the API loaded it (SteeringResources.load): no registry
read in the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import steerkernels
from steerserve.registry import SAEWeights
from steerserve.runner.steering.resources import SteeringResources
from steerserve.types.requests import FeatureCapture, HiddenCapture, TokenFeatures, TokenHidden
from steerserve.types.sites import Site
from steerserve.types.steering import Positions, SAERef


@dataclass
class _Group:
    """The rows of one SAE to encode this step."""

    weights: SAEWeights
    top_k: int
    rows: list[int] = field(default_factory=list)  # packed-batch rows
    owners: list[tuple[str, int]] = field(default_factory=list)  # (request id, position) per row
    result: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class _Hidden:
    """Rows whose hidden state at a site is copied out as it is."""

    rows: list[int] = field(default_factory=list)
    owners: list[tuple[str, int]] = field(default_factory=list)
    result: torch.Tensor | None = None


class FeatureCapturer:
    def __init__(self, resources: SteeringResources):
        self.resources = resources
        self._weights: dict[str, SAEWeights] = {}  # request id -> the SAE it was admitted with
        self._groups: dict[Site, list[_Group]] = {}
        self._hidden: dict[Site, _Hidden] = {}

    def admit(self, request_id: str, capture: FeatureCapture | HiddenCapture) -> None:
        """Resolve the request's SAE now (raises when it vanished or changed since validation)."""
        if isinstance(capture, FeatureCapture):
            self._weights[request_id] = self.resources.sae(SAERef(capture.sae_id, capture.sae_uid))

    def forget(self, request_id: str) -> None:
        self._weights.pop(request_id, None)

    def sites(self) -> set[Site]:
        return set(self._groups) | set(self._hidden)

    def plan(self, items: list[tuple[str, FeatureCapture, int, int, int, int]]) -> None:
        """items: (request id, capture, q_start, first position, n tokens, n prompt tokens) per request;
        each request was `admit`ted."""
        by_key: dict[tuple[str, int], _Group] = {}
        self._groups, self._hidden = {}, {}
        for rid, cap, q_start, start, n, n_prompt in items:
            if isinstance(cap, HiddenCapture):
                hidden = self._hidden.setdefault(cap.site, _Hidden())
                for k in range(min(n, max(0, n_prompt - start))):  # prompt tokens only
                    hidden.rows.append(q_start + k)
                    hidden.owners.append((rid, start + k))
                continue
            weights = self._weights[rid]
            group = by_key.get((cap.sae_uid, cap.top_k))
            if group is None:
                group = by_key[(cap.sae_uid, cap.top_k)] = _Group(weights, cap.top_k)
                self._groups.setdefault(weights.site, []).append(group)
            for k in range(n):
                pos = start + k
                generated = pos >= n_prompt
                if cap.positions == Positions.ALL or (cap.positions == Positions.GENERATED) == generated:
                    group.rows.append(q_start + k)
                    group.owners.append((rid, pos))

    def collect(self, site: Site, h: torch.Tensor) -> None:
        hidden = self._hidden.get(site)
        if hidden is not None and hidden.rows:
            hidden.result = h.index_select(
                0, torch.tensor(hidden.rows, dtype=torch.int64, device=h.device)
            ).float()
        for group in self._groups.get(site, ()):
            if not group.rows:
                continue
            rows = torch.tensor(group.rows, dtype=torch.int64, device=h.device)
            w = group.weights
            group.result = steerkernels.sae_encode_topk(
                h.index_select(0, rows).float(), w.W_enc, w.b_enc, w.b_dec,
                w.threshold if w.architecture == "jumprelu" else None, w.apply_b_dec_to_input,
                min(group.top_k, w.d_sae), sae_k=w.k,  # TopK: zero outside the token's top k
            )  # fmt: skip

    def results(self) -> dict[str, list[TokenFeatures | TokenHidden]]:
        out: dict[str, list[TokenFeatures | TokenHidden]] = {}
        for hidden in self._hidden.values():
            if hidden.result is not None:
                for (rid, pos), vec in zip(hidden.owners, hidden.result.tolist(), strict=True):
                    out.setdefault(rid, []).append(TokenHidden(pos, tuple(vec)))
        for groups in self._groups.values():
            for group in groups:
                if group.result is None:
                    continue
                values, indices = (t.tolist() for t in group.result)
                for (rid, pos), vals, idx in zip(group.owners, values, indices, strict=True):
                    keep = [(i, v) for i, v in zip(idx, vals, strict=True) if v > 0]
                    out.setdefault(rid, []).append(
                        TokenFeatures(pos, tuple(i for i, _ in keep), tuple(v for _, v in keep))
                    )
        self._groups, self._hidden = {}, {}
        return out
