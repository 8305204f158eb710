"""The steering fields of the request bodies (API.md: Intervention, FeatureRef, stop_when), typed by
the pydantic models of steering/items.py, so /openapi.json documents every intervention type (a union
on the target, then an OpenAPI `discriminator` on `mode`) and the schema-driven fuzzers reach inside.

Also each item's JSON schema on its own, with every `$ref` inlined, for tools that take one schema
rather than the whole document (tests/production/test_hostile_fuzz.py builds request bodies from them).
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from steerserve.steering.items import LogitBiasItem, SteeringItem, StopCondition

SteeringItems = list[SteeringItem] | None
LogitBiasItems = list[LogitBiasItem] | None
StopItems = list[StopCondition] | None


def _inline(schema: dict) -> dict:
    """`schema` without `$defs` and `$ref`s (the item models are not recursive), and `discriminator`
    without its `mapping` (which names `$defs`)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(v) for v in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            rest = {k: walk(v) for k, v in node.items() if k != "$ref"}
            return walk(defs[node["$ref"].rsplit("/", 1)[-1]]) | rest
        out = {k: walk(v) for k, v in node.items()}
        if "discriminator" in out:
            out["discriminator"] = {"propertyName": out["discriminator"]["propertyName"]}
        return out

    return walk(schema)


INTERVENTION = _inline(TypeAdapter(SteeringItem).json_schema())
LOGIT_BIAS_TERM = _inline(TypeAdapter(LogitBiasItem).json_schema())
STOP_CONDITION = _inline(TypeAdapter(StopCondition).json_schema())
