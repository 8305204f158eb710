"""Steering fixtures: an engine over a tiny model, with seeded random SAEs and vectors in its registry."""

from __future__ import annotations

import pytest
import torch

import steerkernels.cpu
from steerserve.config import SteeringConfig
from steerserve.registry import FeatureInfo, SAEWeights, SteeringVector
from steerserve.steering.compile import compile_steering
from steerserve.types.sites import Site
from tests.engine.helpers import tiny_engine

D_SAE = 48


def random_sae(d: int, site: Site, seed: int, jumprelu: bool = False) -> SAEWeights:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(D_SAE, d, generator=g) * 0.5
    return SAEWeights(
        W_enc=torch.randn(d, D_SAE, generator=g) * 0.3,
        b_enc=torch.randn(D_SAE, generator=g) * 0.1,
        W_dec=W_dec,
        b_dec=torch.randn(d, generator=g) * 0.1,
        architecture="jumprelu" if jumprelu else "relu",
        site=site,
        apply_b_dec_to_input=jumprelu,
        threshold=torch.rand(D_SAE, generator=g) * 0.2 if jumprelu else None,
    )


def sae_dict(w: SAEWeights) -> dict:
    """The SAE as tests/steering/reference.py takes it."""
    return {
        "W_enc": w.W_enc,
        "b_enc": w.b_enc,
        "W_dec": w.W_dec,
        "b_dec": w.b_dec,
        "threshold": w.threshold,
        "apply_b_dec_to_input": w.apply_b_dec_to_input,
    }


def tied_sae(d: int, site: Site, seed: int) -> SAEWeights:
    """Feature 5 reads exactly what it writes (W_enc[:, 5] . W_dec[5] = 1) and is always active, as in
    a well-trained SAE's live feature: clamping it sets its re-measured activation exactly."""
    w = random_sae(d, site, seed)
    W_enc, b_enc = w.W_enc.clone(), w.b_enc.clone()
    W_enc[:, 5] = w.W_dec[5] / w.W_dec[5].pow(2).sum()
    b_enc[5] = 50.0
    return SAEWeights(W_enc, b_enc, w.W_dec, w.b_dec, "relu", site)


class SteeringWorld:
    """An engine plus the SAEs/vectors it can steer with, and the same tensors for the reference."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.built = tiny_engine(model_dir, max_num_seqs=16, steering=SteeringConfig(max_steering_rows=8))
        info = self.built.info
        reg = self.built.registry
        d = info.d_model
        self.saes = {
            "post0": random_sae(d, Site(0, "resid_post"), 1),
            "pre1": random_sae(d, Site(1, "resid_pre"), 2, jumprelu=True),
            "tied": tied_sae(d, Site(1, "resid_pre"), 4),
        }
        for sae_id, w in self.saes.items():
            reg.add_sae(w, sae_id=sae_id, model=info.name, fit=info)
        reg.put_features(
            "post0", [FeatureInfo(index=3, max_activation=2.5), FeatureInfo(index=2, mean_activation=1.5)]
        )
        g = torch.Generator().manual_seed(3)
        self.vectors = {"v1": torch.randn(d, generator=g), "v0": torch.randn(d, generator=g)}
        reg.add_vector(
            SteeringVector.of({Site(1, "resid_post"): self.vectors["v1"]}), vector_id="v1", model=info.name
        )
        reg.add_vector(
            SteeringVector.of({Site(0, "resid_post"): self.vectors["v0"]}), vector_id="v0", model=info.name
        )

    def spec(self, steering=None, feature_logit_bias=None, variant=None, stop_when=None):
        b = self.built
        return compile_steering(
            b.registry, b.info, b.core.runner.steering.cfg, steering, feature_logit_bias, variant, stop_when
        )

    def sae_dict(self, sae_id: str) -> dict:
        return sae_dict(self.saes[sae_id])


@pytest.fixture(
    scope="module",
    params=[("gpt2", "cpu"), ("llama", "cpu"), ("gpt2", "torch"), ("llama", "torch")],
    ids=lambda p: "-".join(p),
)
def world(request, tiny_model_dir):
    """The engine on each tiny model, with the steering ops on the C++ CPU backend and on the torch
    reference (STEERKERNELS_BACKEND: a bare pytest run of the kernel tests sets TRITON_INTERPRET, which
    would otherwise pick interpreted Triton)."""
    arch, backend = request.param
    if backend == "cpu" and not steerkernels.cpu.available():
        pytest.skip("the C++ CPU backend cannot be built here")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEERKERNELS_BACKEND", backend)
        yield SteeringWorld(tiny_model_dir(arch))
