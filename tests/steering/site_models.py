"""Tiny models for the site tests: random weights with random norm weights and biases, so that a norm's
weight (and Gemma's `1 + w`) is not the identity and getting it wrong changes the numbers."""

from __future__ import annotations

import torch

from steerserve.runner.model_loader import build_random_model, byte_tokenizer

SUBLAYER_ARCHS = ("gpt2", "llama", "qwen2", "qwen3", "gemma2")


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or "RMSNorm" in type(module).__name__


def save_norm_perturbed_model(arch: str, path: str, seed: int = 0) -> str:
    model, _ = build_random_model(arch, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for module in model.modules():
            if _is_norm(module):
                module.weight.add_(torch.randn(module.weight.shape, generator=g) * 0.4)
                if getattr(module, "bias", None) is not None:
                    module.bias.add_(torch.randn(module.bias.shape, generator=g) * 0.2)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
