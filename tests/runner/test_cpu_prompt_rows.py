"""Prompt rows of packed fp32 layers on MKL (runner/cpu_prompt_rows.py): inside a step, prompt rows
equal the layer's own addmm (MKL, what transformers runs) and generated rows the packed oneDNN kernel,
in any mix; each row's result does not depend on the rows beside it; outside a step, or at another row
count, everything stays on oneDNN; the LM head is never routed. Engine-level exactness (batch,
chunking, preemption) is tests/engine/test_preemption_exact.py and test_parity.py, which run through
this route."""

from __future__ import annotations

import copy

import pytest
import torch

from steerserve.runner import cpu_prompt_rows, cpu_sgemm, cpu_weights
from steerserve.runner.cpu_prompt_rows import RowKinds
from steerserve.runner.model_loader import build_random_model

pytestmark = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")),
    reason="no oneDNN",
)


@pytest.fixture(autouse=True)
def _onednn(monkeypatch):
    """The route is for oneDNN-packed layers: keep fp32 layers off our own kernel (cpu_sgemm.py) here."""
    monkeypatch.setenv("STEERSERVE_CPU_SGEMM", "0")


def test_layers_on_our_own_kernel_are_not_routed(monkeypatch):
    if cpu_sgemm.load() is None:
        pytest.skip("the CPU GEMM library cannot be built here")
    monkeypatch.setenv("STEERSERVE_CPU_SGEMM", "1")
    model, _ = build_random_model("gpt2", seed=0, dtype=torch.float32)
    assert cpu_weights.pack_linear_weights(model) > 0
    assert all(
        isinstance(m._ss_packed, cpu_sgemm.PackedWeight) for m in model.modules() if hasattr(m, "_ss_packed")
    )
    assert cpu_prompt_rows.attach(model) is None
    assert not any(hasattr(m, "_ss_route") for m in model.modules())


def _routed(arch):
    """(the random fp32 model, a packed copy with its prompt rows routed, the route)."""
    model, _ = build_random_model(arch, seed=0, dtype=torch.float32)
    model.requires_grad_(False)
    packed = copy.deepcopy(model)
    if cpu_weights.pack_linear_weights(packed) == 0:
        pytest.skip("oneDNN could not pack fp32 weights on this CPU")
    route = cpu_prompt_rows.attach(packed)
    if route is None:
        pytest.skip("MKL's rows depend on the row count on this CPU: nothing is routed")
    return model, packed, route


def _layers(packed):
    return [(n, m) for n, m in packed.named_modules() if getattr(m, "_ss_route", None) is not None]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # Conv1D and nn.Linear
def test_rows_go_by_kind_in_any_mix(arch):
    model, packed, route = _routed(arch)
    layers = _layers(packed)
    assert layers and all(m is not packed.get_output_embeddings() for _, m in layers)
    originals = dict(model.named_modules())
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, m in layers:
            own = originals[name]  # the unpacked module: transformers' addmm, MKL
            for rows in (1, 5, 16, 37, 130):
                x = torch.randn(rows, m._ss_in, generator=gen) * 3
                generated = (torch.rand(rows, generator=gen) < 0.4).tolist()
                onednn = cpu_weights._linear(x, m._ss_packed, m.bias)
                mkl = type(own).forward(own, torch.cat([x, x.new_zeros(max(0, 16 - rows), x.shape[1])]))[
                    :rows
                ]
                want = torch.where(torch.tensor(generated)[:, None], onednn, mkl)
                with route.step(RowKinds.of(generated)):
                    got = m(x)
                assert torch.equal(got, want), f"{name}: {rows} rows"
                for kind in (False, True):  # every row of one kind
                    with route.step(RowKinds.of([kind] * rows)):
                        assert torch.equal(m(x), onednn if kind else mkl), f"{name}: all {kind}"
                assert torch.equal(m(x), onednn)  # no step: oneDNN
                with route.step(RowKinds.of([False] * (rows + 1))):
                    assert torch.equal(m(x), onednn)  # not the step's row count: oneDNN
                with route.step(RowKinds(0, 0)):
                    assert torch.equal(m(x), onednn)  # a padded decode step's (no kinds built)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prompt_rows_do_not_depend_on_the_rows_beside_them(arch):
    _, packed, route = _routed(arch)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, m in _layers(packed):
            x = torch.randn(300, m._ss_in, generator=gen) * 3
            with route.step(RowKinds.of([False] * 300)):
                whole = m(x)
            for lo, hi in ((0, 1), (5, 8), (17, 30), (64, 300), (3, 4), (100, 229)):
                with route.step(RowKinds.of([False] * (hi - lo))):
                    assert torch.equal(m(x[lo:hi]), whole[lo:hi]), f"{name}: rows {lo}:{hi} alone"
                mixed = [True] * 3 + [False] * (hi - lo) + [True] * 4  # the same rows among generated ones
                rows = torch.cat([x[:3], x[lo:hi], x[:4]])
                with route.step(RowKinds.of(mixed)):
                    assert torch.equal(m(rows)[3 : 3 + hi - lo], whole[lo:hi]), f"{name}: {lo}:{hi} mixed"


def test_switched_off(monkeypatch):
    monkeypatch.setattr(cpu_prompt_rows, "ENABLED", False)
    model, _ = build_random_model("gpt2", seed=0, dtype=torch.float32)
    if cpu_weights.pack_linear_weights(model) == 0:
        pytest.skip("oneDNN could not pack fp32 weights on this CPU")
    assert cpu_prompt_rows.attach(model) is None
    assert not any(hasattr(m, "_ss_route") for m in model.modules())


def test_a_shape_whose_rows_depend_on_the_count_is_not_routed(monkeypatch):
    """The probe is what keeps a CPU whose MKL rounds by row count on oneDNN: made to see such a path
    (rows differ once a call has more than 40 rows), it routes nothing."""
    real = cpu_prompt_rows.mkl_rows

    def by_count(x, weight, bias):
        y = real(x, weight, bias)
        return y * (1 + 2**-20) if x.shape[0] > 40 else y

    monkeypatch.setattr(cpu_prompt_rows, "mkl_rows", by_count)
    model, _ = build_random_model("gpt2", seed=0, dtype=torch.float32)
    if cpu_weights.pack_linear_weights(model) == 0:
        pytest.skip("oneDNN could not pack fp32 weights on this CPU")
    assert cpu_prompt_rows.attach(model) is None
