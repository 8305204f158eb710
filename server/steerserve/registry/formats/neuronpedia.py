"""Feature annotations -> [FeatureInfo]: our own list, or a Neuronpedia export (JSON or JSONL).

Accepted entries (the first spelling found wins):
    index:          index | featureIndex          (int, or a string of digits as Neuronpedia writes it)
    label:          label | description           (Neuronpedia's explanation text becomes the label)
    explanation:    explanation (a string) | explanations[0].description
    max_activation: max_activation | maxActApprox | maxActivation
    density:        density | frac_nonzero | fracNonzero
    mean_activation: mean_activation | meanActivation   (over a corpus, zeros included)
A document may be a list, `{"features"|"explanations"|"data": [...]}`, or one object per line.
Several entries for one index (Neuronpedia keeps several explanations) merge: first value wins.
"""

from __future__ import annotations

import contextlib
import json
import math

from steerserve.registry.errors import InvalidInput
from steerserve.registry.records import FeatureInfo

_MAX_TEXT = 8192


def _entries(data: object) -> list:
    if isinstance(data, (bytes, str)):
        text = data.decode("utf-8", errors="strict") if isinstance(data, bytes) else data
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            try:
                data = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as exc:
                raise InvalidInput(
                    f"features: neither JSON nor JSON lines ({exc})", param="features"
                ) from None
    if isinstance(data, dict):
        for key in ("features", "explanations", "data"):
            if isinstance(data.get(key), list):
                return data[key]
        return [data]
    if not isinstance(data, list):
        raise InvalidInput("features must be a list of objects or a Neuronpedia export", param="features")
    return data


def _first(entry: dict, *keys: str) -> object:
    for key in keys:
        if entry.get(key) is not None:
            return entry[key]
    return None


def _text(value: object, param: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise InvalidInput(f"{param} must be a string of at most {_MAX_TEXT} characters", param=param)
    return value.strip() or None


def _number(value: object, param: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"{param} must be a finite number, got {value!r}", param=param)
    return float(value)


def _index(value: object, param: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(
            f"{param} must be an integer >= 0 (or a string of digits), got {value!r}", param=param
        )
    return value


def parse_features(data: object) -> list[FeatureInfo]:
    """Annotations by feature index, merged, in index order."""
    merged: dict[int, dict] = {}
    for i, entry in enumerate(_entries(data)):
        if not isinstance(entry, dict):
            raise InvalidInput(f"features[{i}] must be an object", param=f"features[{i}]")
        p = f"features[{i}]"
        index = _index(_first(entry, "index", "featureIndex"), f"{p}.index")
        explanation = entry.get("explanation")
        if not isinstance(explanation, str):
            nested = entry.get("explanations")
            explanation = nested[0].get("description") if nested and isinstance(nested[0], dict) else None
        fields = {
            "label": _text(_first(entry, "label", "description"), f"{p}.label"),
            "explanation": _text(explanation, f"{p}.explanation"),
            "max_activation": _number(
                _first(entry, "max_activation", "maxActApprox", "maxActivation"), f"{p}.max_activation"
            ),
            "density": _number(_first(entry, "density", "frac_nonzero", "fracNonzero"), f"{p}.density"),
            "mean_activation": _number(
                _first(entry, "mean_activation", "meanActivation"), f"{p}.mean_activation"
            ),
        }
        if fields["density"] is not None and not 0.0 <= fields["density"] <= 1.0:
            raise InvalidInput(
                f"{p}.density must be in [0, 1], got {fields['density']}", param=f"{p}.density"
            )
        slot = merged.setdefault(index, {})
        for key, value in fields.items():
            if slot.get(key) is None:
                slot[key] = value
    return [FeatureInfo(index=i, **merged[i]) for i in sorted(merged)]
