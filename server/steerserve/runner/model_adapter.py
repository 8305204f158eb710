"""The model adapter: what the server knows about a loaded transformers model's architecture. Its decoder
layers, each site's module and how a hook there reads and edits the hidden state, the final norm and the
unembedding, its sizes (ModelInfo, the KV cache's geometry, the longest context). The one place that knows
an architecture's layout; every module that needs a layer, a norm or the unembedding asks here.

A site's tensor is the one TransformerLens names (types/sites.py), checked against TransformerLens' own
TransformerBridge in tests/steering/test_site_semantics.py. Per family (`config.model_type`):

                 attn_out                  resid_mid / mlp_in /        mlp_out
                                           ln2_normalized / mlp_hook_in:
                                           the norm
  gpt2           attn (output)             ln_2                        mlp (output)
  llama-like     self_attn (output)        post_attention_layernorm    mlp (output)
  gemma2/3       post_attention_layernorm  pre_feedforward_layernorm   post_feedforward_layernorm

`resid_pre` / `resid_post` are the decoder layer's input / output in every architecture; the sites inside
a layer exist only for the families above (others get a 400 naming the sites they have).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from enum import Enum

import torch

from steerserve.runner.tensor_parallel import tp_world_size
from steerserve.types.model import ModelInfo
from steerserve.types.sites import RESID_HOOKS, Hook, Site

logger = logging.getLogger(__name__)


class Attach(Enum):
    """How a hook at a module reaches the site's tensor."""

    OUTPUT = "output"  # forward hook: the module's output (a tuple's first element), edited in place
    INPUT = "input"  # forward pre-hook: the module's input, edited in place (it is the residual itself)
    BRANCH_INPUT = "branch_input"  # forward pre-hook: a copy of the input, edited, given to this module only
    NORMALIZED = "normalized"  # forward hook on a norm: its normalized input; edits reach the output x weight


class NormKind(Enum):
    LAYER = "layer"  # (x - mean) / std * w + b
    RMS = "rms"  # x / rms * w
    RMS_OFFSET = "rms_offset"  # x / rms * (1 + w): Gemma's norms store the weight as an offset from 1


@dataclass(frozen=True)
class _Family:
    attn_out: str  # the layer's submodule whose output is what attention adds to the residual
    ln2: str  # the pre-MLP norm: its input is resid_mid, its output what the MLP reads
    mlp_out: str  # the submodule whose output is what the MLP adds
    norm: NormKind


_GPT2 = _Family("attn", "ln_2", "mlp", NormKind.LAYER)
_LLAMA = _Family("self_attn", "post_attention_layernorm", "mlp", NormKind.RMS)
_GEMMA = _Family("self_attn", "post_attention_layernorm", "mlp", NormKind.RMS_OFFSET)
_GEMMA2 = _Family(
    "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm", NormKind.RMS_OFFSET
)
# NOTE: only layouts read in transformers' modeling code (decoder layer forward) belong here
FAMILIES: dict[str, _Family] = {
    "gpt2": _GPT2,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _GEMMA,
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
}


@dataclass(frozen=True)
class SitePoint:
    """Where a site's hook goes: `module`, attached as `attach` (NORMALIZED: `norm` says how)."""

    module: torch.nn.Module
    attach: Attach
    norm: NormOps | None = None


class NormOps:
    """A norm's normalization and the weight through which an edit of its normalized value reaches its
    output (TransformerLens' `hook_normalized`: after centring and scaling, before weight and bias)."""

    def __init__(self, module: torch.nn.Module, kind: NormKind):
        self.module, self.kind = module, kind
        eps = getattr(module, "eps", None)
        self.eps = float(eps if eps is not None else module.variance_epsilon)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d] -> normalized [..., d] in float32."""
        x = x.float()
        if self.kind is NormKind.LAYER:
            return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=self.eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def gain(self) -> torch.Tensor:
        """[d] float32: d(output) / d(normalized)."""
        w = self.module.weight.float()
        return 1.0 + w if self.kind is NormKind.RMS_OFFSET else w

    def output(self, normalized: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.module, "bias", None)
        out = normalized * self.gain()
        return out + bias.float() if bias is not None else out

    def matches(self, d: int) -> bool:
        """Whether `output(normalize(x))` is the module's own output (a probe), so a wrong kind is never used."""
        p = next(self.module.parameters())
        # NOTE: a mean far from 0, so that centring (LayerNorm) or not (RMSNorm) shows at any d
        x = (torch.randn(3, d, generator=torch.Generator().manual_seed(0)) * 3 + 2).to(p.device, p.dtype)
        with torch.inference_mode():
            want = type(self.module).forward(self.module, x).float()  # NOTE: the class's forward, no hooks
            got = self.output(self.normalize(x))
        return bool(torch.allclose(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max())))


class ModelAdapter:
    """The layout of one loaded model. Build with `model_adapter(model)` (one instance per model)."""

    def __init__(self, model: torch.nn.Module):
        # NOTE: no reference to `model` itself: the per-model cache is keyed weakly by it
        self.base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        self._unembedding = model.get_output_embeddings()
        self._name = type(model).__name__
        self._config = model.config
        self.layers = _find_layers(self.base, model)
        self.d_model = int(model.config.get_text_config().hidden_size)
        self.model_type = str(model.config.get_text_config().model_type)
        self.family = FAMILIES.get(self.model_type)
        if self.family is not None and not all(
            isinstance(getattr(layer, name, None), torch.nn.Module)
            for layer in self.layers
            for name in (self.family.attn_out, self.family.ln2, self.family.mlp_out)
        ):
            logger.warning(
                "%s: decoder layers lack the modules of its family; resid sites only", self.model_type
            )
            self.family = None
        self._norms: list[NormOps] = []
        if self.family is not None:
            self._norms = [
                NormOps(getattr(layer, self.family.ln2), self.family.norm) for layer in self.layers
            ]
            if not all(n.matches(self.d_model) for n in self._norms):
                logger.warning(
                    "%s: pre-MLP norms do not compute as expected; no ln2.hook_normalized", self.model_type
                )
                self._norms = []
        inside = () if self.family is None else tuple(h for h in Hook if h not in RESID_HOOKS)
        if not self._norms:
            inside = tuple(h for h in inside if h is not Hook.LN2_NORMALIZED)
        self.hooks: tuple[str, ...] = tuple(h.value for h in Hook if h in RESID_HOOKS or h in inside)
        # Gemma-2/3: what the MLP adds to the residual is the output of post_feedforward_layernorm
        self.mlp_out_after_norm = self.family is not None and self.family.mlp_out != "mlp"

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def info(self, tokenizer, name: str, max_model_len: int) -> ModelInfo:
        """What the rest of the server may know of the model (plain data)."""
        eos = self._config.eos_token_id if self._config.eos_token_id is not None else tokenizer.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return ModelInfo(
            name=name,
            architecture=self._name,
            d_model=self.d_model,
            n_layers=self.n_layers,
            vocab_size=self.vocab_size,
            max_model_len=max_model_len,
            eos_token_ids=eos_ids,
            bos_token_id=tokenizer.bos_token_id,
            has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
            hooks=self.hooks,
            mlp_out_after_norm=self.mlp_out_after_norm,
        )

    @property
    def max_positions(self) -> int:
        """The longest context the model was built for (2048 when its config does not say)."""
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(self._config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    def kv_geometry(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head dim) of its attention: the KV cache's shape. Under tensor
        parallelism the heads are this rank's (runner/tensor_parallel.py splits them evenly)."""
        cfg = self._config
        n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cfg.num_hidden_layers, n_kv // tp_world_size(self.base), head_dim

    def final_norm(self) -> torch.nn.Module:
        for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
            module = getattr(self.base, name, None)
            if isinstance(module, torch.nn.Module):
                return module
        raise ValueError(f"cannot find the final norm of {self._name}")

    def unembedding(self) -> torch.nn.Module:
        return self._unembedding

    def normed(self, directions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`N(x) - N(0)` of [n, d] directions computed in `dtype`: a direction as the final norm passes
        it on when it dominates the residual (the norm's bias cancels)."""
        norm = self.final_norm()
        x = directions.to(dtype)
        return norm(x) - norm(torch.zeros_like(x[:1]))

    def direct_logits(self, directions: torch.Tensor) -> torch.Tensor:
        """[n, d] directions -> [n, V] float32 logits they write through the final norm and the
        unembedding, without biases: `U(N(x) - N(0))` with U = `lm_head(.) - lm_head(0)`."""
        head = self.unembedding()
        x = self.normed(directions, head.weight.dtype)
        zero = torch.zeros_like(x[:1])
        out = head(torch.cat([x, zero]))  # NOTE: one pass over the unembedding
        return (out[:-1] - out[-1:]).float()

    @property
    def vocab_size(self) -> int:
        return self.unembedding().weight.shape[0]

    def point(self, site: Site) -> SitePoint:
        site.check(self.n_layers, self.hooks)
        layer = self.layers[site.layer]
        if site.hook is Hook.RESID_PRE:
            return SitePoint(layer, Attach.INPUT)
        if site.hook is Hook.RESID_POST:
            return SitePoint(layer, Attach.OUTPUT)
        fam = self.family
        assert fam is not None  # site.check refused sites inside a layer of an unmapped architecture
        ln2 = getattr(layer, fam.ln2)
        return {
            Hook.ATTN_OUT: lambda: SitePoint(getattr(layer, fam.attn_out), Attach.OUTPUT),
            Hook.RESID_MID: lambda: SitePoint(ln2, Attach.INPUT),
            Hook.MLP_IN: lambda: SitePoint(ln2, Attach.BRANCH_INPUT),
            Hook.LN2_NORMALIZED: lambda: SitePoint(ln2, Attach.NORMALIZED, self._norms[site.layer]),
            # NOTE: the norm's output is read by the MLP only (every family above), so editing it in place
            # reaches the MLP and nothing else; its hook runs after ln2_normalized's on the same norm
            Hook.MLP_HOOK_IN: lambda: SitePoint(ln2, Attach.OUTPUT),
            Hook.MLP_OUT: lambda: SitePoint(getattr(layer, fam.mlp_out), Attach.OUTPUT),
        }[site.hook]()


def _find_layers(base: torch.nn.Module, model: torch.nn.Module) -> torch.nn.ModuleList:
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, ModelAdapter] = weakref.WeakKeyDictionary()


def model_adapter(model: torch.nn.Module) -> ModelAdapter:
    """The model's layout, built once per model object."""
    sites = _CACHE.get(model)
    if sites is None:
        sites = _CACHE[model] = ModelAdapter(model)
    return sites


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder layers (model.model.layers, transformer.h, ...)."""
    return model_adapter(model).layers
