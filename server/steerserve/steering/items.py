"""The steering items as they enter (API.md "Intervention"): pydantic models of the `steering`,
`feature_logit_bias` and `stop_when` entries, the one description of their shape.

The request bodies use them (api/protocol.py: /openapi.json documents every intervention type, and the
fuzzers reach inside), and compile parses stored variants through them (`parse`), so a
variant and a request are held to the same rules. They check what needs neither the registry nor the
config: types (strict: false is not 0, "1" is not 1), required fields, modes, finite numbers, index >= 0,
a gate's bound. Everything else (ids exist, index < d_sae, |value| <= cap, min <= max, above < below)
is compile's (steering/compile.py). Unknown keys are ignored, as for the rest of a body.

An intervention is told apart by its target ("feature" or "vector": a callable discriminator) and then
its `mode` (an OpenAPI `discriminator`). pydantic puts both tags in an error's location; `clean_error`
takes them out, so errors name the field (`steering[2].feature.index`), never a union member.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from steerserve.steering.errors import invalid
from steerserve.types.steering import AddScale, Positions

INT64_MAX = 2**63 - 1
FEATURE_TAG, VECTOR_TAG = "feature-intervention", "vector-intervention"
# the fields of a request (or a stored variant) that hold steering items
FIELDS = ("steering", "feature_logit_bias", "stop_when")


def _no_titles(schema: dict[str, Any]) -> None:
    # NOTE: pydantic titles every property ("Strength"): noise to a client, and a plain {"type": "number"}
    # is what the schema-driven fuzzers narrow (tests/production/test_hostile_fuzz.py)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)


def _a_bound_schema(schema: dict[str, Any]) -> None:
    _no_titles(schema)
    # at least one bound, a number (a null bound is left out)
    schema["anyOf"] = [{"required": [k], "properties": {k: {"type": "number"}}} for k in ("above", "below")]


class _Item(BaseModel):
    model_config = ConfigDict(
        extra="ignore", allow_inf_nan=False, strict=True, frozen=True, json_schema_extra=_no_titles
    )


# NOTE: enums are validated by value (strict mode would want an enum instance, not the JSON string)
_Positions = Annotated[Positions, Field(strict=False)]
_AddScale = Annotated[AddScale, Field(strict=False)]


class FeatureRef(_Item):
    """One feature of a registered SAE."""

    sae: str
    index: int = Field(ge=0, le=INT64_MAX)


class Condition(_Item):
    """A condition on one feature's activation at a token (an intervention's `when`): holds where
    `above < activation < below` (a missing bound is open); with `latch`, from the first such token on."""

    model_config = ConfigDict(json_schema_extra=_a_bound_schema)
    feature: FeatureRef
    above: float | None = None
    below: float | None = None
    latch: bool = False

    @model_validator(mode="after")
    def _a_bound(self) -> Condition:
        if self.above is None and self.below is None:
            raise ValueError('needs "above" or "below" (or both)')
        return self


class StopCondition(Condition):
    """A `stop_when` entry: ends the generation on the first generated token where it holds."""

    latch: Literal[False] = False

    @field_validator("latch", mode="before")
    @classmethod
    def _no_latch(cls, value: object) -> object:
        if value is True:
            raise ValueError("is not allowed here: a stop condition ends the generation")
        return value


class LogitBiasItem(_Item):
    """A `feature_logit_bias` entry: adds strength * (the feature's decoder row through the unembedding)
    to the logits."""

    feature: FeatureRef
    strength: float


class _Intervention(_Item):
    target: ClassVar[str]
    positions: _Positions = Positions.ALL
    when: Condition | None = None


class _FeatureItem(_Intervention):
    target: ClassVar[str] = FEATURE_TAG
    feature: FeatureRef


class _VectorItem(_Intervention):
    target: ClassVar[str] = VECTOR_TAG
    vector: str


class FeatureAddItem(_FeatureItem):
    """h += strength * W_dec[f] (`raw`), along the unit decoder direction (`unit`), or in units of the
    feature's recorded max activation (`max_activation`)."""

    mode: Literal["add"]
    strength: float
    scale: _AddScale = AddScale.RAW


class FeatureClampItem(_FeatureItem):
    """Set the feature's activation to `value`."""

    mode: Literal["clamp"]
    value: float


class FeatureScaleItem(_FeatureItem):
    """Multiply the feature's activation by `factor`."""

    mode: Literal["scale"]
    factor: float


class FeatureAblateItem(_FeatureItem):
    """Set the feature's activation to 0, to its recorded mean activation (`"to": "mean"`), or to a
    fresh draw per token from its recorded activation distribution (`"to": "resample"`)."""

    mode: Literal["ablate"]
    to: Literal["zero", "mean", "resample", 0] = "zero"

    @field_validator("to", mode="before")
    @classmethod
    def _not_a_bool(cls, value: object) -> object:
        return _not_bool(value, '"zero", "mean", "resample" or 0')


def _not_bool(value: object, allowed: str) -> object:
    if isinstance(value, bool):  # NOTE: False == 0 to a Literal; JSON false is not the number 0
        raise ValueError(f"must be {allowed}, got {value!r}")
    return value


class VectorAddItem(_VectorItem):
    """h += strength * v."""

    mode: Literal["add"]
    strength: float


class VectorProjectOutItem(_VectorItem):
    """Remove h's component along the unit vector (`"to": "zero"`), or replace it by a fresh draw per
    token from its recorded distribution (`"to": "resample"`)."""

    mode: Literal["project_out"]
    to: Literal["zero", "resample", 0] = "zero"

    @field_validator("to", mode="before")
    @classmethod
    def _not_a_bool(cls, value: object) -> object:
        return _not_bool(value, '"zero", "resample" or 0')


class VectorClampItem(_VectorItem):
    """Clip h's projection on the unit vector to [min, max]."""

    mode: Literal["clamp"]
    min: float
    max: float


FEATURE_ITEMS = (FeatureAddItem, FeatureClampItem, FeatureScaleItem, FeatureAblateItem)
VECTOR_ITEMS = (VectorAddItem, VectorProjectOutItem, VectorClampItem)
# target tag -> its modes (the error on an unknown `mode` lists them)
_MODES = {
    tag: [get_args(m.model_fields["mode"].annotation)[0] for m in items]
    for tag, items in ((FEATURE_TAG, FEATURE_ITEMS), (VECTOR_TAG, VECTOR_ITEMS))
}


def _target(value: object) -> str | None:
    """Which union a raw item belongs to: it has exactly one of "feature" or "vector"."""
    if isinstance(value, Mapping):
        has_feature, has_vector = "feature" in value, "vector" in value
        if has_feature != has_vector:
            return FEATURE_TAG if has_feature else VECTOR_TAG
        return None
    return getattr(value, "target", None)  # an item parsed already


FeatureItem = Annotated[
    FeatureAddItem | FeatureClampItem | FeatureScaleItem | FeatureAblateItem, Field(discriminator="mode")
]
VectorItem = Annotated[VectorAddItem | VectorProjectOutItem | VectorClampItem, Field(discriminator="mode")]
SteeringItem = Annotated[
    Annotated[FeatureItem, Tag(FEATURE_TAG)] | Annotated[VectorItem, Tag(VECTOR_TAG)],
    Discriminator(
        _target,
        custom_error_type="invalid_steering",
        custom_error_message='must be an object with exactly one of "feature" or "vector"',
    ),
]


class SteeringFields(_Item):
    """The steering fields of a request or a stored variant (compile parses variants through it)."""

    steering: list[SteeringItem] | None = None
    feature_logit_bias: list[LogitBiasItem] | None = None
    stop_when: list[StopCondition] | None = None


def param_name(loc: tuple) -> str:
    """("steering", 2, "feature", "index") -> "steering[2].feature.index"."""
    if not loc:
        return ""
    out = str(loc[0])
    for part in map(str, loc[1:]):
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


def parse(fields: Mapping[str, object], prefix: str = "") -> SteeringFields:
    """The steering fields of a request (items parsed at the edge pass through as they are) or of a
    stored variant (plain JSON); SteeringError 400 on the first bad entry, its param after `prefix`."""
    try:
        return SteeringFields.model_validate(fields)
    except ValidationError as exc:
        loc, msg = clean_error(exc.errors()[0])
        raise invalid((prefix + param_name(loc)).rstrip(".") or "steering", msg) from None


def clean_error(error: Mapping) -> tuple[tuple, str]:
    """(location, message) of one pydantic error, with the union tags of steering items taken out of the
    location: an unknown or missing `mode` is an error on `mode`."""
    loc, msg = list(error.get("loc", ())), str(error.get("msg", "invalid request"))
    out: list = []
    for i, part in enumerate(loc):
        if part in _MODES:
            if i == len(loc) - 1 and error.get("type") in ("union_tag_invalid", "union_tag_not_found"):
                what, modes = part.split("-")[0], ", ".join(_MODES[part])
                tag = (error.get("ctx") or {}).get("tag")
                msg = f"must be one of {modes} for a {what}" + ("" if tag is None else f", got {tag!r}")
                out.append("mode")
            continue
        if i > 0 and loc[i - 1] in _MODES:
            continue  # the `mode` tag after the target tag
        out.append(part)
    return tuple(out), msg.removeprefix("Value error, ")
