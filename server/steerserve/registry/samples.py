"""Stored samples of a distribution (resample ablation): a feature's nonzero activations, a vector's
projections. Up to SAMPLE_SIZE float32 values, sorted ascending.

Stored as float32 little-endian bytes (BLOB / BYTEA): 1 KiB for a full sample against ~5 KiB of JSON
text, read back bit for bit, and the sample is what the device draws from, which holds float32 anyway.
So every value is rounded to float32 when the record is built (`check_sample`): what a record holds is
exactly what is stored, and a value that is not finite (or not > 0, where that is required) *as a
float32* is refused then (1e39 would overflow, 1e-50 would become 0).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from steerserve.registry.errors import InvalidInput
from steerserve.registry.formats.common import site_of
from steerserve.types.sites import Site

SAMPLE_SIZE = 256  # ACTIVE_SAMPLE_SIZE (features) and the projection sample size (vectors)
ACTIVE_SAMPLE_SIZE = SAMPLE_SIZE
_F32 = np.dtype("<f4")


def check_sample(values: object, param: str, positive: bool) -> tuple[float, ...]:
    """A list / tuple of at most SAMPLE_SIZE numbers -> sorted float32-exact floats; an InvalidInput
    naming `param` for anything else (non-numbers, NaN/inf, <= 0 when `positive`)."""
    if not isinstance(values, (list, tuple)):
        raise InvalidInput(f"{param} must be a list of numbers, got {type(values).__name__}", param=param)
    if len(values) > SAMPLE_SIZE:
        raise InvalidInput(f"{param} holds {len(values)} values, at most {SAMPLE_SIZE}", param=param)
    for j, v in enumerate(values):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise InvalidInput(f"{param}[{j}] must be a finite number, got {v!r}", param=param)
    with np.errstate(over="ignore", under="ignore"):
        arr = np.sort(np.asarray(values, dtype=np.float64).astype(_F32))
    if not np.isfinite(arr).all():
        raise InvalidInput(f"{param} holds a value beyond float32's range", param=param)
    if positive and arr.size and not arr[0] > 0:
        raise InvalidInput(
            f"{param} must hold activations > 0 (as float32), got {float(arr[0])!r}", param=param
        )
    return tuple(arr.tolist())


def check_site_samples(samples: object) -> dict[Site, tuple[float, ...]]:
    """A vector's projection samples: {Site: values}, each non-empty (see check_sample)."""
    if not isinstance(samples, dict) or not samples:
        raise InvalidInput("samples must map at least one of the vector's sites to values", param="samples")
    out = {}
    for site, values in samples.items():
        if not isinstance(site, Site):
            raise InvalidInput(f"samples' keys must be sites, got {site!r}", param="samples")
        out[site] = check_sample(values, f"samples[{site.hook_name}]", positive=False)
        if not out[site]:
            raise InvalidInput(f"samples[{site.hook_name}] is empty", param=f"samples[{site.hook_name}]")
    return out


def parse_vector_stats(body: object) -> dict[Site, object]:
    """`PUT /v1/vectors/{id}/stats`: `{"sites": [{"site": <hook name | layer | {layer, hook}>,
    "projection_sample": [numbers]}]}`, or `{"projection_sample": [...]}` for a one-site vector (site
    None: the caller fills it in). Values are checked by check_site_samples."""
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object", param="body")
    if "sites" not in body:
        if "projection_sample" not in body:
            raise InvalidInput('give "sites": [{"site", "projection_sample"}]', param="sites")
        sample = check_sample(body["projection_sample"], "projection_sample", positive=False)
        if not sample:
            raise InvalidInput("projection_sample is empty", param="projection_sample")
        return {None: sample}
    entries = body["sites"]
    if not isinstance(entries, list) or not entries:
        raise InvalidInput("sites must be a non-empty list", param="sites")
    out: dict = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "site" not in entry or "projection_sample" not in entry:
            raise InvalidInput('each entry needs "site" and "projection_sample"', param=f"sites[{i}]")
        site = site_of(entry["site"], f"sites[{i}].site")
        if site in out:
            raise InvalidInput(f"{site.hook_name} is given twice", param=f"sites[{i}].site")
        param = f"sites[{i}].projection_sample"
        out[site] = check_sample(entry["projection_sample"], param, positive=False)
        if not out[site]:
            raise InvalidInput(f"{param} is empty", param=param)
    return out


def pack(sample: tuple[float, ...] | None) -> bytes | None:
    return None if sample is None else np.asarray(sample, dtype=_F32).tobytes()


def unpack(raw: bytes | memoryview | None) -> tuple[float, ...] | None:
    return None if raw is None else tuple(np.frombuffer(bytes(raw), dtype=_F32).tolist())
