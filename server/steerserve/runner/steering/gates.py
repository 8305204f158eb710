"""Gates on the device: per-token conditions on SAE feature activations (`when`, `stop_when`).

Row r's gates are `spec.gates()` in order, numbered k = 0..G-1 (G = `max_gates`). A gate is read at its
SAE's site from the hidden state as it arrives there, before any intervention at that site; the banks of
gate k (runner/steering/rows.py) then act only on the tokens where `open[:, k]` is set. Requests without gates
pay nothing: with no live gated row none of this runs.

Per step, in order:
  1. `begin_step()`: each token's row, the request segments of the packed batch, and each request's
     latch state (a latched gate stays open from the first token where it held to the request's end);
  2. `evaluate(site, h)` at every gate site: activations of the gate features of each token's row
     (`steerkernels.sae_feature_acts`), `fire = above < a < below`, then `open` = fire, or for latched
     gates: fired at or before this token within the request, or in an earlier step;
  3. `end_step()`: the requests' new latch states, and the stop conditions that held on sampled rows.
Latch states live with the request (the runner keeps them) since rows are shared by identical specs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import steerkernels
from steerserve.registry import SAEWeights
from steerserve.runner.steering.banks import topk_token_threshold
from steerserve.types.sites import Site
from steerserve.types.steering import Gate, SteeringSpec


@dataclass
class _SAEGates:
    """The gates read from one SAE: feature ids per row, -1 where the row has no such gate."""

    weights: SAEWeights
    feat: torch.Tensor  # [R, G] int64
    rows: set[int]


@dataclass(frozen=True, slots=True)
class StopHit:
    """A stop condition that held on a request's sampled row."""

    gate: Gate
    activation: float


class GateTable:
    def __init__(self, num_rows: int, max_gates: int, device):
        self.max_gates = max_gates
        self.device = device
        shape = (num_rows, max_gates)
        self.lo = torch.full(shape, float("-inf"), device=device)  # [R, G]: fires when lo < a < hi
        self.hi = torch.full(shape, float("inf"), device=device)
        self.latch = torch.zeros(shape, dtype=torch.bool, device=device)
        self.is_stop = torch.zeros(shape, dtype=torch.bool, device=device)
        self.by_site: dict[Site, dict[str, _SAEGates]] = {}  # site -> sae uid -> gates
        self.row_gates: dict[int, tuple[Gate, ...]] = {}  # rows that have gates
        self.stop_rows: set[int] = set()
        self._step: _Step | None = None
        self._stop_input = None  # (hit [n, G], acts [n, G], rows) of the last step's sampled rows

    @property
    def active(self) -> bool:
        return bool(self.row_gates)

    def sites(self) -> set[Site]:
        return set(self.by_site)

    def gate_number(self, row: int, gate: Gate) -> int:
        return self.row_gates[row].index(gate)

    # -- rows -----------------------------------------------------------------------------------
    def write(self, row: int, spec: SteeringSpec, saes: dict[str, SAEWeights]) -> None:
        gates = spec.gates()
        if not gates:
            return
        if len(gates) > self.max_gates:
            raise ValueError(f"{len(gates)} gates in one spec; at most {self.max_gates}")
        self.row_gates[row] = gates
        n_when = len(gates) - len(spec.stops)
        for k, g in enumerate(gates):
            group = self.by_site.setdefault(g.site, {}).get(g.sae.uid)
            if group is None:
                feat = torch.full(self.lo.shape, -1, dtype=torch.int64, device=self.device)
                group = self.by_site[g.site][g.sae.uid] = _SAEGates(saes[g.sae.uid], feat, set())
            group.feat[row, k] = g.index
            group.rows.add(row)
            self.lo[row, k] = g.above if g.above is not None else float("-inf")
            self.hi[row, k] = g.below if g.below is not None else float("inf")
            self.latch[row, k] = g.latch
            self.is_stop[row, k] = k >= n_when
        if spec.stops:
            self.stop_rows.add(row)

    def clear_row(self, row: int) -> None:
        if self.row_gates.pop(row, None) is None:
            return
        self.stop_rows.discard(row)
        self.latch[row] = False
        self.is_stop[row] = False
        for site, groups in list(self.by_site.items()):
            for uid, group in list(groups.items()):
                if row in group.rows:
                    group.feat[row] = -1
                    group.rows.discard(row)
                    if not group.rows:
                        del groups[uid]
            if not groups:
                del self.by_site[site]

    # -- per step -------------------------------------------------------------------------------
    def begin_step(self, token_row, pos_class, counts: list[int], state: torch.Tensor) -> None:
        """token_row [T] (-1 = unsteered), pos_class [T]; counts: tokens per request in packed order;
        state [N, G] bool: each request's gates that fired in earlier steps."""
        self._step = _Step.build(token_row, pos_class, counts, state, self.max_gates, self.device)
        self._stop_input = None

    def evaluate(self, site: Site, h: torch.Tensor) -> None:
        """Read the gates at `site` from `h` [T, d] (before any intervention there)."""
        step = self._step
        groups = self.by_site.get(site)
        if step is None or not groups:
            return
        row = step.safe_row
        for group in groups.values():
            w = group.weights
            token_threshold = None
            if w.architecture == "topk":  # NOTE: the rank test needs the full encoder (see banks.py)
                need = (step.token_row >= 0) & (group.feat >= 0).any(1)[row]
                token_threshold = topk_token_threshold(w, h, need)
            acts = steerkernels.sae_feature_acts(
                h,
                step.token_row,
                group.feat,
                w.W_enc,
                w.b_enc,
                w.b_dec,
                w.threshold if w.architecture == "jumprelu" else None,
                w.apply_b_dec_to_input,
                token_threshold=token_threshold,
                validate=False,
            )  # fmt: skip  [T, G], NaN where this SAE has no gate k for the token's row
            read = ~acts.isnan()
            step.acts = torch.where(read, acts, step.acts)
            step.fire |= read & (acts > self.lo[row]) & (acts < self.hi[row])
        step.update_open(self.latch[row])

    def token_slots(self, k: int, token_slot: torch.Tensor) -> torch.Tensor:
        """token_slot [T] with -1 where gate k is closed for the token."""
        return torch.where(self._step.open[:, k], token_slot, -1)

    def end_step(self, sample_tokens: torch.Tensor | None, sample_rows: list[int]) -> torch.Tensor:
        """The requests' new latch states [N, G]; `stop_hits()` may be called before the next step."""
        step, self._step = self._step, None
        if sample_tokens is not None and any(r in self.stop_rows for r in sample_rows):
            rows = torch.tensor(sample_rows, dtype=torch.int64, device=self.device).clamp(min=0)
            hit = step.fire[sample_tokens] & self.is_stop[rows] & step.generated[sample_tokens][:, None]
            self._stop_input = (hit, step.acts[sample_tokens], sample_rows)
        return step.new_state()

    def stop_hits(self) -> list[StopHit | None]:
        """Per sampled row of the last step: the first stop condition that held on its token (or None).
        Call after the step's tokens were copied to the host (one more small copy, no extra sync wait)."""
        if self._stop_input is None:
            return []
        hit, acts, rows = self._stop_input
        self._stop_input = None
        hit_l, acts_l = hit.tolist(), acts.tolist()
        out: list[StopHit | None] = []
        for i, row in enumerate(rows):
            k = next((k for k, h in enumerate(hit_l[i]) if h), None)
            out.append(None if k is None else StopHit(self.row_gates[row][k], acts_l[i][k]))
        return out


@dataclass
class _Step:
    token_row: torch.Tensor  # [T] int64, -1 = unsteered
    safe_row: torch.Tensor  # [T] clamped to a valid row
    token_req: torch.Tensor  # [T] int64: the request of each token, in packed order
    seg: torch.Tensor  # [N + 1] int64: the first token of each request, then T
    state: torch.Tensor  # [N, G] bool: fired in an earlier step
    generated: torch.Tensor  # [T] bool: the token is a generated one
    fire: torch.Tensor  # [T, G] bool
    acts: torch.Tensor  # [T, G] fp32 (0 where unread)
    open: torch.Tensor  # [T, G] bool

    @classmethod
    def build(cls, token_row, pos_class, counts, state, G, device) -> _Step:
        T, N = token_row.shape[0], len(counts)
        token_req = torch.from_numpy(np.repeat(np.arange(N, dtype=np.int64), counts)).to(device)
        seg = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)).to(device)
        closed = torch.zeros((T, G), dtype=torch.bool, device=device)
        return cls(
            token_row=token_row,
            safe_row=token_row.clamp(min=0),
            token_req=token_req,
            seg=seg,
            state=state,
            generated=pos_class == 1,
            fire=closed,
            acts=torch.zeros((T, G), device=device),
            open=closed.clone(),
        )

    def _cum(self) -> torch.Tensor:
        """[T + 1, G]: fires before each token (row 0 = none)."""
        cum = self.fire.to(torch.int32).cumsum(0)
        return torch.cat([torch.zeros_like(cum[:1]), cum])

    def update_open(self, latch: torch.Tensor) -> None:
        """open = fire, or (latched gate) fired earlier in the request, this step or before."""
        cum = self._cum()
        fired_so_far = (cum[1:] - cum[self.seg[:-1]][self.token_req]) > 0  # [T, G]
        self.open = self.fire | (latch & (fired_so_far | self.state[self.token_req]))

    def new_state(self) -> torch.Tensor:
        cum = self._cum()
        return self.state | ((cum[self.seg[1:]] - cum[self.seg[:-1]]) > 0)
