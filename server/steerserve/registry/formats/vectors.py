"""Steering-vector files -> SteeringVector.

- JSON: `{"vector": [float, ...]}` or `{"vector": "<base64 of little-endian float32>"}`, with the site
  given beside it (`layer` or `site`); base64 that is evidently float64 gets a 400 saying so;
- safetensors: one tensor [d] (the site given beside it), or tensors named by site
  (`direction.N`, `layers.N`, `N`, or a SAELens hook name);
- GGUF control vectors (llama.cpp / repeng): `direction.N` per layer, see gguf.py.
A given site selects that one direction out of a multi-layer file.
"""

from __future__ import annotations

import base64
import binascii
import math
from pathlib import Path

import numpy as np
import torch

from steerserve.registry.errors import InvalidInput
from steerserve.registry.formats import gguf
from steerserve.registry.formats.common import site_from_tensor_name
from steerserve.registry.tensors import read_safetensors
from steerserve.registry.vector import SteeringVector
from steerserve.types.sites import Site

_MAX_JSON_FLOATS = 1 << 20


def parse_vector_value(value: object, param: str = "vector") -> torch.Tensor:
    """A JSON float list or a base64 string of little-endian float32 -> [d] float32."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"{param} is a string but not valid base64", param=param) from None
        if not raw or len(raw) % 4:
            raise InvalidInput(
                f"{param}: base64 data of {len(raw)} bytes is not a float32 array (4 bytes per value)",
                param=param,
            )
        values = np.frombuffer(raw, dtype="<f4")
        if _looks_like_float64(raw, values):
            raise InvalidInput(
                f"{param}: the base64 data reads as float64, not float32 ({len(raw)} bytes: {len(raw) // 8} "
                f"sane float64 values, but as float32 values like {_worst(values)}); send little-endian "
                "float32 (numpy: v.astype('<f4').tobytes()) or a JSON list of numbers",
                param=param,
            )
        return torch.from_numpy(values.astype(np.float32))
    if not isinstance(value, list) or not value:
        raise InvalidInput(f"{param} must be a non-empty list of numbers or a base64 string", param=param)
    if len(value) > _MAX_JSON_FLOATS:
        raise InvalidInput(f"{param} has {len(value)} entries, more than {_MAX_JSON_FLOATS}", param=param)
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InvalidInput(f"{param}[{i}] must be a finite number, got {v!r}", param=f"{param}[{i}]")
    return torch.tensor(value, dtype=torch.float64).to(torch.float32)


_IMPLAUSIBLE = 1e15  # no steering vector holds a float32 this large; random low words of doubles do


def _looks_like_float64(raw: bytes, as_f32: np.ndarray) -> bool:
    """True when the bytes are sane as float64 but absurd as float32.

    A double's low 4 bytes, read as a float32, have an exponent spread over the whole range: some are
    NaN, inf, above 1e15 or below 1e-30. Doubles widened from float32 have zero low words instead;
    those read as a plausible float32 array of twice the length and are caught by the dimension check.
    """
    if len(raw) % 8:
        return False
    as_f64 = np.frombuffer(raw, dtype="<f8")
    if not np.isfinite(as_f64).all() or np.abs(as_f64).max() >= _IMPLAUSIBLE:
        return False
    with np.errstate(over="ignore", invalid="ignore"):
        mag = np.abs(as_f32.astype(np.float64))
    absurd = ~np.isfinite(mag) | (mag >= _IMPLAUSIBLE) | ((mag > 0) & (mag < 1e-30))
    return bool(absurd.any())


def _worst(values: np.ndarray) -> str:
    with np.errstate(over="ignore", invalid="ignore"):
        mag = np.nan_to_num(np.abs(values.astype(np.float64)), nan=np.inf)
    return ", ".join(f"{v:.3g}" for v in values[np.argsort(-mag)[:2]])


def _select(directions: dict[Site, torch.Tensor], site: Site | None, name: str) -> SteeringVector:
    if site is not None and len(directions) > 1:
        if site not in directions:
            have = ", ".join(s.hook_name for s in sorted(directions))
            raise InvalidInput(f"{name} has no direction at {site.hook_name} (it has {have})", param="site")
        directions = {site: directions[site]}
    return SteeringVector.of(directions)


def from_json(value: object, site: Site | None) -> SteeringVector:
    if site is None:
        raise InvalidInput("a vector needs a site: give 'layer' or 'site'", param="layer")
    return SteeringVector.of({site: parse_vector_value(value)})


def from_safetensors(path: Path, site: Site | None, name: str = "vector") -> SteeringVector:
    tensors, _ = read_safetensors(path, name)
    if not tensors:
        raise InvalidInput(f"{name} holds no tensors", param=name)
    if len(tensors) == 1 and site is not None:
        (t,) = tensors.values()
        if sum(d != 1 for d in t.shape) > 1:
            raise InvalidInput(
                f"{name}: the tensor must be a vector [d], got shape {list(t.shape)}", param=name
            )
        return SteeringVector.of({site: t.reshape(-1)})
    directions: dict[Site, torch.Tensor] = {}
    for key, t in tensors.items():
        s = site_from_tensor_name(key)
        if s is None:
            raise InvalidInput(
                f"{name}: cannot tell the site of tensor {key!r}; name tensors 'direction.N' or "
                "'blocks.N.hook_resid_post', or send one tensor with a site",
                param=name,
            )
        if t.dim() != 1:
            raise InvalidInput(
                f"{name}: tensor {key!r} must be 1-d [d], got shape {list(t.shape)}", param=name
            )
        directions[s] = t
    return _select(directions, site, name)


def from_gguf(path: Path, site: Site | None, name: str = "vector") -> tuple[SteeringVector, dict]:
    directions, hints = gguf.control_vector(path, name)
    return _select(directions, site, name), hints


def detect(path: Path, filename: str | None, declared: str | None) -> str:
    """'gguf' | 'safetensors' | 'json': declared format, else the file name's extension, else its bytes."""
    if declared:
        if declared not in ("gguf", "safetensors", "json"):
            raise InvalidInput(f"format must be gguf, safetensors or json, got {declared!r}", param="format")
        return declared
    suffix = Path(filename or "").suffix.lower()
    if suffix in (".gguf", ".safetensors", ".json"):
        return suffix[1:]
    with open(path, "rb") as f:
        head = f.read(4)
    if head == gguf.MAGIC:
        return "gguf"
    return "json" if head[:1] in (b"{", b"[") else "safetensors"
