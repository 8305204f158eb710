"""The parity checks, shared by the sae-lens and the sparsify suites: each compares our loader and
kernels (`ops`, as the server calls them) with the library's own encode / decode / edit hook (`Pair`)."""

from __future__ import annotations

import pytest
import torch

from steerkernels import cpu
from steerserve.config import SteeringConfig
from steerserve.runner.steering.banks import SiteBank
from tests.sae_fidelity import ops
from tests.sae_fidelity.conftest import triton_device
from tests.sae_fidelity.library import D_IN, Pair

TRITON_TOKENS = 5  # NOTE: the Triton interpreter runs one program per token, slowly: few tokens there


def random_states() -> torch.Tensor:
    return torch.randn(16, D_IN, generator=torch.Generator().manual_seed(5)) * 3  # demo-like norms


def on_backend(backend: str, x: torch.Tensor, pair: Pair, kind: str, few: bool = True) -> torch.Tensor:
    """The inputs for `backend` on its device, skipping what this machine cannot run; `few`: encode ops,
    run under the Triton interpreter on a few real tokens only (tests/kernels covers random ones)."""
    if backend == "cpu" and not cpu.available():
        pytest.skip("the C++ CPU backend needs a compiler")
    if backend != "triton":
        return x
    device = triton_device()
    if device is None:
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    if device == "cpu" and pair.ours.d_sae > 256:
        pytest.skip("over 256 features is too slow for the Triton interpreter (run it on a GPU)")
    if device == "cpu" and few and kind == "random":
        pytest.skip("the interpreter reads real states only (tests/kernels covers random ones)")
    return (x[:TRITON_TOKENS] if device == "cpu" and few else x).to(device)


def close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """fp32 tolerance, relative to the largest magnitude of the reference."""
    scale = max(float(ref.abs().max()), 1.0)
    torch.testing.assert_close(ours.float().cpu(), ref.float().cpu(), rtol=1e-5, atol=2e-5 * scale, msg=what)


def loader(pair: Pair, kind: str, x: torch.Tensor) -> None:
    """Our SAEWeights (the registry's normalized SAE) encode and decode as the library does."""
    acts = pair.encode(x)
    assert 0 < int((acts > 0).sum()) < acts.numel(), f"{pair.name}: the case must fire and not fire"
    close(pair.ours.encode(x), acts, f"{pair.name} {kind} encode")
    close(pair.ours.decode(acts), pair.decode(acts), f"{pair.name} {kind} decode")


def every_feature(pair: Pair, kind: str, x: torch.Tensor, backend: str) -> None:
    """All d_sae activations of every token: what gates read (`sae_feature_acts`) and, read in full,
    what /v1/inspect reads (`sae_encode_topk` with top_k = d_sae; not on Triton's interpreter: slow)."""
    xb = on_backend(backend, x, pair, kind)
    want = pair.encode(xb.cpu())
    close(ops.all_acts(pair.ours, xb, backend), want, f"{pair.name} {kind} sae_feature_acts {backend}")
    if backend != "triton" or xb.device.type == "cuda":
        values, indices = ops.top_k(pair.ours, xb, min(pair.ours.d_sae, 256), backend)
        got = ops.dense(values, indices, pair.ours.d_sae)
        if pair.ours.d_sae <= 256:
            close(got, want, f"{pair.name} {kind} sae_encode_topk {backend}")


def top_k(pair: Pair, kind: str, x: torch.Tensor, asked: int, backend: str) -> None:
    """The largest `asked` of the library's encode(), each index reading its own activation; past a
    TopK SAE's own k only zeros (never a ReLU value of a feature the SAE sets to 0)."""
    xb = on_backend(backend, x, pair, kind)
    want = pair.encode(xb.cpu())
    values, indices = (t.cpu() for t in ops.top_k(pair.ours, xb, asked, backend))
    what = f"{pair.name} {kind} top {asked} {backend}"
    close(values, want.topk(asked, dim=1).values, what)
    close(want.gather(1, indices), values, what)
    assert all(len(set(r)) == asked for r in indices.tolist()), what
    if pair.ours.k is not None and asked > pair.ours.k:
        assert bool((values[:, pair.ours.k :] == 0).all()), what


def active_and_inactive(pair: Pair, x: torch.Tensor) -> torch.Tensor:
    """[T, 2] per token: its most active feature, and the inactive feature with the largest
    pre-activation (the one a wrong activation function would read as active)."""
    acts = pair.encode(x)
    pre = pair.ours.pre_activations(x).float()
    active = acts.argmax(1)
    inactive = torch.where(acts == 0, pre, float("-inf")).argmax(1)
    assert bool((acts.gather(1, active[:, None]) > 0).all()), "every token needs an active feature"
    assert bool((acts.gather(1, inactive[:, None]) == 0).all())
    return torch.stack([active, inactive], 1)


EDIT_VALUES = {  # mode -> (the library's mode, per-token values of the [active, inactive] features)
    "clamp": ("clamp", (2.5, 2.5)),
    "scale": ("scale", (3.0, 4.0)),
    "ablate": ("ablate", (0.0, 0.0)),
    "ablate-mean": ("ablate", (0.7, 0.4)),  # "to": "mean" sets the feature to its recorded mean
}


def edit(pair: Pair, kind: str, x: torch.Tensor, mode: str, backend: str) -> None:
    """clamp / scale / ablate of an active and an inactive feature per token == the library's
    encode -> edit -> decode + (x - decode(encode(x)))."""
    xb = on_backend(backend, x, pair, kind, few=False)  # NOTE: sae_edit is cheap in the interpreter
    xc = xb.cpu()
    feats = active_and_inactive(pair, xc)
    lib_mode, vals = EDIT_VALUES[mode]
    values = torch.tensor([vals]).expand(xc.shape[0], 2)
    want = pair.edit(xc, feats, lib_mode, values)
    assert not torch.equal(want, xc), "the edit must change something"
    got = ops.edit(pair.ours, xb, feats.to(xb.device), lib_mode, values.to(xb.device), backend)
    close(got, want, f"{pair.name} {kind} {mode} {backend}")


def slot_local_bank(pair: Pair, x: torch.Tensor, backend: str, monkeypatch) -> None:
    """What steering runs: SiteBank's slot-local copy of the edited features (plus, for TopK, the rank
    threshold from the full encoder). Row 0 clamps feature f to 3, row 1 scales feature g by 2; tokens
    alternate rows, and each feature is active on some of its row's tokens and inactive on others."""
    x = on_backend(backend, x, pair, "model", few=False)
    device = x.device
    monkeypatch.setenv("STEERKERNELS_BACKEND", backend)
    acts = pair.encode(x.cpu())
    row = torch.arange(x.shape[0]) % 2
    half = lambda r: ((acts[row == r] > 0).float().mean(0) - 0.5).abs()  # noqa: E731
    f, g = int(half(0).argmin()), int(half(1).argmin())  # features firing on about half their tokens
    for r, feat in ((0, f), (1, g)):
        on = acts[row == r, feat] > 0
        assert bool(on.any()) and bool((~on).any()), f"{pair.name}: feature {feat} must be on and off"
    w = pair.ours.to(device)
    bank = SiteBank(2, D_IN, SteeringConfig(max_steering_rows=2), device)
    bank.add_edit(0, "all", "uid", w, f, "feature_clamp", 3.0)
    bank.add_edit(1, "all", "uid", w, g, "feature_scale", 2.0)
    h = x.clone()
    bank.apply(h, (2 * row).to(device))  # slot 2 * row + pos_class: every token a prompt token
    want = torch.empty_like(x.cpu())
    for r, feat, mode, v in ((0, f, "clamp", 3.0), (1, g, "scale", 2.0)):
        t = row == r
        n = int(t.sum())
        want[t] = pair.edit(x.cpu()[t], torch.full((n, 1), feat), mode, torch.full((n, 1), v))
    close(h, want, f"{pair.name} bank {backend}")


def gates(pair: Pair, x: torch.Tensor, backend: str, monkeypatch) -> None:
    """What `when` / `stop_when` read (runner/steering/gates.py): row 0 gates on feature f above 0, row 1 on
    feature g in a band; each token's gate activation equals the library's encode() and fires with it.
    Tokens alternate rows; two requests split the packed batch."""
    from steerserve.runner.steering.gates import GateTable
    from steerserve.types.sites import Site
    from steerserve.types.steering import Gate, SAERef, SteeringSpec

    x = on_backend(backend, x, pair, "model", few=False)
    device = x.device
    monkeypatch.setenv("STEERKERNELS_BACKEND", backend)
    acts = pair.encode(x.cpu())
    f, g = (int(i) for i in ((acts > 0).float().mean(0) - 0.5).abs().argsort()[:2])
    site, ref = Site(1, "resid_post"), SAERef("s", "uid")
    lo, hi = 0.5, float(acts[:, g].max()) / 2  # a band: fires on part of g's active tokens
    table = GateTable(2, 2, device)
    table.write(
        0, SteeringSpec.build((), (), stops=(Gate(ref, f, site, above=0.0),)), {"uid": pair.ours.to(device)}
    )
    table.write(
        1, SteeringSpec.build((), (), stops=(Gate(ref, g, site, lo, hi),)), {"uid": pair.ours.to(device)}
    )
    T = x.shape[0]
    row = torch.arange(T) % 2
    table.begin_step(row.to(device), torch.zeros(T, dtype=torch.int8, device=device), [T // 2, T - T // 2],
                     torch.zeros(2, 2, dtype=torch.bool, device=device))  # fmt: skip
    table.evaluate(site, x)
    step = table._step  # NOTE: the per-step state GateTable keeps (acts, fire): what gates act on
    want = torch.where(row == 0, acts[:, f], acts[:, g])
    fires = torch.where(row == 0, want > 0, (want > lo) & (want < hi))
    assert bool(fires.any()) and bool((~fires).any()), "the gates must hold on some tokens and not others"
    close(step.acts[:, 0].cpu(), want, f"{pair.name} gate acts {backend}")
    assert torch.equal(step.fire[:, 0].cpu(), fires), f"{pair.name} gate fire {backend}"
