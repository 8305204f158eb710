"""SAELens SAEs: `cfg.json` (SAELens 5 or 6 keys) + `sae_weights.safetensors` -> SAEWeights.

Steps:
1. read the config: v6 keeps `hook_name`/`model_name` under `metadata` and `k` at the top; v5 keeps
   them at the top level (`hook_point`, `activation_fn_str` + `activation_fn_kwargs.k` in older files);
2. decide the architecture from the one table (`families.TABLE`): standard, gated, jumprelu, topk, and
   the batchtopk / matryoshka_batchtopk training checkpoints are mapped exactly; so are the four
   transcoder classes (relu / jumprelu, with or without W_skip), which read an MLP's input (hook_name)
   and write its output (metadata.hook_name_out: SAEWeights.site_out); the rest are refused;
3. check every tensor's name and shape against d_in / d_sae;
4. fold what SAELens itself folds into the weights: `expected_average_only_in` with a known scaling
   factor (cfg `norm_scaling_factor`), the v5 finetuning `scaling_factor`, topk
   `rescale_acts_by_decoder_norm`; gated is rewritten as an exact jumprelu, batchtopk as its SAELens
   inference form. Input-dependent normalisations (`layer_norm`, `constant_norm_rescale`) and unfolded
   whitening cannot be folded and are refused.
"""

from __future__ import annotations

import torch

from steerserve.registry.errors import InvalidInput
from steerserve.registry.formats.common import (
    LoadedSAE,
    Source,
    agreed_site,
    as_int,
    reject_unknown,
    require,
    site_of,
    storage_dtype,
)
from steerserve.registry.formats.families import (
    SKIP_TRANSCODERS,
    TRANSCODERS,
    Family,
    Target,
    refusal,
    saelens_family,
)
from steerserve.registry.sae import SAEWeights
from steerserve.types.sites import Hook, Site

_BATCHTOPK = (Family.BATCHTOPK, Family.MATRYOSHKA_BATCHTOPK)


def cfg_get(cfg: dict, key: str, default: object = None) -> object:
    """A key from the top level (v5) or from `metadata` (v6)."""
    if key in cfg:
        return cfg[key]
    meta = cfg.get("metadata")
    return meta.get(key, default) if isinstance(meta, dict) else default


def _architecture(cfg: dict, where: str) -> tuple[Family, Target, int | None]:
    act = cfg_get(cfg, "activation_fn", cfg_get(cfg, "activation_fn_str", "relu"))
    kwargs = cfg.get("activation_fn_kwargs") or {}
    arch = cfg.get("architecture", "standard")
    if act == "topk" and arch == "standard":  # SAELens 5: a topk activation on the standard class
        arch = "topk"
    family, rule = saelens_family(arch, where)
    if family is Family.TOPK:
        k = cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
        return family, rule.target, as_int(k, "cfg.k", minimum=1)
    if act not in ("relu", None):
        raise InvalidInput(
            f"{where}: cfg.activation_fn {act!r} is not supported (relu or topk)", "cfg.activation_fn"
        )
    return family, rule.target, None


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
    if mode == "covariance_whitening":
        raise InvalidInput(
            "cfg.normalize_activations is 'covariance_whitening' and the whitening is not folded; fold it "
            "first (SAELens: sae.fold_activation_whitening(mean, M, M_inv), then save_model)",
            param="cfg.normalize_activations",
        )
    raise InvalidInput(
        f"cfg.normalize_activations {mode!r} rescales each input by its own norm and cannot be folded into "
        "the weights; only 'none' and 'expected_average_only_in' are supported",
        param="cfg.normalize_activations",
    )


def parse_site(cfg: dict, site: Site | None, where: str = Source.SAELENS.where) -> Site:
    """The cfg's hook as a site; a given site must agree with it (the file's hook wins no contest)."""
    if cfg_get(cfg, "hook_head_index", cfg_get(cfg, "hook_point_head_index")) is not None:
        raise InvalidInput("per-head SAEs (hook_head_index) are not supported", param="cfg.hook_head_index")
    hook = cfg_get(cfg, "hook_name", cfg_get(cfg, "hook_point"))
    if cfg.get("reshape_activations") == "hook_z" or (isinstance(hook, str) and hook.endswith("hook_z")):
        raise refusal(Family.HEAD_SAE, where, param="cfg.reshape_activations")
    in_file = None if hook is None else site_of(hook, "cfg.hook_name")
    the_site = agreed_site(site, in_file, "cfg.hook_name", where)
    if the_site is None:
        raise InvalidInput(
            "cfg has no hook_name (metadata.hook_name in SAELens 6); give a site", "cfg.hook_name"
        )
    return the_site


_MLP_INPUTS = (Hook.RESID_MID, Hook.MLP_IN, Hook.LN2_NORMALIZED, Hook.MLP_HOOK_IN)


def _transcoder_out(cfg: dict, read: Site, d_in: int, where: str) -> Site:
    """A transcoder's write site: the MLP output of the layer whose MLP input it reads, same width."""
    out = cfg_get(cfg, "hook_name_out")
    if out is None:
        raise InvalidInput(
            f"{where}: a transcoder needs metadata.hook_name_out (where it writes: blocks.L.hook_mlp_out)",
            param="cfg.hook_name_out",
        )
    site_out = site_of(out, "cfg.hook_name_out")
    if read.hook not in _MLP_INPUTS or site_out != Site(read.layer, Hook.MLP_OUT):
        raise InvalidInput(
            f"{where}: a transcoder must read an MLP's input (blocks.L.hook_resid_mid, blocks.L.hook_mlp_in, "
            f"blocks.L.ln2.hook_normalized or blocks.L.mlp.hook_in) and write that MLP's output (blocks.L.hook_mlp_out), got "
            f"{read.hook_name} -> {site_out.hook_name}; other pairs are not supported",
            param="cfg.hook_name_out",
        )
    d_out = as_int(cfg.get("d_out", d_in), "cfg.d_out", 1)
    if d_out != d_in:
        raise InvalidInput(f"{where}: cfg.d_out {d_out} must equal cfg.d_in {d_in}", param="cfg.d_out")
    if cfg.get("apply_b_dec_to_input"):  # SAELens' TranscoderConfig refuses it too
        raise InvalidInput(
            f"{where}: apply_b_dec_to_input is not supported for transcoders (b_dec is the output's bias)",
            param="cfg.apply_b_dec_to_input",
        )
    if cfg.get("normalize_activations") not in (None, False, "none"):
        # NOTE: SAELens' Transcoder normalizes its input but never un-normalizes its output
        raise InvalidInput(
            f"{where}: a transcoder with cfg.normalize_activations "
            f"{cfg.get('normalize_activations')!r} is not supported; fold the input scaling into W_enc "
            "and save it with normalize_activations 'none'",
            param="cfg.normalize_activations",
        )
    return site_out


def from_state(
    cfg: dict, tensors: dict[str, torch.Tensor], site: Site | None = None, fmt: Source = Source.SAELENS
) -> LoadedSAE:
    """SAEWeights from a SAELens config dict and its state dict (tensors by SAELens names)."""
    where = fmt.where
    if not isinstance(cfg, dict):
        raise InvalidInput("cfg.json must hold a JSON object", param="cfg")
    family, target, k = _architecture(cfg, where)
    the_site = parse_site(cfg, site, where)
    d_in, d_sae = as_int(cfg.get("d_in"), "cfg.d_in", 1), as_int(cfg.get("d_sae"), "cfg.d_sae", 1)
    site_out = _transcoder_out(cfg, the_site, d_in, where) if family in TRANSCODERS else None
    apply_b_dec = cfg.get("apply_b_dec_to_input", site_out is None)
    if not isinstance(apply_b_dec, bool):
        raise InvalidInput(
            f"cfg.apply_b_dec_to_input must be a boolean, got {apply_b_dec!r}",
            param="cfg.apply_b_dec_to_input",
        )
    if cfg.get("normalize_decoder"):
        raise InvalidInput(
            "cfg.normalize_decoder=true is not supported; fold the decoder norms",
            param="cfg.normalize_decoder",
        )
    factor = _norm_factor(cfg)

    t = dict(tensors)
    if "log_threshold" in t:  # JumpReLU training checkpoints store log(threshold)
        t["threshold"] = torch.exp(t.pop("log_threshold").double())
    enc_bias = ("b_gate", "r_mag", "b_mag") if family is Family.GATED else ("b_enc",)
    extra = {"threshold"} if family in (Family.JUMPRELU, Family.JUMPRELU_TRANSCODER) else set()
    extra |= {"threshold", "W_skip"} if family is Family.JUMPRELU_SKIP_TRANSCODER else set()
    extra |= {"W_skip"} if family is Family.SKIP_TRANSCODER else set()
    if family in _BATCHTOPK:
        if "topk_threshold" not in t:
            raise InvalidInput(
                f"{where} ({family.value}): this training checkpoint has no topk_threshold; convert it to "
                "its inference form (a jumprelu SAE) with SAELens: "
                "BatchTopKTrainingSAE.load_from_disk(folder).save_inference_model(out), then upload out/",
                param="weights",
            )
        threshold = t.pop("topk_threshold")
        if threshold.numel() != 1:
            raise InvalidInput(f"{where}: topk_threshold must be a scalar", param="weights")
    allowed = {"W_enc", "W_dec", "b_dec", *enc_bias} | extra
    allowed |= set() if site_out is not None else {"scaling_factor"}  # Transcoder.decode ignores it
    reject_unknown(t, allowed, where)
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    shapes.update({name: (d_sae,) for name in (*enc_bias, "scaling_factor", "threshold")})
    shapes["W_skip"] = (d_in, d_in)  # [d_out, d_in], d_out == d_in
    for name in allowed - {"scaling_factor"}:
        got = tuple(require(t, name, where).shape)
        if got != shapes[name]:
            raise InvalidInput(
                f"{where}: {name} has shape {list(got)}, expected {list(shapes[name])} for d_in={d_in}, "
                f"d_sae={d_sae}",
                param="weights",
            )
    dtype = storage_dtype(t["W_enc"])
    w = {name: v.double() for name, v in t.items()}  # fold in float64, store in the file's dtype (below)
    folded: list[str] = []
    if family in SKIP_TRANSCODERS:
        del w["W_skip"]  # NOTE: cancels in every edit (registry/sae.py); nothing here reconstructs
        folded.append("W_skip dropped")

    if "scaling_factor" in w:
        s = w.pop("scaling_factor")
        if tuple(s.shape) != (d_sae,):
            raise InvalidInput(f"{where}: scaling_factor must have shape [{d_sae}]", param="weights")
        if not torch.allclose(s, torch.ones_like(s)):
            if not cfg.get("finetuning_scaling_factor"):
                raise InvalidInput(
                    "scaling_factor is present but cfg.finetuning_scaling_factor is false", "cfg"
                )
            w["W_dec"] = w["W_dec"] * s[:, None]
            folded.append("finetuning_scaling_factor")
    if family is Family.GATED:
        # NOTE: gated == jumprelu exactly: with m = z*e^r + b_mag (z = sae_in @ W_enc), the gate
        # z + b_gate > 0  <=>  m > b_mag - b_gate*e^r, so acts = relu(m) * (m > threshold).
        scale = torch.exp(w.pop("r_mag"))
        b_gate, b_mag = w.pop("b_gate"), w.pop("b_mag")
        w["W_enc"], w["b_enc"], w["threshold"] = w["W_enc"] * scale, b_mag, b_mag - b_gate * scale
        folded.append("gated->jumprelu")
    # NOTE: the factor first, as SAELens does (fold_activation_norm_scaling_factor on the loaded SAE, or
    # before save_inference_model): with rescale_acts_by_decoder_norm the activations then come out in
    # units of |W_dec / factor|, exactly like the library's encode().
    if factor is not None:
        w["W_enc"], w["W_dec"], w["b_dec"] = w["W_enc"] * factor, w["W_dec"] / factor, w["b_dec"] / factor
        folded.append(f"norm_scaling_factor={factor}")
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm"))
    if (family is Family.TOPK or family in _BATCHTOPK) and rescale:
        n = w["W_dec"].norm(dim=-1)  # [d_sae]
        w["W_enc"], w["b_enc"], w["W_dec"] = w["W_enc"] * n, w["b_enc"] * n, w["W_dec"] / n[:, None]
        folded.append("rescale_acts_by_decoder_norm")
    if family in _BATCHTOPK:
        # SAELens' inference form (process_state_dict_for_saving_inference): one threshold for every
        # feature; it is in units of the rescaled activations, which the factor fold divided by factor
        thr = float(threshold.double().reshape(())) / (factor if factor is not None and rescale else 1.0)
        w["threshold"] = torch.full((d_sae,), thr, dtype=torch.float64)
        folded.append(f"{family.value}->jumprelu")

    if folded and dtype in (torch.bfloat16, torch.float16):
        # folded weights are products: exact in float32 (as SAELens loads them), not in 16 bits
        dtype = torch.float32
    weights = SAEWeights(
        **{name: v.to(dtype).contiguous() for name, v in w.items()},
        architecture=target.value,
        k=k,
        apply_b_dec_to_input=apply_b_dec,
        site=the_site,
        site_out=site_out,
    )
    meta = {
        "format": fmt.value,
        "source_architecture": family.value,
        "hook_name": cfg_get(cfg, "hook_name", cfg_get(cfg, "hook_point")) or the_site.hook_name,
        "folded": folded,
    }
    if site_out is not None:
        meta["hook_name_out"] = site_out.hook_name
    for key in ("neuronpedia_id", "sae_lens_version", "sae_lens_training_version", "dataset_path"):
        if cfg_get(cfg, key) is not None:
            meta[key] = cfg_get(cfg, key)
    model_name = cfg_get(cfg, "model_name")
    return LoadedSAE(weights, model_name if isinstance(model_name, str) else None, meta)
