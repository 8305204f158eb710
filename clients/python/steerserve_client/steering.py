"""Steering builders: Python objects that render the `steering` / `feature_logit_bias` JSON of API.md.

    Steering.feature("res-l0", 12).add(4.0)               {"feature": {...}, "mode": "add", "strength": 4.0, ...}
    Steering.feature("res-l0", 12).clamp(10)              set the feature's activation to 10
    Steering.feature("res-l0", 12).scale(0.5)             multiply the feature's activation
    Steering.feature("res-l0", 12).ablate()               activation -> 0 (`to="mean"` / `"resample"`)
    Steering.feature("res-l0", 12).logit_bias(2.0)        a `feature_logit_bias` entry
    Steering.vector("honesty").add(1.5)                   h += 1.5 * v
    Steering.vector("honesty").project_out()              remove h's component along v
    Steering.vector("honesty").clamp(-1, 1)               clip h's projection on the unit vector

    Steering.vector("honesty").add(2).when(Steering.feature("res-l0", 7).above(1.5))
                                                          only on tokens where feature 7 fires above 1.5
    Steering.feature("res-l0", 7).above(1.5).latched()    ... from the first such token on
    Steering.body(stop_when=[Steering.feature("res-l0", 9).above(4)])   end with "feature_stop"

Every intervention takes `positions=` ("all" | "prompt" | "generated"; `.at(...)` returns a copy
with other positions). Builders check what they can locally (finite numbers, known modes) and raise
ValueError; the server checks the rest (ids exist, index < d_sae) and answers 400/404.
`Steering.body(...)` builds the extension fields for `extra_body=` of the openai SDK.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

# NOTE: the client installs without the server, so it keeps its own copy of the vocabulary: these
# Literals mirror the server's enums (steerserve.types.steering: Positions, AddScale) and the item
# schemas of /openapi.json; tests/steering/test_client_vocabulary.py checks they agree.
Positions = Literal["all", "prompt", "generated"]
AddScale = Literal["raw", "unit", "max_activation"]
_POSITIONS = get_args(Positions)
_SCALES = get_args(AddScale)


def _finite(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _positions(value: str) -> str:
    if value not in _POSITIONS:
        raise ValueError(f"positions must be one of {_POSITIONS}, got {value!r}")
    return value


@dataclass(frozen=True)
class Condition:
    """A condition on one feature's activation at a token: an intervention's `when`, or a `stop_when`
    entry. Holds when `above < activation < below` (a missing bound is open)."""

    feature: FeatureRef
    above: float | None = None
    below: float | None = None
    latch: bool = False

    def __post_init__(self) -> None:
        if self.above is None and self.below is None:
            raise ValueError("a condition needs above= or below=")
        for name in ("above", "below"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _finite(getattr(self, name), name))
        if self.above is not None and self.below is not None and self.above >= self.below:
            raise ValueError(f"below ({self.below}) must exceed above ({self.above})")

    def latched(self) -> Condition:
        """As a `when`: stays true from the first token where it holds to the end of the generation."""
        return replace(self, latch=True)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"feature": self.feature.to_json()}
        for name in ("above", "below"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out | ({"latch": True} if self.latch else {})


@dataclass(frozen=True)
class Intervention:
    """One entry of `steering`: a target (`{"feature": ...}` or `{"vector": id}`), a mode, its fields."""

    target: dict[str, Any]
    mode: str
    params: dict[str, Any] = field(default_factory=dict)
    positions: str = "all"
    gate: Condition | None = None

    def at(self, positions: Positions) -> Intervention:
        """The same intervention applied at other positions."""
        return replace(self, positions=_positions(positions))

    def when(self, condition: Condition) -> Intervention:
        """The same intervention, acting only on tokens where `condition` holds."""
        if not isinstance(condition, Condition):
            raise TypeError(f"when() takes a Condition (feature.above(x)), got {type(condition).__name__}")
        return replace(self, gate=condition)

    def to_json(self) -> dict[str, Any]:
        out = {**self.target, "mode": self.mode, **self.params, "positions": self.positions}
        return out | ({"when": self.gate.to_json()} if self.gate is not None else {})


@dataclass(frozen=True)
class FeatureLogitBias:
    """One entry of `feature_logit_bias`: add `strength` x the logits feature `index` writes."""

    sae: str
    index: int
    strength: float

    def to_json(self) -> dict[str, Any]:
        return {"feature": {"sae": self.sae, "index": self.index}, "strength": self.strength}


@dataclass(frozen=True)
class FeatureRef:
    """`{"sae": id, "index": i}`: one SAE feature; its methods build interventions on it."""

    sae: str
    index: int

    def __post_init__(self) -> None:
        if not isinstance(self.sae, str) or not self.sae:
            raise ValueError(f"sae must be a non-empty id, got {self.sae!r}")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise ValueError(f"index must be an int >= 0, got {self.index!r}")

    def _make(self, mode: str, params: dict, positions: str) -> Intervention:
        target = {"feature": {"sae": self.sae, "index": self.index}}
        return Intervention(target, mode, params, _positions(positions))

    def add(self, strength: float, scale: AddScale = "raw", positions: Positions = "all") -> Intervention:
        """h += strength * W_dec[f] (`scale="unit"`: the unit direction; `"max_activation"`: x its max)."""
        if scale not in _SCALES:
            raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
        params = {"strength": _finite(strength, "strength"), "scale": scale}
        return self._make("add", params, positions)

    def clamp(self, value: float, positions: Positions = "all") -> Intervention:
        """Set the feature's activation to `value` (keeping the SAE's reconstruction error)."""
        return self._make("clamp", {"value": _finite(value, "value")}, positions)

    def scale(self, factor: float, positions: Positions = "all") -> Intervention:
        """Multiply the feature's activation by `factor`."""
        return self._make("scale", {"factor": _finite(factor, "factor")}, positions)

    def ablate(
        self, to: Literal["zero", "mean", "resample"] = "zero", positions: Positions = "all"
    ) -> Intervention:
        """Set the feature's activation to 0, to its mean (`to="mean"`), or to a draw per token from its
        recorded activation distribution (`to="resample"`; a seeded request draws reproducibly)."""
        if to not in ("zero", "mean", "resample"):
            raise ValueError(f"to must be 'zero', 'mean' or 'resample', got {to!r}")
        return self._make("ablate", {} if to == "zero" else {"to": to}, positions)

    def logit_bias(self, strength: float) -> FeatureLogitBias:
        """A `feature_logit_bias` entry: bias the output by what this feature promotes."""
        return FeatureLogitBias(self.sae, self.index, _finite(strength, "strength"))

    def above(self, value: float) -> Condition:
        """A condition: this feature's activation is above `value`."""
        return Condition(self, above=value)

    def below(self, value: float) -> Condition:
        """A condition: this feature's activation is below `value`."""
        return Condition(self, below=value)

    def between(self, lo: float, hi: float) -> Condition:
        """A condition: lo < activation < hi."""
        return Condition(self, above=lo, below=hi)

    def to_json(self) -> dict[str, Any]:
        return {"sae": self.sae, "index": self.index}


@dataclass(frozen=True)
class VectorRef:
    """A stored steering vector, by id; its methods build interventions on it."""

    id: str

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"vector id must be a non-empty string, got {self.id!r}")

    def _make(self, mode: str, params: dict, positions: str) -> Intervention:
        return Intervention({"vector": self.id}, mode, params, _positions(positions))

    def add(self, strength: float, positions: Positions = "all") -> Intervention:
        """h += strength * v."""
        return self._make("add", {"strength": _finite(strength, "strength")}, positions)

    def project_out(
        self, to: Literal["zero", "resample"] = "zero", positions: Positions = "all"
    ) -> Intervention:
        """Remove h's component along v, or (`to="resample"`) set it to a draw per token from its recorded
        distribution."""
        if to not in ("zero", "resample"):
            raise ValueError(f"to must be 'zero' or 'resample', got {to!r}")
        return self._make("project_out", {} if to == "zero" else {"to": to}, positions)

    def clamp(self, lo: float, hi: float, positions: Positions = "all") -> Intervention:
        """Clip h's projection on the unit vector to [lo, hi]."""
        lo, hi = _finite(lo, "lo"), _finite(hi, "hi")
        if lo > hi:
            raise ValueError(f"clamp needs lo <= hi, got lo={lo} > hi={hi}")
        return self._make("clamp", {"min": lo, "max": hi}, positions)


class Steering:
    """Entry points: `Steering.feature(sae, index)`, `Steering.vector(id)`, `Steering.body(...)`."""

    @staticmethod
    def feature(sae: str, index: int) -> FeatureRef:
        return FeatureRef(sae, index)

    @staticmethod
    def vector(vector_id: str) -> VectorRef:
        return VectorRef(vector_id)

    @staticmethod
    def body(
        steering: Iterable[Intervention | Mapping[str, Any]] | None = None,
        feature_logit_bias: Iterable[FeatureLogitBias | Mapping[str, Any]] | None = None,
        variant: str | None = None,
        return_unsteered: bool | None = None,
        stop_when: Iterable[Condition | Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """The extension fields as one dict: `openai_client.chat.completions.create(..., extra_body=...)`."""
        out: dict[str, Any] = {}
        if steering is not None:
            out["steering"] = to_json_list(steering)
        if feature_logit_bias is not None:
            out["feature_logit_bias"] = to_json_list(feature_logit_bias)
        if stop_when is not None:
            out["stop_when"] = to_json_list(stop_when)
        if variant is not None:
            out["variant"] = variant
        if return_unsteered is not None:
            out["return_unsteered"] = bool(return_unsteered)
        return out


def to_json_list(items: Iterable[Any]) -> list[dict[str, Any]]:
    """Builders -> JSON dicts; dicts pass through (copied) so hand-written JSON works too."""
    out = []
    for item in items:
        if hasattr(item, "to_json"):
            out.append(item.to_json())
        elif isinstance(item, Mapping):
            out.append(dict(item))
        else:
            raise TypeError(f"expected an Intervention, FeatureLogitBias or dict, got {type(item).__name__}")
    return out
