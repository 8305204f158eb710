"""SteeringSpec: a request's validated steering, as frozen data (ids and numbers, no tensors).

Compiled at the edge (steering/compile.py) and carried by the GenerationRequest; the runner turns it
into device rows (steering/rows.py). Identical specs share a device row through `fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from steerserve.sites import Site

POSITIONS = ("all", "prompt", "generated")
FEATURE_MODES = ("add", "clamp", "scale", "ablate")
VECTOR_MODES = ("add", "project_out", "clamp")


@dataclass(frozen=True, slots=True)
class SAERef:
    id: str
    uid: str  # the stored row's uid: a deleted and re-created id is a different SAE


@dataclass(frozen=True, slots=True)
class Gate:
    """A condition on one SAE feature's activation at a token, read at the feature's SAE site from the
    hidden state as it arrives there (before any intervention at that site).

    Holds at a token when `above < a_f(h) < below` (a missing bound is open). A gated intervention acts on
    the tokens where its gate holds; with `latch`, from the first such token of the request to its end.
    As a stop condition (`SteeringSpec.stops`) it ends generation on the first generated token where it
    holds.
    """

    sae: SAERef
    index: int
    site: Site
    above: float | None = None
    below: float | None = None
    latch: bool = False

    def summary(self) -> dict:
        out = {"feature": {"sae": self.sae.id, "index": self.index}}
        for key in ("above", "below"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.latch:
            out["latch"] = True
        return out


@dataclass(frozen=True, slots=True)
class Intervention:
    """One intervention at one site, with every number it needs already resolved.

    feature add:  h += coeff * W_dec[f]          (coeff = strength, strength/|W_dec[f]| or strength*max_act)
    clamp:        h += (value - a_f(h)) * W_dec[f]
    scale:        h += (value * a_f(h) - a_f(h)) * W_dec[f]   (value = factor)
    ablate:       h += (value - a_f(h)) * W_dec[f]            (value = 0)
    vector add:   h += value * v
    project:      clip h . u to [lo, hi] along u = v / |v|    (project_out: lo = hi = 0)
    """

    kind: str  # feature_add | feature_clamp | feature_scale | feature_ablate | vector_add | vector_project
    site: Site
    positions: str
    sae: SAERef | None = None
    index: int | None = None
    vector_id: str | None = None
    vector_uid: str | None = None
    value: float = 0.0  # strength / target / factor
    scale: str = "raw"  # feature_add only: raw | unit | max_activation
    max_activation: float | None = None
    lo: float = 0.0
    hi: float = 0.0
    source: str = ""  # "steering[3]" or "variant:cold.steering[0]": where it came from
    gate: Gate | None = None  # act only on tokens where the gate holds

    def summary(self) -> dict:
        out = {
            "mode": self.kind,
            "site": self.site.hook_name,
            "positions": self.positions,
            "from": self.source,
        }
        if self.gate is not None:
            out["when"] = self.gate.summary()
        if self.sae is not None:
            out["feature"] = {"sae": self.sae.id, "index": self.index}
        if self.vector_id is not None:
            out["vector"] = self.vector_id
        return out


@dataclass(frozen=True, slots=True)
class LogitBiasTerm:
    sae: SAERef
    index: int
    strength: float
    source: str = ""


@dataclass(frozen=True, slots=True)
class SteeringSpec:
    interventions: tuple[Intervention, ...] = ()
    logit_biases: tuple[LogitBiasTerm, ...] = ()
    variant: str | None = None
    fingerprint: str = field(default="", compare=False)
    stops: tuple[Gate, ...] = ()  # stop_when: end generation where one holds on a generated token

    @classmethod
    def build(cls, interventions, logit_biases, variant=None, stops=()) -> SteeringSpec:
        body = {
            "i": [_canonical(asdict(i)) for i in interventions],
            "b": [_canonical(asdict(b)) for b in logit_biases],
            "s": [asdict(g) for g in stops],
        }
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:32]
        return cls(tuple(interventions), tuple(logit_biases), variant, digest, tuple(stops))

    @property
    def is_empty(self) -> bool:
        return not self.interventions and not self.logit_biases and not self.stops

    def gates(self) -> tuple[Gate, ...]:
        """Distinct gates of the interventions, in first-use order, then the stop conditions."""
        seen = dict.fromkeys(i.gate for i in self.interventions if i.gate is not None)
        return (*seen, *self.stops)

    def sites(self) -> set[Site]:
        return {i.site for i in self.interventions} | {g.site for g in self.gates()}

    def summary(self) -> dict:
        out = {
            "variant": self.variant,
            "interventions": [i.summary() for i in self.interventions],
            "feature_logit_bias": [
                {"feature": {"sae": b.sae.id, "index": b.index}, "strength": b.strength, "from": b.source}
                for b in self.logit_biases
            ],
            "fingerprint": self.fingerprint,
        }
        if self.stops:
            out["stop_when"] = [g.summary() for g in self.stops]
        return out


def _canonical(d: dict) -> dict:
    d = dict(d)
    d.pop("source", None)  # where an intervention came from does not change what it does
    return d
