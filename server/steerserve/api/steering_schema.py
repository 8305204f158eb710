"""OpenAPI schemas of the free-form steering fields (API.md: Intervention, FeatureRef, stop_when).

The bodies keep these fields as plain JSON objects: steering/compile.py validates them (it must anyway,
for variants stored in the registry) and names the offending field. These schemas only *document* the
shapes, so clients and schema-driven fuzzers (tests/production) see what the server accepts. They are
deliberately loose (`anyOf`, open objects) where compile accepts more than one spelling.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import WithJsonSchema

_NUMBER = {"type": "number"}
_POSITIONS = {"enum": ["all", "prompt", "generated"]}
FEATURE_REF = {
    "type": "object",
    "required": ["sae", "index"],
    "properties": {"sae": {"type": "string"}, "index": {"type": "integer", "minimum": 0}},
}
_GATE = {
    "type": "object",
    "required": ["feature"],
    "properties": {"feature": FEATURE_REF, "above": _NUMBER, "below": _NUMBER, "latch": {"type": "boolean"}},
    "anyOf": [{"required": ["above"]}, {"required": ["below"]}],
}


def _item(target: str, mode: str, required: tuple[str, ...] = (), **properties) -> dict:
    ref = FEATURE_REF if target == "feature" else {"type": "string"}
    return {
        "type": "object",
        "required": [target, "mode", *required],
        "properties": {
            target: ref,
            "mode": {"const": mode},
            "positions": _POSITIONS,
            "when": _GATE,
            **properties,
        },
    }


INTERVENTION = {
    "anyOf": [
        _item("feature", "add", ("strength",), strength=_NUMBER,
              scale={"enum": ["raw", "unit", "max_activation"]}),
        _item("feature", "clamp", ("value",), value=_NUMBER),
        _item("feature", "scale", ("factor",), factor=_NUMBER),
        _item("feature", "ablate", to={"enum": ["zero", "mean", 0]}),
        _item("vector", "add", ("strength",), strength=_NUMBER),
        _item("vector", "project_out"),
        _item("vector", "clamp", ("min", "max"), min=_NUMBER, max=_NUMBER),
    ]
}  # fmt: skip
LOGIT_BIAS_TERM = {
    "type": "object",
    "required": ["feature", "strength"],
    "properties": {"feature": FEATURE_REF, "strength": _NUMBER},
}
STOP_CONDITION = {
    "type": "object",
    "required": ["feature"],
    "properties": {"feature": FEATURE_REF, "above": _NUMBER, "below": _NUMBER},
    "anyOf": [{"required": ["above"]}, {"required": ["below"]}],
}


def _list_of(item: dict) -> WithJsonSchema:
    return WithJsonSchema({"anyOf": [{"type": "array", "items": item}, {"type": "null"}]})


SteeringItems = Annotated[list[dict[str, Any]] | None, _list_of(INTERVENTION)]
LogitBiasItems = Annotated[list[dict[str, Any]] | None, _list_of(LOGIT_BIAS_TERM)]
StopItems = Annotated[list[dict[str, Any]] | None, _list_of(STOP_CONDITION)]
