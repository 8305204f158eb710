"""EleutherAI sparsify SAEs: `cfg.json` + `sae.safetensors` -> a TopK SAEWeights.

sparsify stores the encoder as an `nn.Linear` (`encoder.weight [d_sae, d_in]`, `encoder.bias`),
`W_dec [d_sae, d_in]` and `b_dec [d_in]`, and computes `relu(encoder(x - b_dec))`, keeps the top k,
and decodes `acts @ W_dec + b_dec`. The orientation of each matrix is decided by its shape against
`b_dec` (d_in) and `encoder.bias` (d_sae), so transposed exports load too. Transcoders (`transcode`,
hookpoint `layers.N.mlp`) read the MLP module's input (blocks.N.mlp.hook_in), never subtract b_dec, and
write its output (blocks.N.hook_mlp_out); a skip connection's `W_skip` (SAE or transcoder) is not stored:
it cancels in every edit, as SAELens' skip transcoders'. Signed and groupmax activations are refused (families.TABLE).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from steerserve.registry.errors import InvalidInput
from steerserve.registry.formats.common import (
    LoadedSAE,
    Source,
    agreed_site,
    as_int,
    reject_unknown,
    require,
    storage_dtype,
)
from steerserve.registry.formats.families import Family, refusal
from steerserve.registry.sae import SAEWeights
from steerserve.types.sites import Hook, Site

_WHERE = Source.SPARSIFY.where
_HOOKPOINT = re.compile(r"^(?:model\.)?layers[._](\d{1,18})$")
_MLP_HOOKPOINT = re.compile(r"^(?:model\.)?layers[._](\d{1,18})[._]mlp$")


def looks_like(cfg: dict) -> bool:
    """A sparsify config (no SAELens architecture/hook keys; expansion_factor or num_latents)."""
    return (
        "architecture" not in cfg
        and "hook_name" not in cfg
        and ("expansion_factor" in cfg or "num_latents" in cfg)
    )


def _oriented(t: torch.Tensor, rows: int, cols: int, name: str) -> torch.Tensor:
    """`t` as [rows, cols], transposing a [cols, rows] export; the native layout wins a tie."""
    if tuple(t.shape) == (rows, cols):
        return t
    if tuple(t.shape) == (cols, rows):
        return t.T
    raise InvalidInput(
        f"{_WHERE}: {name} has shape {list(t.shape)}, expected [{rows}, {cols}]", param="weights"
    )


def site_from_folder(name: str, transcode: bool = False) -> Site | None:
    """The site a sparsify hookpoint folder names: `layers.N` is the output of decoder layer N
    (resid_post, as SAELens' sparsify loader reads it); a transcoder's `layers.N.mlp` is the MLP's
    input (sparsify reads a transcoder's module input). An SAE's submodule folder (`layers.N.mlp`) names
    the module's raw output, which is not always a site's tensor (Gemma-2's post-norms): no guess."""
    m = (_MLP_HOOKPOINT if transcode else _HOOKPOINT).match(name)
    return Site(int(m.group(1)), Hook.MLP_HOOK_IN if transcode else Hook.RESID_POST) if m else None


def from_state(
    cfg: dict, tensors: dict[str, torch.Tensor], site: Site | None, path_hint: str = ""
) -> LoadedSAE:
    transcode = bool(cfg.get("transcode"))
    site = agreed_site(site, site_from_folder(Path(path_hint).name, transcode), "folder name", _WHERE)
    if site is None:
        raise InvalidInput(
            (
                "a sparsify transcoder needs its site: its folder named 'layers.N.mlp' (it reads "
                "blocks.N.mlp.hook_in), or a site"
                if transcode
                else "a sparsify SAE needs its site: its folder named 'layers.N' (resid_post), or a site"
            )
            + (f" (its folder is {Path(path_hint).name!r})" if path_hint else ""),
            "site",
        )
    if transcode and site.hook is not Hook.MLP_HOOK_IN:
        raise InvalidInput(
            f"{_WHERE}: a sparsify transcoder reads the MLP module's input (blocks.L.mlp.hook_in), got "
            f"{site.hook_name}",
            "site",
        )
    if cfg.get("signed"):
        raise refusal(Family.SPARSIFY_SIGNED, _WHERE, param="cfg.signed")
    if cfg.get("activation", "topk") == "groupmax":
        raise refusal(Family.SPARSIFY_GROUPMAX, _WHERE, param="cfg.activation")
    if cfg.get("activation", "topk") != "topk":
        raise InvalidInput(
            f"{_WHERE}: cfg.activation {cfg.get('activation')!r} is not supported (topk)", "cfg.activation"
        )
    k = as_int(cfg.get("k"), "cfg.k", minimum=1)
    skip = {"W_skip"} if cfg.get("skip_connection") else set()
    reject_unknown(tensors, {"encoder.weight", "encoder.bias", "W_dec", "b_dec", *skip}, _WHERE)
    b_dec, b_enc = require(tensors, "b_dec", _WHERE), require(tensors, "encoder.bias", _WHERE)
    if b_dec.dim() != 1 or b_enc.dim() != 1:
        raise InvalidInput(f"{_WHERE}: b_dec and encoder.bias must be 1-d", param="weights")
    d_in, d_sae = b_dec.numel(), b_enc.numel()
    if "d_in" in cfg and as_int(cfg["d_in"], "cfg.d_in", 1) != d_in:
        raise InvalidInput(f"{_WHERE}: cfg.d_in={cfg['d_in']} but b_dec has {d_in} entries", param="cfg.d_in")
    if cfg.get("num_latents") and as_int(cfg["num_latents"], "cfg.num_latents", 1) != d_sae:
        raise InvalidInput(
            f"{_WHERE}: cfg.num_latents={cfg['num_latents']} but encoder.bias has {d_sae}", "cfg"
        )
    W_enc = _oriented(
        require(tensors, "encoder.weight", _WHERE), d_sae, d_in, "encoder.weight"
    ).T  # [d_in, d_sae]
    W_dec = _oriented(require(tensors, "W_dec", _WHERE), d_sae, d_in, "W_dec")  # [d_sae, d_in]
    dtype = storage_dtype(W_enc)
    weights = SAEWeights(
        W_enc=W_enc.to(dtype).contiguous(),
        b_enc=b_enc.to(dtype).contiguous(),
        W_dec=W_dec.to(dtype).contiguous(),
        b_dec=b_dec.to(dtype).contiguous(),
        architecture="topk",
        k=k,
        apply_b_dec_to_input=not transcode,  # sparsify's encode(): `x - b_dec` for SAEs only
        site=site,
        site_out=Site(site.layer, Hook.MLP_OUT) if transcode else None,
    )
    meta = {"format": Source.SPARSIFY.value, "hook_name": site.hook_name, "folded": []}
    if weights.site_out is not None:
        meta["hook_name_out"] = weights.site_out.hook_name
    return LoadedSAE(weights, None, meta)
