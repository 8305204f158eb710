"""Feature annotations -> [FeatureInfo]: our own list, or a Neuronpedia export (JSON, JSONL, gzip).

Accepted entries (the first spelling found wins):
    index:          index | featureIndex          (int, or a string of digits as Neuronpedia writes it)
    label:          label | description           (else the feature's first explanation)
    explanations:   explanation (a string) and explanations[*].description (a feature's JSON); on an
                    entry with neither, description (Neuronpedia's export: one line per explanation)
    max_activation: max_activation | maxActApprox | maxActivation
    density:        density | frac_nonzero | fracNonzero
    mean_activation: mean_activation | meanActivation   (over a corpus, zeros included)
    active_sample:  active_sample | activationSample    (up to 256 nonzero activations > 0: records.py)
A document may be a list, `{"features"|"explanations"|"data": [...]}`, or one object per line, as
bytes possibly gzipped (Neuronpedia's exports are `.jsonl.gz`). Several entries for one index merge:
the first value of each field wins, and EVERY distinct explanation is kept, in order, joined by a
newline into the one stored `explanation` text (so each is searchable and returned).
"""

from __future__ import annotations

import contextlib
import math
import zlib

from steerserve.registry.errors import InvalidInput, TooLarge
from steerserve.registry.records import FeatureInfo
from steerserve.registry.samples import check_sample
from steerserve.registry.storable import is_uint, parse_json_or_lines, parse_uint

_MAX_TEXT = 8192
_MAX_EXPLANATIONS = 64  # per feature; Neuronpedia keeps a handful
MAX_INFLATED_BYTES = 32 << 20  # a gzip body is inflated at most this far (JSON is parsed whole)
_GZIP_MAGIC = b"\x1f\x8b"


def inflate(body: bytes, limit: int = MAX_INFLATED_BYTES) -> bytes:
    """A gzip body (by its magic bytes) inflated under `limit`; anything else as it is."""
    if not body.startswith(_GZIP_MAGIC):
        return body
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip header and trailer
    try:
        out = d.decompress(body, limit + 1)  # NOTE: bounded: a zip bomb stops at limit + 1 bytes
        if len(out) > limit:
            raise TooLarge(
                f"the gzip body inflates past {limit} bytes; send the annotations in several PUTs (they merge)",
                param="body",
            )
        if not d.eof:
            raise InvalidInput("the gzip body is truncated", param="body")
    except zlib.error as exc:
        raise InvalidInput(f"the body starts like gzip but does not inflate: {exc}", param="body") from None
    return out


def _entries(data: object) -> list:
    if isinstance(data, (bytes, bytearray)):
        data = parse_json_or_lines(inflate(bytes(data)), "features")
    elif isinstance(data, str):
        data = parse_json_or_lines(data, "features")
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
    if isinstance(value, str) and is_uint(value):  # ASCII digits only: "²" passes isdigit() but not int()
        value = parse_uint(value, param)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(
            f"{param} must be an integer >= 0 (or a string of digits), got {value!r}", param=param
        )
    return value


def _explanations(entry: dict, p: str) -> list[str]:
    """Every explanation text of one entry, in order; a 400 naming the field for anything malformed.

    `description` is an explanation only on an entry with no `explanation(s)` of its own (a line of
    Neuronpedia's explanation export); beside them it is the short label (`demo/labels.py` writes that)."""
    nested = entry.get("explanations")
    if nested is not None and not isinstance(nested, list):
        raise InvalidInput(
            f'{p}.explanations must be a list of {{"description": text}} objects, got {type(nested).__name__}',
            param=f"{p}.explanations",
        )
    found = [_text(entry.get("explanation"), f"{p}.explanation")]
    for j, item in enumerate(nested or []):
        if isinstance(item, dict):
            found.append(_text(item.get("description"), f"{p}.explanations[{j}].description"))
        elif isinstance(item, str):
            found.append(_text(item, f"{p}.explanations[{j}]"))
        else:
            raise InvalidInput(
                f'{p}.explanations[{j}] must be {{"description": text}} or a string, got {type(item).__name__}',
                param=f"{p}.explanations[{j}]",
            )
    if not any(found) and entry.get("description") is not None:
        found.append(_text(entry["description"], f"{p}.description"))
    return [text for text in found if text is not None]


def parse_features(data: object) -> list[FeatureInfo]:
    """Annotations by feature index, merged, in index order."""
    merged: dict[int, dict] = {}
    explained: dict[int, list[str]] = {}
    for i, entry in enumerate(_entries(data)):
        if not isinstance(entry, dict):
            raise InvalidInput(f"features[{i}] must be an object", param=f"features[{i}]")
        p = f"features[{i}]"
        index = _index(_first(entry, "index", "featureIndex"), f"{p}.index")
        texts = explained.setdefault(index, [])
        texts.extend(t for t in _explanations(entry, p) if t not in texts)
        if len(texts) > _MAX_EXPLANATIONS:
            raise InvalidInput(
                f"feature {index} has more than {_MAX_EXPLANATIONS} distinct explanations", param=f"{p}.index"
            )
        fields = {
            "label": _text(_first(entry, "label", "description"), f"{p}.label"),
            "max_activation": _number(
                _first(entry, "max_activation", "maxActApprox", "maxActivation"), f"{p}.max_activation"
            ),
            "density": _number(_first(entry, "density", "frac_nonzero", "fracNonzero"), f"{p}.density"),
            "mean_activation": _number(
                _first(entry, "mean_activation", "meanActivation"), f"{p}.mean_activation"
            ),
        }
        sample = _first(entry, "active_sample", "activationSample")
        if sample is not None:
            fields["active_sample"] = check_sample(sample, f"{p}.active_sample", positive=True)
        if fields["density"] is not None and not 0.0 <= fields["density"] <= 1.0:
            raise InvalidInput(
                f"{p}.density must be in [0, 1], got {fields['density']}", param=f"{p}.density"
            )
        slot = merged.setdefault(index, {})
        for key, value in fields.items():
            if slot.get(key) is None:
                slot[key] = value
    infos = []
    for i in sorted(merged):
        texts = explained[i]
        label = merged[i].pop("label") or (texts[0] if texts else None)
        infos.append(FeatureInfo(index=i, label=label, explanation="\n".join(texts) or None, **merged[i]))
    return infos
