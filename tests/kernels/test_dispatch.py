"""Backend dispatch: the argument, env STEERKERNELS_BACKEND, auto rules, and imports without triton."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import steerkernels as sk
from steerkernels import _cbuild, _checks, cpu, reference
from tests.kernels.helpers import rand, token_plan


def test_resolve_backend(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("STEERKERNELS_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _checks.resolve_backend(None, cpu) == "cpu"  # this machine has a C++ compiler
    assert _checks.resolve_backend("auto", cuda) == "triton"
    assert _checks.resolve_backend("torch", cuda) == "torch"
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors or TRITON_INTERPRET=1"):
        _checks.resolve_backend("triton", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _checks.resolve_backend(None, cpu) == "triton"
    monkeypatch.setenv("STEERKERNELS_BACKEND", "torch")
    assert _checks.resolve_backend(None, cpu) == "torch"
    assert _checks.resolve_backend("triton", cpu) == "triton"  # the argument wins over the env
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors; got device cuda"):
        _checks.resolve_backend("cpu", cuda)
    monkeypatch.setenv("STEERKERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"backend: expected one of \('auto', 'torch', 'triton', 'cpu'\)"):
        _checks.resolve_backend(None, cpu)


def test_cpu_backend_falls_back_when_it_cannot_build(monkeypatch, tmp_path):
    """No compiler, a compiler that fails, or STEERKERNELS_CPU=0: auto is the reference, never an error."""
    monkeypatch.setenv("STEERSERVE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("STEERKERNELS_BACKEND", raising=False)
    for compiler, env in ((lambda: None, "1"), (lambda: "/bin/false", "1"), (_cbuild.compiler, "0")):
        monkeypatch.setattr(cpu, "_state", {})
        monkeypatch.setattr(_cbuild, "compiler", compiler)
        monkeypatch.setenv("STEERKERNELS_CPU", env)
        assert not cpu.available()
        assert _checks.resolve_backend(None, torch.device("cpu")) == "torch"
        with pytest.raises(ValueError, match="backend='cpu' but its C.. library cannot be built here"):
            _checks.resolve_backend("cpu", torch.device("cpu"))


def test_env_switch_reaches_the_op(monkeypatch, gen):
    """STEERKERNELS_BACKEND=torch routes an op to the reference module."""
    calls = []
    monkeypatch.setattr(reference, "steer_add", lambda *a: calls.append(a) or a[0])
    monkeypatch.setenv("STEERKERNELS_BACKEND", "torch")
    sk.steer_add(rand(gen, 5, 9), token_plan(5, 3, gen), rand(gen, 3, 9))
    assert len(calls) == 1


def test_package_imports_and_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, steerkernels as sk\n"
        "h = torch.randn(3, 5); v = torch.randn(2, 5)\n"
        "out = sk.steer_add(h.clone(), torch.tensor([0, -1, 1]), v)\n"
        "assert torch.allclose(out[0], h[0] + v[0]) and torch.equal(out[1], h[1])\n"
        "assert sk._checks.resolve_backend('auto', torch.device('cpu')) == 'torch'\n"
    )
    env = {**os.environ, "STEERKERNELS_BACKEND": "auto", "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_device_mismatch_is_named(gen):
    with pytest.raises(ValueError, match="slot_vectors: expected a tensor on cpu"):
        sk.steer_add(rand(gen, 5, 9), token_plan(5, 3, gen), rand(gen, 3, 9).to("meta"))
