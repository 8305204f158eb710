"""File formats -> normalized objects: one entry point per kind of thing the registry stores.

- `load_sae(weights, cfg, site=...)`: an uploaded pair (cfg.json dict + safetensors or npz);
- `load_sae_path(path, site=...)`: a folder or file on disk (SAELens, sparsify, Gemma Scope);
- `load_vector(path, filename, fmt, site)`: safetensors or GGUF control vectors (JSON bodies go
  through `vectors.from_json`);
- `neuronpedia.parse_features(...)`: feature annotations.
Every loader checks shapes, dtypes and finiteness; nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

from steerserve.registry.errors import InvalidInput
from steerserve.registry.formats import gemmascope, saelens, sparsify, vectors
from steerserve.registry.formats.common import LoadedSAE, site_from_tensor_name, site_of
from steerserve.registry.tensors import check_finite, read_tensor_file, sniff
from steerserve.registry.vector import SteeringVector
from steerserve.sites import Site

__all__ = ["LoadedSAE", "load_sae", "load_sae_path", "load_vector", "read_json_file"]

_MAX_CFG_BYTES = 1 << 20


def read_json_file(path: Path, param: str = "cfg") -> object:
    if path.stat().st_size > _MAX_CFG_BYTES:
        raise InvalidInput(f"{param} is larger than {_MAX_CFG_BYTES} bytes", param=param)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{param} is not valid JSON: {exc}", param=param) from None


def load_sae(
    weights: Path,
    cfg: dict | None,
    site: Site | None = None,
    path_hint: str = "",
    max_bytes: int | None = None,
) -> LoadedSAE:
    """An SAE from its weights file (safetensors or npz) and its config (None only for Gemma Scope)."""
    kind = sniff(weights)
    tensors = read_tensor_file(weights, "weights", max_bytes)
    if kind == "npz":
        tensors = gemmascope.rename(tensors)
    if cfg is None:
        if kind != "npz":
            raise InvalidInput("a cfg.json is needed beside safetensors SAE weights", param="cfg")
        loaded = gemmascope.from_state(tensors, site, path_hint)
    elif not isinstance(cfg, dict):
        raise InvalidInput("cfg.json must hold a JSON object", param="cfg")
    elif sparsify.looks_like(cfg):
        loaded = sparsify.from_state(cfg, tensors, site or site_from_tensor_name(Path(path_hint).name))
    else:
        loaded = saelens.from_state(cfg, tensors, site)
    check_finite(loaded.weights.tensors(), "weights")  # folding must not have overflowed
    return loaded


def load_sae_path(path: Path, site: Site | None = None, max_bytes: int | None = None) -> LoadedSAE:
    """A SAELens folder (cfg.json + sae_weights.safetensors), a sparsify folder (cfg.json +
    sae.safetensors, named `layers.N`), or a Gemma Scope params.npz (or its folder)."""
    path = Path(path)
    if path.is_dir():
        cfg_path = path / "cfg.json"
        for weights_name in ("sae_weights.safetensors", "sae.safetensors", "params.npz"):
            if (path / weights_name).is_file():
                cfg = read_json_file(cfg_path) if cfg_path.is_file() else None
                return load_sae(path / weights_name, cfg, site, str(path), max_bytes)
        raise InvalidInput(
            f"{path}: no sae_weights.safetensors (SAELens), sae.safetensors (sparsify) or params.npz "
            "(Gemma Scope) in this folder",
            param="path",
        )
    if path.is_file():
        cfg_path = path.parent / "cfg.json"
        cfg = read_json_file(cfg_path) if cfg_path.is_file() and path.suffix != ".npz" else None
        return load_sae(path, cfg, site, str(path.parent if cfg else path), max_bytes)
    raise InvalidInput(f"{path} does not exist", param="path")


def load_vector(
    path: Path, filename: str | None = None, fmt: str | None = None, site: Site | None = None
) -> tuple[SteeringVector, dict]:
    """A steering vector file -> (vector, provenance notes)."""
    kind = vectors.detect(path, filename, fmt)
    if kind == "gguf":
        vec, hints = vectors.from_gguf(path, site)
        return vec, {"format": "gguf", **hints}
    if kind == "json":
        body = read_json_file(path, "vector")
        if not isinstance(body, dict) or "vector" not in body:
            raise InvalidInput("a JSON vector file must be an object with a 'vector' field", param="vector")
        if site is None and ("layer" in body or "site" in body):
            site = site_of(body.get("site", body.get("layer")))
        return vectors.from_json(body["vector"], site), {"format": "json"}
    return vectors.from_safetensors(path, site), {"format": "safetensors"}
