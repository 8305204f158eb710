"""Which SAE families steerserve takes, and how each maps onto its three architectures: one table.

The keys are SAELens' `cfg.architecture` values (every class `sae_lens/__init__.py` registers, for
inference or training) and the file layouts of the releases whose SAELens loader we reproduce
(`RELEASE_LOADERS` says which family each of SAELens' release loaders produces).
steerserve computes `relu`, `jumprelu` (`relu(pre) * (pre > threshold)`) and `topk`; a family is
either mapped onto one of them EXACTLY (the encode() of the mapped SAE equals the library's), or
refused with a 400 that says why and what to run instead. Nothing is treated as what it is not.
SAELens transcoders map onto relu / jumprelu plus a write site (registry/sae.py `site_out`), as do
Gemma Scope 2's (raw config with hf_hook_point_out: jumprelu) and sparsify's (transcode: topk); the other
raw transcoder layouts (Gemma Scope 1, Llama Scope, CLTs) are refused with the SAELens conversion to run.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from steerserve.registry.errors import InvalidInput


class Target(Enum):
    """steerserve's architectures (SAEWeights.architecture takes the value)."""

    RELU = "relu"
    JUMPRELU = "jumprelu"
    TOPK = "topk"


class Family(Enum):
    # SAELens architectures (cfg.architecture)
    STANDARD = "standard"
    GATED = "gated"
    JUMPRELU = "jumprelu"
    TOPK = "topk"
    ABSTOPK = "abstopk"
    BATCHTOPK = "batchtopk"  # training-only class; inference form is jumprelu
    MATRYOSHKA_BATCHTOPK = "matryoshka_batchtopk"  # training-only class; inference form is jumprelu
    TRANSCODER = "transcoder"
    SKIP_TRANSCODER = "skip_transcoder"
    JUMPRELU_TRANSCODER = "jumprelu_transcoder"
    JUMPRELU_SKIP_TRANSCODER = "jumprelu_skip_transcoder"
    TEMPORAL = "temporal"
    MATCHING_PURSUIT = "matching_pursuit"
    # release layouts read by their own SAELens loaders (not cfg.architecture values)
    GEMMA_SCOPE = "gemma_scope"  # params.npz (SAELens loader gemma_2)
    GEMMA_SCOPE_2 = "gemma_scope_2"  # params.safetensors, lowercase names (loader gemma_3)
    LLAMA_SCOPE = "llama_scope"  # hyperparams.json + checkpoints/final.safetensors (loader llama_scope)
    SPARSIFY_TOPK = "sparsify_topk"  # EleutherAI sparsify, activation topk
    SPARSIFY_GROUPMAX = "sparsify_groupmax"
    SPARSIFY_SIGNED = "sparsify_signed"
    PICKLED_RELEASE = "pickled_release"  # .pt / ae.pt checkpoints: never unpickled
    HEAD_SAE = "hook_z"  # per-head attention SAEs (attn.hook_z)
    SPARSIFY_TRANSCODER = "sparsify_transcoder"  # transcode and/or skip_connection
    GEMMA_SCOPE_TRANSCODER = "gemma_scope_transcoder"  # raw Gemma Scope (2) transcoder / CLT files
    LLAMA_SCOPE_TRANSCODER = "llama_scope_transcoder"  # raw Llama Scope "TC" files


@dataclass(frozen=True)
class Accept:
    target: Target
    how: str  # what the loader does to map it exactly (recorded in the SAE's meta)


@dataclass(frozen=True)
class Refuse:
    why: str  # what the family computes that we cannot
    todo: str  # what the user can do instead


_CONVERT = (
    "if SAELens can load it (SAE.from_pretrained / SAE.load_from_disk) as a standard, gated, jumprelu or "
    "topk SAE, save that with sae.save_model(folder) and upload its cfg.json + sae_weights.safetensors"
)
_TRANSCODER = Refuse(
    "this release's transcoders are not supported yet (SAELens transcoders are): its file layout is not "
    "read here",
    "load it with SAELens (SAE.from_pretrained), save it with sae.save_model(folder) and upload its "
    "cfg.json + sae_weights.safetensors",
)
# NOTE: a transcoder's edit is exact without W_skip (registry/sae.py: it cancels with the error)
_TC = "transcoder: reads hook_name (the MLP's input), writes hook_name_out (its output)"
_SKIP = "; W_skip not stored: it cancels in every edit"
_SIGNED = Refuse(
    "its activations are signed (top k by |pre-activation| with the sign kept, no ReLU), while relu, "
    "jumprelu and topk are never negative, so no exact mapping exists",
    "use a topk, jumprelu or relu SAE for this site",
)

TABLE: dict[Family, Accept | Refuse] = {
    Family.STANDARD: Accept(Target.RELU, "as is"),
    Family.GATED: Accept(Target.JUMPRELU, "gated->jumprelu (exact: threshold b_mag - b_gate*exp(r_mag))"),
    Family.JUMPRELU: Accept(Target.JUMPRELU, "as is (log_threshold -> threshold)"),
    Family.TOPK: Accept(Target.TOPK, "as is (rescale_acts_by_decoder_norm folded)"),
    Family.ABSTOPK: _SIGNED,
    Family.BATCHTOPK: Accept(
        Target.JUMPRELU,
        "batchtopk->jumprelu: SAELens' inference form (save_inference_model: decoder norms folded, "
        "threshold = topk_threshold for every feature)",
    ),
    Family.MATRYOSHKA_BATCHTOPK: Accept(
        Target.JUMPRELU,
        "matryoshka_batchtopk->jumprelu: SAELens' inference form (as batchtopk; the widths only shape "
        "the training loss)",
    ),
    Family.TRANSCODER: Accept(Target.RELU, _TC),
    Family.SKIP_TRANSCODER: Accept(Target.RELU, _TC + _SKIP),
    Family.JUMPRELU_TRANSCODER: Accept(Target.JUMPRELU, _TC),
    Family.JUMPRELU_SKIP_TRANSCODER: Accept(Target.JUMPRELU, _TC + _SKIP),
    Family.TEMPORAL: Refuse(
        "temporal SAEs encode each token with attention over the previous tokens' activations; there "
        "is no per-token linear encoder to map",
        "use a per-token SAE for this site",
    ),
    Family.MATCHING_PURSUIT: Refuse(
        "matching-pursuit SAEs select features by an iterative greedy residual loop, not one linear "
        "encoder and an activation",
        "use a topk or jumprelu SAE for this site",
    ),
    Family.GEMMA_SCOPE: Accept(Target.JUMPRELU, "Gemma Scope params.npz: b_dec is never subtracted"),
    Family.GEMMA_SCOPE_2: Accept(Target.JUMPRELU, "Gemma Scope 2 params.safetensors: lowercase names"),
    Family.LLAMA_SCOPE: Accept(
        Target.JUMPRELU,
        "Llama Scope: encoder/decoder transposed, scalar threshold * f, dataset-wise norm f = "
        "sqrt(d_model) / dataset_average_activation_norm.in folded into the weights",
    ),
    Family.SPARSIFY_TOPK: Accept(Target.TOPK, "sparsify: encoder.weight transposed"),
    Family.SPARSIFY_GROUPMAX: Refuse(
        "sparsify 'groupmax' keeps the largest activation of each of k groups, which is not a per-token "
        "top k over all features",
        "train with activation='topk'",
    ),
    Family.SPARSIFY_SIGNED: _SIGNED,
    Family.PICKLED_RELEASE: Refuse(
        "this release ships pickled checkpoints (.pt), which are never loaded", _CONVERT
    ),
    Family.HEAD_SAE: Refuse(
        "per-head SAEs read attn.hook_z, the heads' outputs before the output projection, which no site "
        "here exposes",
        "use an SAE trained on hook_attn_out or the residual stream",
    ),
    Family.SPARSIFY_TRANSCODER: Accept(
        Target.TOPK,
        "sparsify transcode: reads layers.N.mlp's input (blocks.N.mlp.hook_in), b_dec not subtracted, "
        "writes blocks.N.hook_mlp_out; a skip_connection's W_skip is not stored: it cancels in every edit",
    ),
    Family.GEMMA_SCOPE_TRANSCODER: _TRANSCODER,
    Family.LLAMA_SCOPE_TRANSCODER: _TRANSCODER,
}

# SAELens' release loaders (NAMED_PRETRAINED_SAE_LOADERS) -> the family of what they load. Only the
# layouts with a loader here are read from their raw files; the rest go through SAELens' own save_model.
RELEASE_LOADERS: dict[str, Family] = {
    "sae_lens": Family.STANDARD,  # cfg.json + sae_weights.safetensors: by cfg.architecture
    "gemma_2": Family.GEMMA_SCOPE,
    "gemma_3": Family.GEMMA_SCOPE_2,  # its transcoders / CLTs: JUMPRELU_(SKIP_)TRANSCODER
    "llama_scope": Family.LLAMA_SCOPE,
    "llama_scope_r1_distill": Family.LLAMA_SCOPE,  # needs cfg.norm_scaling_factor (release table)
    "sparsify": Family.SPARSIFY_TOPK,
    "connor_rob_hook_z": Family.HEAD_SAE,
    "dictionary_learning_1": Family.PICKLED_RELEASE,
    "deepseek_r1": Family.PICKLED_RELEASE,
    "qwen_scope": Family.PICKLED_RELEASE,
    "goodfire": Family.PICKLED_RELEASE,
    "gemma_2_transcoder": Family.GEMMA_SCOPE_TRANSCODER,
    "mwhanna_transcoder": Family.TRANSCODER,
    "mntss_clt_layer_transcoder": Family.TRANSCODER,
    "temporal": Family.TEMPORAL,
}

TRANSCODERS = (
    Family.TRANSCODER,
    Family.SKIP_TRANSCODER,
    Family.JUMPRELU_TRANSCODER,
    Family.JUMPRELU_SKIP_TRANSCODER,
)
SKIP_TRANSCODERS = (Family.SKIP_TRANSCODER, Family.JUMPRELU_SKIP_TRANSCODER)

SAELENS_ARCHITECTURES = tuple(f for f in Family if not f.name.startswith(("GEMMA_", "LLAMA_", "SPARSIFY_")))


def refusal(family: Family, where: str, param: str = "cfg.architecture") -> InvalidInput:
    rule = TABLE[family]
    assert isinstance(rule, Refuse), family
    return InvalidInput(f"{where} ({family.value}): {rule.why}; {rule.todo}", param=param)


def saelens_family(arch: object, where: str) -> tuple[Family, Accept]:
    """The family of a SAELens `cfg.architecture` and how it maps; a 400 for refused or unknown ones."""
    known = {f.value: f for f in SAELENS_ARCHITECTURES}
    family = known.get(arch) if isinstance(arch, str) else None
    if family is None:
        taken = ", ".join(f.value for f in SAELENS_ARCHITECTURES if isinstance(TABLE[f], Accept))
        raise InvalidInput(
            f"{where}: cfg.architecture {arch!r} is not a SAELens architecture steerserve knows (it "
            f"takes {taken}); {_CONVERT}",
            param="cfg.architecture",
        )
    rule = TABLE[family]
    if isinstance(rule, Refuse):
        raise refusal(family, where)
    return family, rule
