"""SAELens SAEs: `cfg.json` (SAELens 5 or 6 keys) + `sae_weights.safetensors` -> SAEWeights.

Steps:
1. read the config: v6 keeps `hook_name`/`model_name` under `metadata` and `k` at the top; v5 keeps
   them at the top level (`hook_point`, `activation_fn_str` + `activation_fn_kwargs.k` in older files);
2. decide the architecture: standard (relu), jumprelu, topk, gated; anything else is refused;
3. check every tensor's name and shape against d_in / d_sae;
4. fold what SAELens itself folds into the weights: `expected_average_only_in` with a known scaling
   factor (cfg `norm_scaling_factor`), the v5 finetuning `scaling_factor`, topk
   `rescale_acts_by_decoder_norm`; gated is rewritten as an exact jumprelu. Input-dependent
   normalisations (`layer_norm`, `constant_norm_rescale`) cannot be folded and are refused.
"""

from __future__ import annotations

import torch

from steerserve.registry.errors import InvalidInput
from steerserve.registry.formats.common import (
    LoadedSAE,
    as_int,
    reject_unknown,
    require,
    site_of,
    storage_dtype,
)
from steerserve.registry.sae import SAEWeights
from steerserve.sites import Site

_WHERE = "SAELens SAE"
_SUPPORTED = ("standard", "relu", "jumprelu", "topk", "gated")


def _get(cfg: dict, key: str, default: object = None) -> object:
    """A key from the top level (v5) or from `metadata` (v6)."""
    if key in cfg:
        return cfg[key]
    meta = cfg.get("metadata")
    return meta.get(key, default) if isinstance(meta, dict) else default


def _architecture(cfg: dict) -> tuple[str, int | None]:
    arch = cfg.get("architecture", "standard")
    act = _get(cfg, "activation_fn", _get(cfg, "activation_fn_str", "relu"))
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if act == "topk" or arch == "topk":
        k = cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
        return "topk", as_int(k, "cfg.k", minimum=1)
    if arch not in _SUPPORTED:
        raise InvalidInput(
            f"cfg.architecture {arch!r} is not supported; supported: {', '.join(_SUPPORTED)}",
            param="cfg.architecture",
        )
    if act not in ("relu", None):
        raise InvalidInput(
            f"cfg.activation_fn {act!r} is not supported (relu or topk)", param="cfg.activation_fn"
        )
    return ("relu" if arch == "standard" else arch), None


def _norm_factor(cfg: dict) -> float | None:
    """None when there is nothing to fold; the factor to fold for expected_average_only_in."""
    mode = cfg.get("normalize_activations")
    if mode in (None, False, "none"):
        return None
    if mode in (True, "expected_average_only_in"):
        factor = cfg.get("norm_scaling_factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise InvalidInput(
                "cfg.normalize_activations is 'expected_average_only_in' but the file does not carry the "
                "norm scaling factor; fold it into the weights first (SAELens: "
                "sae.fold_activation_norm_scaling_factor(f), which sets normalize_activations to 'none') "
                "or give it as cfg.norm_scaling_factor",
                param="cfg.normalize_activations",
            )
        return float(factor)
    raise InvalidInput(
        f"cfg.normalize_activations {mode!r} rescales each input by its own norm and cannot be folded into "
        "the weights; only 'none' and 'expected_average_only_in' are supported",
        param="cfg.normalize_activations",
    )


def parse_site(cfg: dict, site: Site | None) -> Site:
    if site is not None:
        return site
    hook = _get(cfg, "hook_name", _get(cfg, "hook_point"))
    if hook is None:
        raise InvalidInput(
            "cfg has no hook_name (metadata.hook_name in SAELens 6); give a site", "cfg.hook_name"
        )
    if _get(cfg, "hook_head_index", _get(cfg, "hook_point_head_index")) is not None:
        raise InvalidInput("per-head SAEs (hook_head_index) are not supported", param="cfg.hook_head_index")
    return site_of(hook, "cfg.hook_name")


def from_state(
    cfg: dict, tensors: dict[str, torch.Tensor], site: Site | None = None, fmt: str = "saelens"
) -> LoadedSAE:
    """SAEWeights from a SAELens config dict and its state dict (tensors by SAELens names)."""
    if not isinstance(cfg, dict):
        raise InvalidInput("cfg.json must hold a JSON object", param="cfg")
    arch, k = _architecture(cfg)
    the_site = parse_site(cfg, site)
    d_in, d_sae = as_int(cfg.get("d_in"), "cfg.d_in", 1), as_int(cfg.get("d_sae"), "cfg.d_sae", 1)
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise InvalidInput(f"cfg.apply_b_dec_to_input must be a boolean, got {apply_b_dec!r}", param="cfg")
    if cfg.get("normalize_decoder"):
        raise InvalidInput("cfg.normalize_decoder=true is not supported; fold the decoder norms", param="cfg")
    factor = _norm_factor(cfg)

    t = dict(tensors)
    if "log_threshold" in t:  # JumpReLU training checkpoints store log(threshold)
        t["threshold"] = torch.exp(t.pop("log_threshold").double())
    enc_bias = ("b_gate", "r_mag", "b_mag") if arch == "gated" else ("b_enc",)
    allowed = {"W_enc", "W_dec", "b_dec", "scaling_factor", *enc_bias} | (
        {"threshold"} if arch == "jumprelu" else set()
    )
    reject_unknown(t, allowed, _WHERE)
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    shapes.update({name: (d_sae,) for name in (*enc_bias, "scaling_factor", "threshold")})
    for name in allowed - {"scaling_factor"}:
        got = tuple(require(t, name, _WHERE).shape)
        if got != shapes[name]:
            raise InvalidInput(
                f"{_WHERE}: {name} has shape {list(got)}, expected {list(shapes[name])} for d_in={d_in}, "
                f"d_sae={d_sae}",
                param="weights",
            )
    dtype = storage_dtype(t["W_enc"])
    w = {name: v.double() for name, v in t.items()}  # fold in float64, store in the file's dtype
    folded: list[str] = []

    if "scaling_factor" in w:
        s = w.pop("scaling_factor")
        if tuple(s.shape) != (d_sae,):
            raise InvalidInput(f"{_WHERE}: scaling_factor must have shape [{d_sae}]", param="weights")
        if not torch.allclose(s, torch.ones_like(s)):
            if not cfg.get("finetuning_scaling_factor"):
                raise InvalidInput(
                    "scaling_factor is present but cfg.finetuning_scaling_factor is false", "cfg"
                )
            w["W_dec"] = w["W_dec"] * s[:, None]
            folded.append("finetuning_scaling_factor")
    if arch == "gated":
        # NOTE: gated == jumprelu exactly: with m = z*e^r + b_mag (z = sae_in @ W_enc), the gate
        # z + b_gate > 0  <=>  m > b_mag - b_gate*e^r, so acts = relu(m) * (m > threshold).
        scale = torch.exp(w.pop("r_mag"))
        b_gate, b_mag = w.pop("b_gate"), w.pop("b_mag")
        w["W_enc"], w["b_enc"], w["threshold"] = w["W_enc"] * scale, b_mag, b_mag - b_gate * scale
        arch = "jumprelu"
        folded.append("gated->jumprelu")
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        n = w["W_dec"].norm(dim=-1)  # [d_sae]
        w["W_enc"], w["b_enc"], w["W_dec"] = w["W_enc"] * n, w["b_enc"] * n, w["W_dec"] / n[:, None]
        folded.append("rescale_acts_by_decoder_norm")
    if factor is not None:
        w["W_enc"], w["W_dec"], w["b_dec"] = w["W_enc"] * factor, w["W_dec"] / factor, w["b_dec"] / factor
        folded.append(f"norm_scaling_factor={factor}")

    weights = SAEWeights(
        **{name: v.to(dtype).contiguous() for name, v in w.items()},
        architecture=arch,
        k=k,
        apply_b_dec_to_input=apply_b_dec,
        site=the_site,
    )
    meta = {
        "format": fmt,
        "source_architecture": cfg.get("architecture", "standard"),
        "hook_name": _get(cfg, "hook_name", _get(cfg, "hook_point")),
        "folded": folded,
    }
    for key in ("neuronpedia_id", "sae_lens_version", "sae_lens_training_version", "dataset_path"):
        if _get(cfg, key) is not None:
            meta[key] = _get(cfg, key)
    model_name = _get(cfg, "model_name")
    return LoadedSAE(weights, model_name if isinstance(model_name, str) else None, meta)
