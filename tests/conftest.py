"""Shared test fixtures: tiny random-weight models built in code, engines, and a real server process."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# NOTE: Triton decides when it is imported whether `@triton.jit` functions (its own `tl.sum` among them) are
# interpreted, so the choice is made here, before any test module can import it: a module that imports
# transformers or TransformerLens may import Triton, and a kernel suite collected after it then ran
# interpreted kernels calling compiled-mode library functions ("Cannot call @triton.jit'd outside of the
# scope of a kernel"; `pytest tests/steering` alone failed that way). On a GPU machine the kernel suites
# compile for CUDA unless TRITON_INTERPRET is set by hand.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ARCHS = ("gpt2", "llama", "qwen2", "qwen3", "gemma2")
# the test folders that run Triton through its interpreter on CPU (TRITON_INTERPRET, set above)
_INTERPRETED = ("kernels", "sae_fidelity")


@pytest.fixture(autouse=True, scope="module")
def _served_kernel_backend(request):
    """Outside the kernel suites, the steering ops run on the backend a CPU server uses.

    Without a GPU, TRITON_INTERPRET=1 holds for the whole process (set above, as tests/kernels and
    tests/sae_fidelity need it); under it the ops' `auto` backend picks interpreted Triton for CPU tensors
    (~1000x slower): an engine test with many steered steps then ran for many minutes.
    """
    if os.environ.get("STEERKERNELS_BACKEND") or any(p in _INTERPRETED for p in request.path.parts):
        yield
        return
    from steerkernels import cpu

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEERKERNELS_BACKEND", "cpu" if cpu.available() else "torch")
        yield


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
