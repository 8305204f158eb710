"""Llama Scope SAEs (OpenMOSS `lm_saes`): `hyperparams.json` + `checkpoints/final.safetensors`.

Read exactly as SAELens' `llama_scope` loader followed by `SAE.from_pretrained` reads them:
    W_enc = encoder.weight.T   [d_model, d_sae]       W_dec = decoder.weight.T   [d_sae, d_model]
    b_enc = encoder.bias       b_dec = decoder.bias   b_dec is never subtracted from the input
    threshold = jump_relu_threshold * f  for every feature,  f = sqrt(d_model) / dataset_average_activation_norm.in
    then the dataset-wise norm f is folded like SAELens' fold_activation_norm_scaling_factor(f).
The Llama Scope R1 layout (config.json + `log_jumprelu_threshold` per feature) is read like the
`llama_scope_r1_distill` loader; its factor lives only in SAELens' release table, so it must come
as `norm_scaling_factor` in the cfg. Transcoders (hook_point_out != hook_point_in) are refused.
"""

from __future__ import annotations

import math

import torch

from steerserve.registry.errors import InvalidInput
from steerserve.registry.formats import saelens
from steerserve.registry.formats.common import LoadedSAE, Source, as_int, require
from steerserve.registry.formats.families import Family, refusal
from steerserve.types.sites import Site

_WHERE = Source.LLAMASCOPE.where
_CONVERT = (
    "or load it with SAELens (SAE.from_pretrained(release, sae_id)), save it with sae.save_model(folder) "
    "and upload that folder's cfg.json + sae_weights.safetensors"
)


def looks_like(cfg: dict) -> bool:
    """An lm_saes config: hook_point_in and d_model, no SAELens architecture key."""
    return "hook_point_in" in cfg and "d_model" in cfg and "architecture" not in cfg


def _positive(value: object, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise InvalidInput(f"{_WHERE}: {param} must be a positive number, got {value!r}", param=param)
    return float(value)


def _factor(cfg: dict, per_feature: bool) -> float:
    """f, the dataset-wise input norm scale (the loader's, or the release table's via the cfg)."""
    if cfg.get("norm_scaling_factor") is not None:
        return _positive(cfg["norm_scaling_factor"], "cfg.norm_scaling_factor")
    norms = cfg.get("dataset_average_activation_norm")
    if per_feature or not isinstance(norms, dict) or "in" not in norms:
        raise InvalidInput(
            f"{_WHERE}: the input norm factor is not in this config; give cfg.norm_scaling_factor (SAELens' "
            f"pretrained_saes.yaml lists it per SAE) {_CONVERT}",
            param="cfg.norm_scaling_factor",
        )
    d_model = as_int(cfg["d_model"], "cfg.d_model", 1)
    return d_model**0.5 / _positive(norms["in"], "cfg.dataset_average_activation_norm.in")


def from_state(cfg: dict, tensors: dict[str, torch.Tensor], site: Site | None) -> LoadedSAE:
    hook_in, hook_out = cfg.get("hook_point_in"), cfg.get("hook_point_out", cfg.get("hook_point_in"))
    if hook_out != hook_in:
        raise refusal(Family.LLAMA_SCOPE_TRANSCODER, _WHERE, param="cfg.hook_point_out")
    act = cfg.get("act_fn", "jumprelu")
    if act != "jumprelu":
        raise InvalidInput(
            f"{_WHERE}: cfg.act_fn {act!r}: only the released jumprelu SAEs are read {_CONVERT}", "cfg.act_fn"
        )
    if cfg.get("norm_activation", "dataset-wise") != "dataset-wise":
        raise InvalidInput(
            f"{_WHERE}: cfg.norm_activation {cfg.get('norm_activation')!r}: only 'dataset-wise' (a constant "
            f"factor) can be folded into the weights {_CONVERT}",
            param="cfg.norm_activation",
        )
    if cfg.get("apply_decoder_bias_to_pre_encoder"):
        raise InvalidInput(
            f"{_WHERE}: cfg.apply_decoder_bias_to_pre_encoder=true is not what SAELens' loader reads "
            f"{_CONVERT}",
            param="cfg.apply_decoder_bias_to_pre_encoder",
        )
    d_in = as_int(cfg["d_model"], "cfg.d_model", 1)
    enc = require(tensors, "encoder.weight", _WHERE)  # nn.Linear(d_model, d_sae): [d_sae, d_model]
    if enc.dim() != 2 or enc.shape[1] != d_in:
        raise InvalidInput(
            f"{_WHERE}: encoder.weight has shape {list(enc.shape)}, expected [d_sae, {d_in}]", param="weights"
        )
    d_sae = int(enc.shape[0])
    per_feature = "log_jumprelu_threshold" in tensors  # the R1 layout
    f = _factor(cfg, per_feature)
    if per_feature:
        threshold = torch.exp(require(tensors, "log_jumprelu_threshold", _WHERE).double())
    else:
        jrt = cfg.get("jump_relu_threshold")
        if isinstance(jrt, bool) or not isinstance(jrt, (int, float)) or not math.isfinite(jrt):
            raise InvalidInput(
                f"{_WHERE}: cfg.jump_relu_threshold must be a number, got {jrt!r}", "cfg.jump_relu_threshold"
            )
        threshold = torch.full((d_sae,), float(jrt) * f, dtype=torch.float64)  # as the loader scales it
    state = {
        "W_enc": enc.T,
        "W_dec": require(tensors, "decoder.weight", _WHERE).T,  # nn.Linear(d_sae, d_model): [d_model, d_sae]
        "b_enc": require(tensors, "encoder.bias", _WHERE),
        "b_dec": require(tensors, "decoder.bias", _WHERE),
        "threshold": threshold,  # float64: from_state folds in float64 and picks the stored dtype
    }
    as_saelens = {
        "architecture": "jumprelu",
        "d_in": d_in,
        "d_sae": d_sae,
        "hook_name": hook_in,
        "apply_b_dec_to_input": False,
        "normalize_activations": "expected_average_only_in",
        "norm_scaling_factor": f,
    }
    loaded = saelens.from_state(as_saelens, state, site, fmt=Source.LLAMASCOPE)
    ignored = sorted(set(tensors) - {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias",
                                     "log_jumprelu_threshold"})  # fmt: skip
    if ignored:  # SAELens' loader reads only the tensors above
        loaded.meta["ignored_tensors"] = ignored
    return loaded
