"""Fixtures of the kernel tests: the devices Triton can run on here, poisoned allocations, tolerances.

Triton runs on CPU tensors through the interpreter (TRITON_INTERPRET=1, set by tests/conftest.py when there is no GPU)
and on CUDA tensors compiled (run `TRITON_INTERPRET=0 pytest tests/kernels` on a GPU machine).
"""

from __future__ import annotations

import os

import pytest
import torch

import steerkernels._util as sk_util

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> str:
    """Where the Triton kernel runs: cpu needs the interpreter, cuda a GPU without it."""
    if request.param == "cpu" and not INTERPRET:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    if request.param == "cuda" and (not HAS_CUDA or INTERPRET):
        pytest.skip("needs a CUDA GPU and TRITON_INTERPRET unset")
    return request.param


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer a launcher allocates starts as NaN (floats) or -1 (ints): unwritten cells show."""

    def empty(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(sk_util, "empty", empty)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
