"""Per-row steering state on the device, and the hooks that apply it inside the forward pass.

A row holds one SteeringSpec: written once when its first request is admitted, shared by every live
request with the same fingerprint, cleared when the last one finishes. Per step the runner tells
`begin_step()` each token's row and position class; the runner's site hooks (runner/site_hooks.py) then
call `apply()` at the sites any live row uses. No live row at a site = no hook there = no cost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from steerserve.config import SteeringConfig
from steerserve.sites import Site
from steerserve.steering.banks import SiteBank
from steerserve.steering.resources import SteeringResources
from steerserve.steering.spec import Intervention, SteeringSpec

logger = logging.getLogger(__name__)


@dataclass
class _Row:
    index: int
    refs: int
    spec: SteeringSpec
    has_logit_bias: bool


def _feature_add_coeff(iv: Intervention, w_dec_row: torch.Tensor) -> float:
    if iv.scale == "unit":
        return iv.value / float(w_dec_row.norm())
    if iv.scale == "max_activation":
        return iv.value * float(iv.max_activation)
    return iv.value


class SteeringRows:
    def __init__(self, cfg: SteeringConfig, model, resources: SteeringResources, vocab_size: int):
        self.cfg = cfg
        self.resources = resources
        self.device = resources.device
        self.d_model = model.config.hidden_size
        self.vocab_size = vocab_size
        self._rows: dict[str, _Row] = {}
        self._free = list(range(cfg.max_steering_rows - 1, -1, -1))
        self.banks: dict[Site, SiteBank] = {}
        self._logit_bank: torch.Tensor | None = None  # [R, V], allocated on first use
        self._token_row: torch.Tensor | None = None  # [T] this step
        self._token_slot: torch.Tensor | None = None  # [T]

    @property
    def num_rows_in_use(self) -> int:
        return len(self._rows)

    # -- rows -----------------------------------------------------------------------------------
    def acquire(self, spec: SteeringSpec) -> int:
        row = self._rows.get(spec.fingerprint)
        if row is not None:
            row.refs += 1
            return row.index
        if not self._free:
            raise RuntimeError("no free steering row: the scheduler admitted more specs than rows")
        index = self._free.pop()
        try:
            self._write(index, spec)
        except Exception:
            self._clear(index, spec)
            self._free.append(index)
            raise
        self._rows[spec.fingerprint] = _Row(index, 1, spec, bool(spec.logit_biases))
        return index

    def release(self, spec: SteeringSpec) -> None:
        row = self._rows[spec.fingerprint]
        row.refs -= 1
        if row.refs > 0:
            return
        del self._rows[spec.fingerprint]
        self._clear(row.index, spec)
        self._free.append(row.index)

    def _bank(self, site: Site) -> SiteBank:
        bank = self.banks.get(site)
        if bank is None:
            bank = self.banks[site] = SiteBank(
                self.cfg.max_steering_rows, self.d_model, self.cfg, self.device
            )
        return bank

    def _write(self, row: int, spec: SteeringSpec) -> None:
        res = self.resources
        saes = {iv.sae.uid: res.sae(iv.sae) for iv in spec.interventions if iv.sae is not None}  # once each
        for iv in spec.interventions:
            bank = self._bank(iv.site)
            if iv.kind == "feature_add":
                w_dec = saes[iv.sae.uid].W_dec[iv.index]  # [d]
                bank.add_vector(row, iv.positions, _feature_add_coeff(iv, w_dec) * w_dec.float())
            elif iv.kind == "vector_add":
                bank.add_vector(
                    row, iv.positions, iv.value * res.vector(iv.vector_id, iv.vector_uid, iv.site)
                )
            elif iv.kind == "vector_project":
                v = res.vector(iv.vector_id, iv.vector_uid, iv.site)
                bank.add_projection(row, iv.positions, v / v.norm(), iv.lo, iv.hi)
            else:
                bank.add_edit(row, iv.positions, iv.sae.uid, saes[iv.sae.uid], iv.index, iv.kind, iv.value)
        if spec.logit_biases:
            if self._logit_bank is None:
                self._logit_bank = torch.zeros(
                    (self.cfg.max_steering_rows, self.vocab_size), device=self.device
                )
            total = torch.zeros(self.vocab_size, device=self.device)
            for term in spec.logit_biases:
                total += term.strength * res.logit_effect(term.sae, term.index)
            self._logit_bank[row] = total

    def _clear(self, row: int, spec: SteeringSpec) -> None:
        for site in spec.sites():
            if site in self.banks:
                self.banks[site].clear_row(row)
                if self.banks[site].idle:
                    del self.banks[site]
        if self._logit_bank is not None:
            self._logit_bank[row].zero_()

    # -- inside the forward pass ----------------------------------------------------------------
    def sites(self) -> set[Site]:
        return set(self.banks)

    def apply(self, site: Site, h: torch.Tensor) -> None:
        """Edit `h` [T, d] at `site` in place for this step's steered tokens."""
        bank = self.banks.get(site)
        if bank is not None and self._token_row is not None:
            bank.apply(h, self._token_row, self._token_slot)

    # -- per step -------------------------------------------------------------------------------
    def begin_step(self, token_row: torch.Tensor | None, pos_class: torch.Tensor) -> None:
        """token_row [T] int64 (-1 = unsteered), pos_class [T] int8 for the coming forward pass."""
        if token_row is None or not self.banks:
            self._token_row = self._token_slot = None
            return
        self._token_row = token_row
        self._token_slot = torch.where(token_row >= 0, 2 * token_row + pos_class.long(), -1)

    def end_step(self) -> None:
        self._token_row = self._token_slot = None

    def logit_bias(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(dense_bank [R, V], dense_idx [n, 1], dense_scale [n, 1]) for sampled rows; None when unused."""
        if self._logit_bank is None:
            return None
        with_bias = {r.index for r in self._rows.values() if r.has_logit_bias}
        if not any(r in with_bias for r in rows):
            return None
        idx = torch.tensor([[r if r in with_bias else -1] for r in rows], dtype=torch.int64)
        scale = torch.ones((len(rows), 1), dtype=torch.float32)
        return self._logit_bank, idx.to(self.device), scale.to(self.device)
