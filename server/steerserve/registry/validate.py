"""Checks on registry inputs that no file format owns: ids, fit to the served model, variant shape.

Variant specs get a shape check only (kinds, modes, types, finite numbers); whether the SAEs,
features and vectors they name exist is checked when a request uses the variant (steering).
"""

from __future__ import annotations

import math
import re

from steerserve.engine.types import ModelInfo
from steerserve.registry.errors import InvalidInput
from steerserve.sites import Site, SiteError

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
FEATURE_MODES = ("add", "clamp", "scale", "ablate")
VECTOR_MODES = ("add", "project_out", "clamp")
POSITIONS = ("all", "prompt", "generated")
_NUMERIC = ("strength", "value", "factor", "min", "max")
_MAX_ITEMS = 256
# NOTE: full-text search cost grows with the number of terms (each a prefix scan, ANDed): bounded
MAX_QUERY_CHARS = 512
MAX_QUERY_TERMS = 16
_TERM = re.compile(r"\w+")


def check_id(value: object, param: str = "id") -> str:
    if not isinstance(value, str) or not ID_PATTERN.match(value) or ".." in value:
        raise InvalidInput(
            f"{param} must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter "
            f"or digit, without '..'; got {value!r}",
            param=param,
        )
    return value


def check_fits(site: Site, d: int, model: ModelInfo, what: str) -> None:
    """400 unless `site` exists in the served model and `d` equals its d_model."""
    try:
        model.check_site(site)
    except SiteError as exc:
        raise InvalidInput(
            f"{what} is at {site.hook_name}, but in model {model.name!r} {exc}", param="site"
        ) from None
    if d != model.d_model:
        # float64 sent where float32 is read (base64 vectors) doubles the length: say the dtype
        hint = " (twice d_model: float64 read as float32? send float32)" if d == 2 * model.d_model else ""
        raise InvalidInput(
            f"{what} has dimension {d}, but model {model.name!r} has d_model={model.d_model}{hint}",
            param="d_in",
        )


def _number(value: object, param: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"{param} must be a finite number, got {value!r}", param=param)


def _feature_ref(value: object, param: str) -> None:
    if not isinstance(value, dict) or set(value) != {"sae", "index"}:
        raise InvalidInput(f'{param} must be {{"sae": id, "index": int}}, got {value!r}', param=param)
    check_id(value["sae"], f"{param}.sae")
    index = value["index"]
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise InvalidInput(f"{param}.index must be an integer >= 0, got {index!r}", param=f"{param}.index")


def _intervention(item: object, p: str) -> None:
    if not isinstance(item, dict):
        raise InvalidInput(f"{p} must be an object", param=p)
    if ("feature" in item) == ("vector" in item):
        raise InvalidInput(f"{p} needs exactly one of 'feature' or 'vector'", param=p)
    if "feature" in item:
        _feature_ref(item["feature"], f"{p}.feature")
        modes = FEATURE_MODES
    else:
        check_id(item["vector"], f"{p}.vector")
        modes = VECTOR_MODES
    if item.get("mode") not in modes:
        raise InvalidInput(
            f"{p}.mode must be one of {', '.join(modes)}, got {item.get('mode')!r}", f"{p}.mode"
        )
    if item.get("positions", "all") not in POSITIONS:
        raise InvalidInput(f"{p}.positions must be one of {', '.join(POSITIONS)}", param=f"{p}.positions")
    for key in _NUMERIC:
        if key in item:
            _number(item[key], f"{p}.{key}")
    if item.get("when") is not None:
        _gate(item["when"], f"{p}.when")


def _gate(item: object, p: str) -> None:
    """The shape of a `when` gate or a `stop_when` entry; bounds and fit are checked at compile time."""
    if not isinstance(item, dict) or "feature" not in item:
        raise InvalidInput(f'{p} must be {{"feature": {{...}}, "above": number}} (or "below")', param=p)
    _feature_ref(item["feature"], f"{p}.feature")
    if item.get("above") is None and item.get("below") is None:
        raise InvalidInput(f'{p} needs "above" or "below"', param=p)
    for key in ("above", "below"):
        if item.get(key) is not None:
            _number(item[key], f"{p}.{key}")


def check_variant(body: object) -> tuple[str, dict]:
    """(id, spec to store) from a `POST /v1/variants` body; the spec is the body without `id`."""
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object", param=None)
    variant_id = check_id(body.get("id"))
    spec = {k: v for k, v in body.items() if k != "id"}
    steering = spec.setdefault("steering", [])
    bias = spec.setdefault("feature_logit_bias", [])
    stops = spec.get("stop_when", [])
    for name, items in (("steering", steering), ("feature_logit_bias", bias), ("stop_when", stops)):
        if not isinstance(items, list) or len(items) > _MAX_ITEMS:
            raise InvalidInput(f"{name} must be a list of at most {_MAX_ITEMS} entries", param=name)
    if not steering and not bias and not stops:
        raise InvalidInput(
            "a variant needs at least one steering, feature_logit_bias or stop_when entry", "steering"
        )
    for i, item in enumerate(stops):
        _gate(item, f"stop_when[{i}]")
    for i, item in enumerate(steering):
        _intervention(item, f"steering[{i}]")
    for i, item in enumerate(bias):
        p = f"feature_logit_bias[{i}]"
        if not isinstance(item, dict) or "feature" not in item or "strength" not in item:
            raise InvalidInput(f'{p} must be {{"feature": {{"sae", "index"}}, "strength": number}}', param=p)
        _feature_ref(item["feature"], f"{p}.feature")
        _number(item["strength"], f"{p}.strength")
    return variant_id, spec


def search_terms(q: object) -> list[str]:
    """The distinct words of a feature search `q`, lower-cased, in order of first use; 400 naming `q`
    for a query over MAX_QUERY_CHARS characters or MAX_QUERY_TERMS distinct words."""
    if not isinstance(q, str) or len(q) > MAX_QUERY_CHARS:
        raise InvalidInput(f"q must be a string of at most {MAX_QUERY_CHARS} characters", param="q")
    terms = list(dict.fromkeys(_TERM.findall(q.lower())))
    if len(terms) > MAX_QUERY_TERMS:
        raise InvalidInput(
            f"q has {len(terms)} distinct words; at most {MAX_QUERY_TERMS} (every word must match)", param="q"
        )
    return terms
