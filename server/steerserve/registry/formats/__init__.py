"""File formats -> normalized objects: one entry point per kind of thing the registry stores.

- `load_sae(weights, cfg, site=...)`: an uploaded pair (cfg.json dict + safetensors or npz);
- `load_sae_path(path, site=...)`: a folder or file on disk (SAELens, sparsify, Gemma Scope 1 and 2,
  Llama Scope); which SAE families are taken and how each maps: `families.TABLE`;
- `load_vector(path, filename, fmt, site)`: safetensors or GGUF control vectors (JSON bodies go
  through `vectors.from_json`);
- `neuronpedia.parse_features(...)`: feature annotations.
Every loader checks shapes, dtypes and finiteness; nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

from steerserve.registry.errors import InvalidInput
from steerserve.registry.formats import gemmascope, llamascope, saelens, sparsify, vectors
from steerserve.registry.formats.common import LoadedSAE, site_of
from steerserve.registry.storable import parse_json
from steerserve.registry.tensors import check_finite, read_tensor_file, sniff
from steerserve.registry.vector import SteeringVector
from steerserve.types.sites import Site

__all__ = ["LoadedSAE", "load_sae", "load_sae_path", "load_vector", "read_json_file"]

_MAX_CFG_BYTES = 1 << 20


def read_json_file(path: Path, param: str = "cfg") -> object:
    if path.stat().st_size > _MAX_CFG_BYTES:
        raise InvalidInput(f"{param} is larger than {_MAX_CFG_BYTES} bytes", param=param)
    return parse_json(path.read_bytes(), param)  # strict: no NaN, bounded depth and integers


def load_sae(
    weights: Path,
    cfg: dict | None,
    site: Site | None = None,
    path_hint: str = "",
    max_bytes: int | None = None,
) -> LoadedSAE:
    """An SAE from its weights file (safetensors or npz) and its config (None only for Gemma Scope).

    The layout decides the loader: npz or lowercase `w_enc` -> Gemma Scope (1 or 2); an lm_saes config
    (`hook_point_in`) -> Llama Scope; a sparsify config -> sparsify; anything else -> SAELens."""
    if cfg is not None and not isinstance(cfg, dict):
        raise InvalidInput("cfg.json must hold a JSON object", param="cfg")
    kind = sniff(weights)
    tensors = read_tensor_file(weights, "weights", max_bytes)
    if kind == "npz" or gemmascope.is_gemma_scope_2(cfg, tensors):
        loaded = gemmascope.from_state(tensors, site, path_hint, cfg)
    elif cfg is None:
        raise InvalidInput(
            "a config is needed beside safetensors SAE weights (SAELens or sparsify cfg.json, Llama Scope "
            "hyperparams.json)",
            param="cfg",
        )
    elif llamascope.looks_like(cfg):
        loaded = llamascope.from_state(cfg, tensors, site)
    elif sparsify.looks_like(cfg):
        loaded = sparsify.from_state(cfg, tensors, site, path_hint)
    else:
        loaded = saelens.from_state(cfg, tensors, site)
    check_finite(loaded.weights.tensors(), "weights")  # folding must not have overflowed
    return loaded


# weights file -> the config files that may describe it (first found), relative to the weights' folder
_LAYOUTS = {
    "sae_weights.safetensors": ("cfg.json", "config.json"),  # SAELens; Llama Scope R1 (config.json)
    "sae.safetensors": ("cfg.json",),  # sparsify
    "params.npz": ("cfg.json",),  # Gemma Scope (no config needed)
    "params.safetensors": ("config.json", "cfg.json"),  # Gemma Scope 2
    "checkpoints/final.safetensors": ("hyperparams.json",),  # Llama Scope
}


def _config_for(folder: Path, weights_name: str) -> dict | None:
    for name in _LAYOUTS.get(weights_name, ("cfg.json",)):
        if (folder / name).is_file():
            return read_json_file(folder / name)
    return None


def load_sae_path(path: Path, site: Site | None = None, max_bytes: int | None = None) -> LoadedSAE:
    """A folder or weights file in one of the layouts in `_LAYOUTS` (SAELens, sparsify `layers.N`,
    Gemma Scope 1 and 2, Llama Scope)."""
    path = Path(path)
    if path.is_dir():
        for weights_name in _LAYOUTS:
            if (path / weights_name).is_file():
                cfg = _config_for(path, weights_name)
                return load_sae(path / weights_name, cfg, site, str(path), max_bytes)
        raise InvalidInput(
            f"{path}: no SAE weights in this folder (looked for {', '.join(_LAYOUTS)})", param="path"
        )
    if path.is_file():
        folder, name = path.parent, path.name
        if folder.name == "checkpoints" and (folder.parent / "hyperparams.json").is_file():
            folder, name = folder.parent, f"checkpoints/{name}"
        cfg = None if path.suffix == ".npz" else _config_for(folder, name)
        return load_sae(path, cfg, site, str(folder if cfg else path), max_bytes)
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
