"""Shared test fixtures: tiny random-weight models built in code, engines, and a real server process."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

ARCHS = ("gpt2", "llama", "qwen2", "qwen3", "gemma2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """`tiny_model_dir(arch, chat_template=True)` -> a save_pretrained directory of a random model."""
    from steerserve.runner.model_loader import save_random_model

    made: dict = {}

    def make(arch: str = "gpt2", chat_template: bool = True) -> str:
        key = (arch, chat_template)
        if key not in made:
            path = tmp_path_factory.mktemp(f"model-{arch}-{int(chat_template)}")
            made[key] = save_random_model(arch, str(path), seed=0, chat_template=chat_template)
        return made[key]

    return make
