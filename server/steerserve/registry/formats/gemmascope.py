"""Gemma Scope SAEs -> a JumpReLU SAEWeights that never subtracts b_dec from its input.

- Gemma Scope (SAELens loader `gemma_2`): `params.npz` with `W_enc [d_model, d_sae]`, `W_dec [d_sae,
  d_model]`, `b_enc`, `b_dec`, `threshold` (some releases spell `w_enc` / `w_dec`), no config;
- Gemma Scope 2 (loader `gemma_3`): `params.safetensors` with the same tensors in lowercase and a raw
  `config.json` (`"architecture": "jump_relu"`, `hf_hook_point_in`).
What SAELens' loaders fix for every one of them is the default here: jumprelu,
`apply_b_dec_to_input: false`, no input normalisation, d_in / d_sae from W_enc. A SAELens-style
cfg.json sent beside the weights (the `POST /v1/saes` route) overrides these keys one by one, as the
loaders' `cfg_overrides` do; keys it leaves out keep the Gemma Scope value (never SAELens' generic
defaults, which would subtract b_dec). The site: the cfg's hook name, else the given one, else the
path (`gemma-scope-2b-pt-res/layer_12/...`: resid_post of layer 12; `-mlp`: hook_mlp_out).
Gemma Scope 2 transcoders (raw config with `hf_hook_point_out`) load as SAELens' jumprelu(_skip)
transcoders; Gemma Scope transcoder paths without that config and per-head attention SAEs (hook_z) are
refused.
"""

from __future__ import annotations

import re

import torch

from steerserve.registry.errors import InvalidInput
from steerserve.registry.formats import saelens
from steerserve.registry.formats.common import LoadedSAE, Source, agreed_site, require, site_of
from steerserve.registry.formats.families import Family, refusal
from steerserve.types.sites import Site

_LAYER_IN_PATH = re.compile(r"layer_(\d{1,18})")
# Gemma Scope 2's raw config names the Hugging Face module it reads (SAELens `gemma_3` loader)
_HF_HOOKS = (
    (re.compile(r"^model\.layers\.(\d{1,18})\.output$"), "hook_resid_post"),
    (re.compile(r"^model\.layers\.(\d{1,18})\.post_feedforward_layernorm\.output$"), "hook_mlp_out"),
    # a transcoder's input: what the MLP module is called with (the pre-MLP norm's output, weight applied)
    (re.compile(r"^model\.layers\.(\d{1,18})\.pre_feedforward_layernorm\.output$"), "mlp.hook_in"),
    (re.compile(r"^model\.layers\.(\d{1,18})\.self_attn\.o_proj\.input$"), None),
)


def rename(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Some Gemma Scope releases spell the weights `w_enc` / `w_dec` (Gemma Scope 2: all of them)."""
    return {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in tensors.items()}


def is_gemma_scope_2(cfg: dict | None, tensors: dict[str, torch.Tensor]) -> bool:
    """Lowercase tensor names (params.safetensors) or the raw Gemma Scope 2 config."""
    return "w_enc" in tensors or (isinstance(cfg, dict) and cfg.get("architecture") == "jump_relu")


def site_from_path(path: str) -> Site | None:
    """The site a Gemma Scope folder path names (SAELens' gemma_2 / gemma_3 loaders' rules), or None."""
    low = path.lower()
    if re.search(r"(^|/)embedding(/|$)", low):  # SAELens rescales these by sqrt(d_model) and reads hook_embed
        raise InvalidInput(
            f"{Source.GEMMASCOPE.where}: embedding SAEs read hook_embed (the token embeddings), which is not "
            "a site here",
            param="site",
        )
    m = _LAYER_IN_PATH.search(path)
    if not m:
        return None
    if re.search(r"transcoder|(^|[/_-])clt([/_-]|$)", low):
        raise refusal(Family.GEMMA_SCOPE_TRANSCODER, Source.GEMMASCOPE.where, param="weights")
    if re.search(r"gemma-scope-[^/]*-att|attn_out", low):
        raise refusal(Family.HEAD_SAE, Source.GEMMASCOPE.where, param="site")
    if re.search(r"gemma-scope-[^/]*-mlp|mlp_out", low):
        return site_of(f"blocks.{m.group(1)}.hook_mlp_out", "site")
    return Site(int(m.group(1)), "resid_post")


def _hf_hook_name(hf_hook: object, key: str) -> str:
    """The SAELens hook name of a Hugging Face module output named in the raw config."""
    for pattern, hook in _HF_HOOKS:
        m = pattern.match(str(hf_hook))
        if m and hook is None:
            raise refusal(Family.HEAD_SAE, Source.GEMMASCOPE2.where, param=f"cfg.{key}")
        if m:
            return f"blocks.{m.group(1)}.{hook}"
    raise InvalidInput(
        f"{Source.GEMMASCOPE2.where}: cfg.{key} {hf_hook!r} is not a module steerserve reads "
        "(model.layers.L.output, model.layers.L.post_feedforward_layernorm.output, "
        "model.layers.L.pre_feedforward_layernorm.output)",
        param=f"cfg.{key}",
    )


def _raw_gemma_scope_2(cfg: dict) -> dict:
    """The raw Gemma Scope 2 config.json -> the SAELens keys its loader derives from it. A transcoder
    (`hf_hook_point_out`) is SAELens' jumprelu_(skip_)transcoder; it reads the module output its
    `hf_hook_point_in` names (pre_feedforward_layernorm.output = blocks.L.mlp.hook_in: SAELens calls it
    hook_mlp_in, which in TransformerLens is the norm's input, not what the transcoder reads)."""
    out: dict = {"model_name": cfg.get("model_name")}
    if cfg.get("hf_hook_point_in") is not None:
        out["hook_name"] = _hf_hook_name(cfg["hf_hook_point_in"], "hf_hook_point_in")
    if cfg.get("hf_hook_point_out") is not None:
        out["hook_name_out"] = _hf_hook_name(cfg["hf_hook_point_out"], "hf_hook_point_out")
        skip = cfg.get("affine_connection", False)
        out["architecture"] = "jumprelu_skip_transcoder" if skip else "jumprelu_transcoder"
    elif cfg.get("affine_connection"):
        raise InvalidInput(
            f"{Source.GEMMASCOPE2.where}: cfg.affine_connection without cfg.hf_hook_point_out (where the "
            "transcoder writes)",
            param="cfg.hf_hook_point_out",
        )
    return out


def from_state(
    tensors: dict[str, torch.Tensor], site: Site | None, path_hint: str = "", cfg: dict | None = None
) -> LoadedSAE:
    source = Source.GEMMASCOPE2 if is_gemma_scope_2(cfg, tensors) else Source.GEMMASCOPE
    tensors = rename(tensors)
    if "affine_skip_connection" in tensors:  # stored [d_in, d_out]; SAELens' W_skip is [d_out, d_in]
        tensors["W_skip"] = tensors.pop("affine_skip_connection").T
    W_enc = require(tensors, "W_enc", source.where)  # [d_model, d_sae]
    if W_enc.dim() != 2:
        raise InvalidInput(
            f"{source.where}: W_enc must be 2-d [d_model, d_sae], got {list(W_enc.shape)}", "weights"
        )
    given = dict(cfg or {})
    if given.get("architecture") == "jump_relu":  # the raw config: only its hook and model name count
        given = _raw_gemma_scope_2(given)
    d_in, d_sae = W_enc.shape
    merged = {
        "architecture": "jumprelu",
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        **given,
    }
    if saelens.cfg_get(merged, "hook_name", saelens.cfg_get(merged, "hook_point")) is None:
        site = agreed_site(site, site_from_path(path_hint), "folder name", source.where)
        if site is None:
            raise InvalidInput(
                f"a {source.where} file carries no site: give one (layer or hook name)", "site"
            )
    return saelens.from_state(merged, tensors, site=site, fmt=source)
