"""Gemma Scope SAEs: `params.npz` with `W_enc [d_model, d_sae]`, `W_dec [d_sae, d_model]`, `b_enc`,
`b_dec`, `threshold` -> a JumpReLU SAEWeights without b_dec subtracted from the input.

The archive carries no config: the site comes from the caller or from the path (`layer_12/...` in
the Gemma Scope residual-stream repositories is resid_post of layer 12). A SAELens-style cfg.json
given beside the npz (the `POST /v1/saes` route) takes precedence over these defaults.
"""

from __future__ import annotations

import re

import torch

from steerserve.registry.errors import InvalidInput
from steerserve.registry.formats import saelens
from steerserve.registry.formats.common import LoadedSAE, require
from steerserve.sites import Site

_LAYER_IN_PATH = re.compile(r"layer_(\d+)")


def rename(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Some Gemma Scope releases spell the weights `w_enc` / `w_dec`."""
    return {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in tensors.items()}


def site_from_path(path: str) -> Site | None:
    m = _LAYER_IN_PATH.search(path)
    return Site(int(m.group(1)), "resid_post") if m else None


def from_state(tensors: dict[str, torch.Tensor], site: Site | None, path_hint: str = "") -> LoadedSAE:
    tensors = rename(tensors)
    site = site or site_from_path(path_hint)
    if site is None:
        raise InvalidInput("a Gemma Scope params.npz carries no site: give one (layer or hook name)", "site")
    W_enc = require(tensors, "W_enc", "Gemma Scope SAE")  # [d_model, d_sae]
    if W_enc.dim() != 2:
        raise InvalidInput(
            f"Gemma Scope SAE: W_enc must be 2-d [d_model, d_sae], got {list(W_enc.shape)}", "weights"
        )
    d_in, d_sae = W_enc.shape
    cfg = {
        "architecture": "jumprelu",
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
    }
    return saelens.from_state(cfg, tensors, site=site, fmt="gemmascope")
