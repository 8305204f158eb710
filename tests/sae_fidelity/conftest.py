"""Fixtures of the SAE fidelity suite: the demo model's real hidden states at its SAE site, and Triton's
device (TRITON_INTERPRET=1 on a machine without a GPU, set by tests/conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
TEXTS = [
    "In Norway the weather is cold. The dog ran in the snow.",
    "A hot day in Spain: the red cat slept in the sun.",
]


def triton_device() -> str | None:
    """Where Triton runs here: CUDA tensors compiled, CPU tensors interpreted, or None (skip)."""
    if torch.cuda.is_available() and not INTERPRET:
        return "cuda"
    return "cpu" if INTERPRET else None


@pytest.fixture(scope="session")
def demo_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steerserve.demo.shipped import model_path

    path = model_path()
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), str(path)


def resid_post(model, ids: list[int], layer: int) -> torch.Tensor:
    """[n, d] fp32: the output of decoder layer `layer` (SAELens' blocks.L.hook_resid_post) for `ids`,
    read by a plain forward hook on the transformers model."""
    from tests.steering.reference import read_site  # NOTE: imports transformers: after TRITON_INTERPRET

    return read_site(model, ids, (layer, "resid_post"), lambda h: h.detach().clone()).float()


@pytest.fixture(scope="session")
def model_states(demo_model) -> torch.Tensor:
    """[T, 128] real hidden states at blocks.1.hook_resid_post of the demo model over TEXTS."""
    model, tok, _ = demo_model
    return torch.cat([resid_post(model, tok(t)["input_ids"], 1) for t in TEXTS])
