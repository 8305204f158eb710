"""On a CUDA device: decode steps replayed from CUDA graphs give the tokens of the eager steps, steered
and not, and the graphs were really captured and replayed (not turned off by their own check)."""

from __future__ import annotations

import pytest
import torch

from steerserve.config import StepMode
from tests.engine.helpers import run_staggered
from tests.runner.test_padded_decode import _requests, steered_engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(model_dir: str, mode: StepMode, data_dir):
    built, a, v = steered_engine(model_dir, mode, data_dir, 8)
    try:
        out = run_staggered(built.core, _requests(a, v, built.info.vocab_size), every=2)
        return out, built.core.runner
    finally:
        built.close()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_graphs_equal_eager(arch, tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir(arch)
    eager, _ = _run(model_dir, StepMode.PACKED, tmp_path / "eager")
    padded, _ = _run(model_dir, StepMode.PADDED, tmp_path / "padded")
    graphs, runner = _run(model_dir, StepMode.GRAPHS, tmp_path / "graphs")
    assert runner.paged and runner.graphs is not None and not runner.graphs.disabled
    assert runner.graphs.captures >= 2  # the unsteered graph and at least one steered layout
    assert padded == eager
    assert graphs == eager
