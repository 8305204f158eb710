"""Per-row steering state on the device, and the hooks that apply it inside the forward pass.

A row holds one SteeringSpec: written once when its first request is admitted, shared by every live
request with the same fingerprint, cleared when the last one finishes. Per step the runner tells
`begin_step()` each token's row and position class; the runner's site hooks (runner/site_hooks.py) then
call `apply()` at the sites any live row uses. No live row at a site = no hook there = no cost.

Banks are keyed by (site, gate number): k = -1 holds the ungated interventions, k >= 0 those gated by
the row's gate k (runner/steering/gates.py). At a site, in order: what transcoder edits read earlier in this
pass write here (runner/steering/banks.py), the gates read there, the ungated bank, then the gated banks in
gate order. A transcoder feature's `add` goes to the bank of the site where it writes (`write_site`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from steerserve.config import SteeringConfig
from steerserve.registry import SAEWeights
from steerserve.runner.steering.banks import SiteBank
from steerserve.runner.steering.gates import GateTable, StopHit
from steerserve.runner.steering.resample import DrawContext
from steerserve.runner.steering.resources import SteeringResources
from steerserve.types.sites import Site
from steerserve.types.steering import (
    FeatureAblate,
    FeatureAdd,
    FeatureClamp,
    FeatureEdit,
    FeatureResample,
    FeatureScale,
    Intervention,
    SteeringSpec,
    VectorAdd,
    VectorProject,
    VectorResample,
)

logger = logging.getLogger(__name__)


@dataclass
class _Row:
    index: int
    refs: int
    spec: SteeringSpec
    has_logit_bias: bool
    resamples: bool  # draws per token: the runner passes each token's request key (begin_step)


class SteeringRows:
    def __init__(self, cfg: SteeringConfig, model, resources: SteeringResources, vocab_size: int):
        self.cfg = cfg
        self.resources = resources
        self.device = resources.device
        self.d_model = model.config.hidden_size
        self.vocab_size = vocab_size
        self._rows: dict[str, _Row] = {}
        self._free = list(range(cfg.max_steering_rows - 1, -1, -1))
        self.banks: dict[Site, dict[int, SiteBank]] = {}  # site -> gate number (-1 = none) -> bank
        self.gates = GateTable(cfg.max_steering_rows, cfg.max_gates, self.device)
        self._logit_bank: torch.Tensor | None = None  # [R, V], allocated on first use
        # the last step's sampled rows and their bank rows: decode steps repeat them until a row changes
        self._bias_idx: tuple[tuple[int, ...], torch.Tensor] | None = None
        self._token_row: torch.Tensor | None = None  # [T] this step
        self._token_slot: torch.Tensor | None = None  # [T]
        self._draws: DrawContext | None = None  # this step's request keys and positions, when resampling
        self._gated = False  # this step evaluates gates
        self._pending: dict[Site, torch.Tensor] = {}  # transcoder edits' [T, d] deltas, by write site

    @property
    def num_rows_in_use(self) -> int:
        return len(self._rows)

    # -- rows -----------------------------------------------------------------------------------
    def prepare(self, specs: list[SteeringSpec]) -> None:
        """Before a step admits `specs`: compute the logit effects their new rows need in one readout."""
        new = [s for s in specs if s.fingerprint not in self._rows and s.logit_biases]
        if new:
            self.resources.logit_effects([(t.sae, t.index) for s in new for t in s.logit_biases])

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
        resamples = any(isinstance(iv, FeatureResample | VectorResample) for iv in spec.interventions)
        self._rows[spec.fingerprint] = _Row(index, 1, spec, bool(spec.logit_biases), resamples)
        return index

    def release(self, spec: SteeringSpec) -> None:
        row = self._rows[spec.fingerprint]
        row.refs -= 1
        if row.refs > 0:
            return
        del self._rows[spec.fingerprint]
        self._clear(row.index, spec)
        self._free.append(row.index)

    def _bank(self, site: Site, k: int) -> SiteBank:
        by_gate = self.banks.setdefault(site, {})
        bank = by_gate.get(k)
        if bank is None:
            bank = by_gate[k] = SiteBank(self.cfg.max_steering_rows, self.d_model, self.cfg, self.device)
            self.banks[site] = dict(sorted(by_gate.items()))  # ungated first, then gate order
        return bank

    def _write(self, row: int, spec: SteeringSpec) -> None:
        self._bias_idx = None
        res = self.resources
        writers = [_writer(iv) for iv in spec.interventions]  # NOTE: an unknown type fails before a write
        refs = [iv.sae for iv in spec.interventions if isinstance(iv, FeatureAdd | FeatureEdit)]
        saes: dict[str, SAEWeights] = {}
        for ref in refs + [g.sae for g in spec.gates()]:  # NOTE: one registry lookup per SAE
            if ref.uid not in saes:
                saes[ref.uid] = res.sae(ref)
        self.gates.write(row, spec, saes)
        for stream, (iv, write) in enumerate(zip(spec.interventions, writers, strict=True)):
            k = -1 if iv.gate is None else self.gates.gate_number(row, iv.gate)
            write(self, row, k, iv, saes, stream)
        if spec.logit_biases:
            if self._logit_bank is None:
                self._logit_bank = torch.zeros(
                    (self.cfg.max_steering_rows, self.vocab_size), device=self.device
                )
            total = torch.zeros(self.vocab_size, device=self.device)
            effects = res.logit_effects([(term.sae, term.index) for term in spec.logit_biases])
            for term, effect in zip(spec.logit_biases, effects, strict=True):
                total += term.strength * effect
            self._logit_bank[row] = total

    # -- one writer per intervention type (WRITERS); `stream`: iv's place in its spec ----------------
    def _feature_add(
        self, row: int, k: int, iv: FeatureAdd, saes: dict[str, SAEWeights], stream: int
    ) -> None:
        w = saes[iv.sae.uid]
        w_dec = w.W_dec[iv.index]  # [d]
        vec = iv.coefficient(float(w_dec.norm())) * w_dec.float()
        self._bank(w.write_site, k).add_vector(row, iv.positions, vec)  # a transcoder's: at its site_out

    def _feature_edit(
        self, row: int, k: int, iv: FeatureEdit, saes: dict[str, SAEWeights], stream: int
    ) -> None:
        resample = (stream, iv.density, iv.sample) if isinstance(iv, FeatureResample) else None
        bank = self._bank(iv.site, k)
        bank.add_edit(row, iv.positions, iv.sae.uid, saes[iv.sae.uid], iv.index, iv.kind, iv.value, resample)

    def _vector_add(self, row: int, k: int, iv: VectorAdd, saes: dict[str, SAEWeights], stream: int) -> None:
        vec = self.resources.vector(iv.vector, iv.site)
        self._bank(iv.site, k).add_vector(row, iv.positions, iv.strength * vec)

    def _vector_project(
        self, row: int, k: int, iv: VectorProject, saes: dict[str, SAEWeights], stream: int
    ) -> None:
        v = self.resources.vector(iv.vector, iv.site)
        resample = (stream, 1.0, iv.sample) if isinstance(iv, VectorResample) else None  # no mass at 0
        self._bank(iv.site, k).add_projection(row, iv.positions, v / v.norm(), iv.lo, iv.hi, resample)

    def _clear(self, row: int, spec: SteeringSpec) -> None:
        self._bias_idx = None
        self.gates.clear_row(row)
        for site in list(self.banks):  # NOTE: not spec.sites(): a transcoder's `add` is at its site_out
            by_gate = self.banks.get(site, {})
            for k, bank in list(by_gate.items()):
                bank.clear_row(row)  # NOTE: a row owns its slots in every bank: clearing them is safe
                if bank.idle:
                    del by_gate[k]
            if not by_gate:
                self.banks.pop(site, None)
        # NOTE: the logit bank's row is left as it is: `logit_bias` points only at live rows with biases,
        # and `_write` assigns a row whole. Zeroing it cost ~2 ms a finished request in a serving step
        # (py-spy): a 50,257-float fill runs as an OpenMP region, whose second thread had to be woken
        # while the event loop was streaming that step's tokens on the same two cores.

    # -- inside the forward pass ----------------------------------------------------------------
    def sites(self) -> set[Site]:
        writes = {s for by_gate in self.banks.values() for bank in by_gate.values() for s in bank.writes()}
        return set(self.banks) | self.gates.sites() | writes

    def apply(self, site: Site, h: torch.Tensor) -> None:
        """Edit `h` [T, d] at `site` in place for this step's steered tokens."""
        if self._token_row is None:
            return
        pending = self._pending.pop(site, None)
        if pending is not None:  # transcoder edits read earlier in this pass: part of the MLP's output
            h.copy_(h.float() + pending)
        if self._gated:
            self.gates.evaluate(site, h)  # before any intervention at this site
        for k, bank in self.banks.get(site, {}).items():
            slots = self._token_slot if k < 0 else self.gates.token_slots(k, self._token_slot)
            for site_out, delta in bank.apply(h, slots, self._draws):
                have = self._pending.get(site_out)
                self._pending[site_out] = delta if have is None else have + delta

    def graph_layout(self) -> tuple | None:
        """A key of everything `apply` does in a step whose tokens are steered: the same key means the same
        kernels on the same tensors, so a CUDA graph captured under it replays this step's steering
        (whose per-token rows it reads from the runner's persistent buffers). None: not capturable
        (gates and resampling decide on the host each step)."""
        if self.gates.active or self.resamples:
            return None
        parts = []
        for site, by_gate in self.banks.items():
            for k, bank in by_gate.items():
                layout = bank.graph_layout()
                if layout is None:
                    return None
                parts.append((site, k, layout))
        return tuple(parts)

    # -- per step -------------------------------------------------------------------------------
    @property
    def resamples(self) -> bool:
        """Some live row resamples: the runner then passes each token's request key to begin_step."""
        return any(r.resamples for r in self._rows.values())

    @property
    def gated(self) -> bool:
        """Some live row has gates or stop conditions: the runner then passes their per-request state."""
        return self.gates.active

    def begin_step(
        self,
        token_row: torch.Tensor | None,
        pos_class: torch.Tensor,
        counts: list[int] | None = None,
        gate_state: torch.Tensor | None = None,
        draws: DrawContext | None = None,
    ) -> None:
        """token_row [T] int64 (-1 = unsteered), pos_class [T] int8 for the coming forward pass; with
        gates, `counts` (tokens per scheduled request) and `gate_state` [N, G] (see GateTable); with
        resampling rows, `draws` (each token's request key and position)."""
        self._gated = False
        self._pending = {}
        self._draws = draws
        if token_row is None or not (self.banks or self.gates.active):
            self._token_row = self._token_slot = None
            return
        self._token_row = token_row
        self._token_slot = torch.where(token_row >= 0, 2 * token_row + pos_class.long(), -1)
        if self.gates.active and gate_state is not None:
            self.gates.begin_step(token_row, pos_class, counts, gate_state)
            self._gated = True

    def end_step(self, sample_tokens=None, sample_rows=()) -> torch.Tensor | None:
        """Forget the step; with gates, the requests' new gate state [N, G] (stop hits: `stop_hits()`)."""
        self._token_row = self._token_slot = None
        self._pending = {}
        self._draws = None
        if not self._gated:
            return None
        self._gated = False
        return self.gates.end_step(sample_tokens, list(sample_rows))

    def stop_hits(self) -> list[StopHit | None]:
        return self.gates.stop_hits()

    def logit_bias(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(dense_bank [R, V], dense_idx [n, 1]: each sampled row's bank row, -1 = none); None when unused."""
        if self._logit_bank is None:
            return None
        key = tuple(rows)
        # NOTE: the same index tensor while the rows hold: the runner's SamplingBatches keys on it
        if self._bias_idx is not None and self._bias_idx[0] == key:
            return self._logit_bank, self._bias_idx[1]
        with_bias = {r.index for r in self._rows.values() if r.has_logit_bias}
        if not any(r in with_bias for r in rows):
            return None
        idx = torch.tensor([[r if r in with_bias else -1] for r in rows], dtype=torch.int64).to(self.device)
        self._bias_idx = (key, idx)
        return self._logit_bank, idx


_Writer = Callable[[SteeringRows, int, int, Intervention, dict[str, SAEWeights], int], None]
# each intervention type's writer into the banks: a new mode is one entry here (plus its bank and kernel)
WRITERS: dict[type, _Writer] = {
    FeatureAdd: SteeringRows._feature_add,
    FeatureClamp: SteeringRows._feature_edit,
    FeatureScale: SteeringRows._feature_edit,
    FeatureAblate: SteeringRows._feature_edit,
    FeatureResample: SteeringRows._feature_edit,
    VectorAdd: SteeringRows._vector_add,
    VectorProject: SteeringRows._vector_project,
    VectorResample: SteeringRows._vector_project,
}


def _writer(iv: Intervention) -> _Writer:
    write = WRITERS.get(type(iv))
    if write is None:  # NOTE: compile (steering/compile.py), the only producer, makes only these types
        raise TypeError(f"no device writer for intervention type {type(iv).__name__}")
    return write
