"""Tensor parallelism by weight sharding: every rank loads the full transformers model, then `shard_model`
slices its weights in place to this rank's share (plain tensors, not transformers' DTensor path) and
installs the all-reduces, so the model's own `model(...)` forward on a replicated input gives every rank
the full hidden states and logits.

The plan is transformers' own `config.base_model_tp_plan` (keys relative to the base model, `*` a layer
number). colwise: this rank's output rows of `weight [out, in]` (and bias); rowwise: this rank's input
columns, its output all-reduced (SUM) by a forward hook. Embeddings, norms and lm_head stay replicated
(every rank computes the full logits). Attention is split by whole heads: a contiguous block of rows of
q is a block of query heads, of k/v a block of key/value heads, and with H/W query and K/W kv heads per
rank, query head i's kv head i // (H/K) falls in the same rank's block.

Checked in transformers 5.25's modeling code (`*Attention.forward`): llama, mistral, qwen2, qwen3, gemma,
gemma2 and gemma3_text reshape q/k/v with `(*input_shape, -1, self.head_dim)` and the attention output
with `reshape(*input_shape, -1)`; `num_key_value_groups` (H/K) is the same ratio for the local heads, and
qwen3/gemma3's q_norm/k_norm act per head over head_dim. So local heads flow through unchanged. Other
architectures are refused until someone reads theirs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

import torch
import torch.distributed as dist

# model_type values whose attention was read as described above
CHECKED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
_ATTR = "_steerserve_tp"  # where the sharding is recorded on the model and its base model


class Style(Enum):
    COLWISE = "colwise"  # keep this rank's output rows
    ROWWISE = "rowwise"  # keep this rank's input columns; all-reduce the output
    REPLICATED = "replicated"  # untouched: the forward needs no collective


# transformers' style names -> what they mean for an inference forward on plain tensors. Every other style
# (packed, embedding, gather, sequence, MoE ...) is refused rather than guessed at.
_STYLES = {
    "colwise": Style.COLWISE,
    "local_colwise": Style.COLWISE,
    "rowwise": Style.ROWWISE,
    "local_rowwise": Style.ROWWISE,
    # transformers: "the forward needs no collective" (only gradients are summed), e.g. qwen3's q_norm
    "replicated_with_grad_allreduce": Style.REPLICATED,
    "replicate": Style.REPLICATED,
}


@dataclass(frozen=True)
class Sharding:
    rank: int
    world: int


def tp_world_size(model: torch.nn.Module) -> int:
    """How many ranks share the model's weights (1 when unsharded)."""
    sharding = getattr(model, _ATTR, None)
    return sharding.world if sharding is not None else 1


def tp_rank(model: torch.nn.Module) -> int:
    """This process's rank among them (0 when unsharded)."""
    sharding = getattr(model, _ATTR, None)
    return sharding.rank if sharding is not None else 0


def shard_rows(w: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous block of dim 0, as a new tensor (the full one can be freed)."""
    return _block(w, 0, rank, world)


def shard_cols(w: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous block of dim 1, as a new contiguous tensor."""
    return _block(w, 1, rank, world)


def _block(w: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    size = w.shape[dim]
    if size % world:
        raise ValueError(f"dimension {dim} of size {size} does not divide by {world} ranks")
    n = size // world
    return w.narrow(dim, rank * n, n).clone(memory_format=torch.contiguous_format)


def tp_plan(model: torch.nn.Module, world: int) -> dict[str, Style]:
    """{module name in the base model: style} for the sharded modules, after checking that the model can be
    split over `world` ranks (ValueError naming why not). Pure: reads the model, changes nothing."""
    cfg = model.config.get_text_config()
    arch = str(cfg.model_type)
    supported = f"tensor parallelism supports {', '.join(CHECKED_ARCHITECTURES)}"
    plan = getattr(cfg, "base_model_tp_plan", None)
    if not plan:
        raise ValueError(f"{supported}; {arch} has no tensor-parallel plan")
    if arch not in CHECKED_ARCHITECTURES:
        raise ValueError(f"{supported}; {arch}'s attention with local heads is not checked")
    unknown = sorted({s for s in plan.values() if s not in _STYLES})
    if unknown:
        raise ValueError(f"{supported}; {arch}'s plan has styles {unknown} it does not implement")
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    inter = cfg.intermediate_size
    if heads % world or kv_heads % world or inter % world:
        raise ValueError(
            f"{arch}: {heads} attention heads, {kv_heads} key/value heads and intermediate size {inter} "
            f"must all divide by the tensor-parallel world size {world}"
        )
    patterns = [(re.compile(re.escape(k).replace(r"\*", r"\d+") + "$"), _STYLES[s]) for k, s in plan.items()]
    out: dict[str, Style] = {}
    for name, module in model.base_model.named_modules():
        style = next((s for p, s in patterns if p.match(name)), None)
        if style is None or style is Style.REPLICATED:
            continue
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(f"{supported}; {arch}'s {name} is a {type(module).__name__}, not a Linear")
        out[name] = style
    if not out:
        raise ValueError(f"{supported}; {arch}'s plan matches none of its modules")
    return out


def shard_model(model: torch.nn.Module, group: dist.ProcessGroup | None = None) -> torch.nn.Module:
    """Slices `model`'s weights in place to this rank's share of `group` (None: the default group) and
    installs the all-reduces; returns the model. Every rank must hold the same full weights."""
    if getattr(model, _ATTR, None) is not None:
        raise ValueError("the model is already sharded")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    plan = tp_plan(model, world)  # NOTE: every check before the first weight changes
    if world > 1:
        modules = dict(model.base_model.named_modules())
        for name, style in plan.items():
            _shard_linear(modules[name], style, rank, world, group)
    sharding = Sharding(rank, world)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    for m in (model, model.base_model, decoder):  # NOTE: the model adapter holds the decoder, not the model
        setattr(m, _ATTR, sharding)
    return model


def _shard_linear(
    linear: torch.nn.Linear, style: Style, rank: int, world: int, group: dist.ProcessGroup | None
) -> None:
    w, b = linear.weight, linear.bias
    if style is Style.COLWISE:
        linear.weight = torch.nn.Parameter(shard_rows(w.data, rank, world), requires_grad=w.requires_grad)
        if b is not None:
            linear.bias = torch.nn.Parameter(shard_rows(b.data, rank, world), requires_grad=b.requires_grad)
        linear.out_features = linear.weight.shape[0]
        return
    linear.weight = torch.nn.Parameter(shard_cols(w.data, rank, world), requires_grad=w.requires_grad)
    linear.in_features = linear.weight.shape[1]
    if b is not None and rank != 0:
        # NOTE: the all-reduced sum adds the bias once, from rank 0
        linear.bias = torch.nn.Parameter(torch.zeros_like(b.data), requires_grad=b.requires_grad)

    def all_reduce(module, args, output):
        dist.all_reduce(output, op=dist.ReduceOp.SUM, group=group)
        return output

    # NOTE: prepend: before every other hook on the module (steering hooks must see the full sum)
    linear.register_forward_hook(all_reduce, prepend=True)
