"""The steering vocabulary: a request's validated steering as frozen, typed data (ids and numbers, no
tensors): the intervention types (a tagged union on `kind`), gates, logit-bias terms, `SteeringSpec`.

Compiled at the edge (steering/compile.py) and carried by the GenerationRequest; the runner turns it
into device rows (runner/steering/rows.py, one writer per intervention type). Identical specs share a
device row through `fingerprint`.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field, fields, is_dataclass
from typing import ClassVar

from steerserve.types.sites import Site


class Positions(enum.StrEnum):
    """Which of a request's tokens an intervention acts on."""

    ALL = "all"
    PROMPT = "prompt"
    GENERATED = "generated"

    @property
    def classes(self) -> tuple[int, ...]:
        """The position classes it covers: 0 a prompt token, 1 a generated token (a bank slot is
        `2 * row + class`, runner/steering/banks.py)."""
        return {Positions.PROMPT: (0,), Positions.GENERATED: (1,)}.get(self, (0, 1))


class AddScale(enum.StrEnum):
    """What a feature `add`'s strength is measured in."""

    RAW = "raw"  # h += strength * W_dec[f]
    UNIT = "unit"  # along the unit decoder direction: strength / |W_dec[f]|
    MAX_ACTIVATION = "max_activation"  # in units of the feature's recorded max activation


class InterventionKind(enum.StrEnum):
    """The intervention types, as reported (`steering.interventions[].mode`) and counted (metrics)."""

    FEATURE_ADD = "feature_add"
    FEATURE_CLAMP = "feature_clamp"
    FEATURE_SCALE = "feature_scale"
    FEATURE_ABLATE = "feature_ablate"
    FEATURE_RESAMPLE = "feature_resample"
    VECTOR_ADD = "vector_add"
    VECTOR_PROJECT = "vector_project"
    VECTOR_RESAMPLE = "vector_resample"


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
class VectorRef:
    id: str
    uid: str  # the stored row's uid, as SAERef


class _Intervention:
    """What every intervention type has: `kind`, `site`, `positions`, `source` (where it came from:
    "steering[3]", "variant:cold.steering[0]") and `gate` (act only on tokens where it holds)."""

    __slots__ = ()
    kind: ClassVar[InterventionKind]

    def summary(self) -> dict:
        out = {"mode": str(self.kind), "site": self.site.hook_name, "positions": str(self.positions)}
        out["from"] = self.source
        if self.gate is not None:
            out["when"] = self.gate.summary()
        if isinstance(self, _FeatureIntervention):
            out["feature"] = {"sae": self.sae.id, "index": self.index}
        else:
            out["vector"] = self.vector.id
        return out


class _FeatureIntervention(_Intervention):
    __slots__ = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class FeatureAdd(_FeatureIntervention):
    """h += coeff * W_dec[f], coeff = strength (raw), strength / |W_dec[f]| (unit) or strength *
    max_activation. A transcoder's feature is added where it writes (its `write_site`)."""

    kind: ClassVar[InterventionKind] = InterventionKind.FEATURE_ADD
    site: Site
    positions: Positions
    sae: SAERef
    index: int
    strength: float
    scale: AddScale = AddScale.RAW
    max_activation: float | None = None
    source: str = ""
    gate: Gate | None = None

    def coefficient(self, dec_norm: float) -> float:
        """The multiple of W_dec[f] added, given |W_dec[f]|."""
        if self.scale is AddScale.UNIT:
            return self.strength / dec_norm
        if self.scale is AddScale.MAX_ACTIVATION:
            return self.strength * float(self.max_activation)
        return self.strength


@dataclass(frozen=True, slots=True, kw_only=True)
class FeatureEdit(_FeatureIntervention):
    """An edit of one feature's activation a_f(h), written back as h += (a'_f - a_f) * W_dec[f]; the
    subclass says which (`kind`)."""

    site: Site
    positions: Positions
    sae: SAERef
    index: int
    value: float
    source: str = ""
    gate: Gate | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FeatureClamp(FeatureEdit):
    """a'_f = value."""

    kind: ClassVar[InterventionKind] = InterventionKind.FEATURE_CLAMP


@dataclass(frozen=True, slots=True, kw_only=True)
class FeatureScale(FeatureEdit):
    """a'_f = value * a_f (value: the request's `factor`)."""

    kind: ClassVar[InterventionKind] = InterventionKind.FEATURE_SCALE


@dataclass(frozen=True, slots=True, kw_only=True)
class FeatureAblate(FeatureEdit):
    """a'_f = value: 0, or the feature's recorded mean activation (`"to": "mean"`)."""

    kind: ClassVar[InterventionKind] = InterventionKind.FEATURE_ABLATE


@dataclass(frozen=True, slots=True, kw_only=True)
class FeatureResample(FeatureEdit):
    """a'_f = a fresh draw per token from the feature's activation distribution over the stats corpus:
    0 with probability 1 - density, else uniform over `sample` (a uniform sample of its nonzero
    activations; registry FeatureInfo.active_sample). Draws come from the request's counter-based
    stream (steerkernels.resample_draw), so they depend only on the request's key, the token's
    position and the intervention's place in the spec."""

    kind: ClassVar[InterventionKind] = InterventionKind.FEATURE_RESAMPLE
    value: float = 0.0  # unused: the target is drawn per token
    density: float
    sample: tuple[float, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class VectorAdd(_Intervention):
    """h += strength * v (v: the vector's direction at this site)."""

    kind: ClassVar[InterventionKind] = InterventionKind.VECTOR_ADD
    site: Site
    positions: Positions
    vector: VectorRef
    strength: float
    source: str = ""
    gate: Gate | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class VectorProject(_Intervention):
    """Clip h . u to [lo, hi] along u = v / |v| (the request's `project_out` is lo = hi = 0)."""

    kind: ClassVar[InterventionKind] = InterventionKind.VECTOR_PROJECT
    site: Site
    positions: Positions
    vector: VectorRef
    lo: float = 0.0
    hi: float = 0.0
    source: str = ""
    gate: Gate | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class VectorResample(VectorProject):
    """h . u = a fresh draw per token from the projection's distribution over the stats corpus
    (uniform over `sample`; registry vector stats), from the request's stream as FeatureResample."""

    kind: ClassVar[InterventionKind] = InterventionKind.VECTOR_RESAMPLE
    sample: tuple[float, ...]


Intervention = (
    FeatureAdd
    | FeatureClamp
    | FeatureScale
    | FeatureAblate
    | FeatureResample
    | VectorAdd
    | VectorProject
    | VectorResample
)
# each kind's type: the runner dispatches on these (runner/steering/rows.py), metrics count them
INTERVENTION_TYPES: dict[InterventionKind, type] = {
    t.kind: t
    for t in (
        FeatureAdd,
        FeatureClamp,
        FeatureScale,
        FeatureAblate,
        FeatureResample,
        VectorAdd,
        VectorProject,
        VectorResample,
    )
}


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
            "i": [canonical(i) for i in interventions],
            "b": [canonical(b) for b in logit_biases],
            "s": [plain(g) for g in stops],
        }
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:32]
        return cls(tuple(interventions), tuple(logit_biases), variant, digest, tuple(stops))

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


def plain(value):
    """`dataclasses.asdict` without its deep copies (the same dicts, lists and tuples of the same leaves):
    compiling a request's steering builds a fingerprint from every item, and asdict was ~30% of it."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple | list):
        return type(value)(plain(v) for v in value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def canonical(item) -> dict:
    """What an intervention (or a logit-bias term) does, as plain data: its fields and kind, without
    where it came from (the fingerprint's and the prefix cache's key material)."""
    d = plain(item)
    d.pop("source", None)  # where an intervention came from does not change what it does
    d["kind"] = str(getattr(item, "kind", ""))  # FeatureClamp and FeatureScale have the same fields
    return d
