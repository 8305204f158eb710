"""SAEs built, saved and read back by the real libraries (sae-lens, eai-sparsify), and the libraries'
own encode / decode / encode-edit-decode-plus-error, which the parity tests compare ours with.

Every SAE reads the demo model's `blocks.1.hook_resid_post` (d_in 128). Random weights are scaled so
that on the demo model's hidden states (norms 15-50) some features fire and some do not, jumprelu
thresholds have both signs, and TopK decoder rows have norms far from 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from steerserve.registry import SAEWeights
from steerserve.registry.formats import load_sae_path

D_IN, D_SAE = 128, 64
HOOK = "blocks.1.hook_resid_post"
# name -> (sae-lens architecture, config extras); "batchtopk" is saved in its inference form (jumprelu)
SAELENS = {
    "standard": ("standard", {}),
    "standard-no-b_dec": ("standard", {"apply_b_dec_to_input": False}),
    "jumprelu-negative": ("jumprelu", {}),
    "gated": ("gated", {}),
    "topk-4": ("topk", {"k": 4}),
    "topk-24": ("topk", {"k": 24}),
    "topk-24-rescaled": ("topk", {"k": 24, "rescale_acts_by_decoder_norm": True}),
    "batchtopk": ("batchtopk", {"k": 8}),
}
# how each parameter is drawn: N(0, 1) times this (W_enc: / sqrt(d_in))
SCALES = {"W_enc": D_IN**-0.5, "b_enc": 0.5, "W_dec": 0.3, "b_dec": 0.3, "threshold": 1.5,
          "b_gate": 1.0, "r_mag": 0.3, "b_mag": 1.0}  # fmt: skip


@dataclass
class Pair:
    """One SAE as the library runs it and as our loader reads the same folder."""

    name: str
    lib: object  # the library's module (sae_lens.SAE or sparsify.SparseCoder)
    ours: SAEWeights
    folder: Path

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[T, d_sae] the library's encode(), dense."""
        with torch.no_grad():
            if self.name.startswith("sparsify"):
                out = self.lib.encode(x)
                return torch.zeros(x.shape[0], self.ours.d_sae).scatter(1, out.top_indices, out.top_acts)
            return self.lib.encode(x)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """[T, d_in] the library's decode() of dense activations."""
        with torch.no_grad():
            if self.name.startswith("sparsify"):
                # NOTE: SparseCoder.decode with sparsify's own eager decoder: its Triton one would run in
                # the interpreter here (TRITON_INTERPRET=1), ~100x slower, for the same sums
                from sparsify.utils import eager_decode

                idx = torch.arange(acts.shape[1]).expand_as(acts).contiguous()
                return eager_decode(idx, acts.to(self.lib.dtype), self.lib.W_dec.mT) + self.lib.b_dec
            return self.lib.decode(acts)

    def edit(self, x: torch.Tensor, feats: torch.Tensor, mode: str, values: torch.Tensor) -> torch.Tensor:
        """A hook doing the library's own encode -> set/scale the features -> decode + its error.
        feats, values [T, F] (distinct features per token); mode clamp | scale | ablate."""
        acts = self.encode(x)
        error = x - self.decode(acts)
        old = acts.gather(1, feats)
        new = old * values if mode == "scale" else values
        return self.decode(acts.scatter(1, feats, new)) + error


def _randomize(module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * SCALES[name])


def saelens_pair(name: str, folder: Path, seed: int, **overrides) -> Pair:
    """Build the SAE `name` (config `overrides`, e.g. k=8) with sae-lens, save it as sae-lens saves
    (save_model, or save_inference_model for a training architecture), and load it back with both."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    arch, extra = SAELENS[name]
    extra = {**extra, **overrides}
    gen = torch.Generator().manual_seed(seed)
    meta = SAEMetadata(hook_name=HOOK, model_name="demo")
    if arch == "batchtopk":
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta, **extra))
        _randomize(sae, gen)
        sae.topk_threshold = torch.tensor(1.0, dtype=torch.float64)  # what training would have learnt
        sae.save_inference_model(folder)
    else:
        from sae_lens.registry import get_sae_class

        sae_cls, cfg_cls = get_sae_class(arch)  # the classes sae-lens registers for the architecture
        sae = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=meta, **extra))
        _randomize(sae, gen)
        sae.save_model(folder)
    lib = sae_lens.SAE.load_from_disk(folder)
    return Pair(name, lib, load_sae_path(folder).weights, folder)


def demo_pair() -> Pair:
    """The shipped demo SAE (a trained SAELens standard SAE, 1,024 features), read by both."""
    import sae_lens

    from steerserve.demo.shipped import BUNDLE_DIR

    folder = BUNDLE_DIR / "sae"
    return Pair("demo", sae_lens.SAE.load_from_disk(folder), load_sae_path(folder).weights, folder)


def sparsify_pair(folder: Path, seed: int, k: int = 6) -> Pair:
    """A sparsify SparseCoder (TopK) saved with save_to_disk into a `layers.1` folder."""
    from sparsify import SparseCoder, SparseCoderConfig

    gen = torch.Generator().manual_seed(seed)
    coder = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=k))
    with torch.no_grad():
        coder.encoder.weight.copy_(torch.randn(D_SAE, D_IN, generator=gen) * SCALES["W_enc"])
        coder.encoder.bias.copy_(torch.randn(D_SAE, generator=gen) * SCALES["b_enc"])
        coder.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=gen) * SCALES["W_dec"])
        coder.b_dec.copy_(torch.randn(D_IN, generator=gen) * SCALES["b_dec"])
    path = folder / "layers.1"
    coder.save_to_disk(path)
    return Pair("sparsify", SparseCoder.load_from_disk(path), load_sae_path(path).weights, path)
