"""Transcoders at kernel level, on every backend: the four sae-lens transcoder classes (thresholds of both
signs, W_skip non-zero) read by our loader; every feature's activation equals the library's encode(); and
what SiteBank hands on for the MLP output (a clamp of one feature on row 0, a scale of another on row 1,
each feature on for some of its tokens and off for others) equals the library's
`(decode(a') + skip) - (decode(a) + skip)`, while the read site is left bit for bit as it was."""

from __future__ import annotations

import pytest
import torch

from steerserve.config import SteeringConfig
from steerserve.registry.formats import load_sae_path
from steerserve.runner.steering.banks import SiteBank
from steerserve.types.sites import Site
from tests.sae_fidelity import checks, ops
from tests.sae_fidelity.library import Pair
from tests.steering.test_transcoders import D_MODEL, TRANSCODERS, _reconstruction, library_transcoder


@pytest.mark.parametrize("backend", ops.BACKENDS)
@pytest.mark.parametrize("arch", list(TRANSCODERS))
def test_bank_delta_equals_the_library_edit_keeping_the_error(arch, backend, tmp_path, monkeypatch):
    hook = TRANSCODERS[arch]
    tc = library_transcoder(arch, hook, seed=7)
    tc.save_model(str(tmp_path))
    w = load_sae_path(tmp_path).weights
    assert w.site_out == Site(w.site.layer, "mlp_out") and w.site.hook_name == hook
    x = torch.randn(16, D_MODEL, generator=torch.Generator().manual_seed(3)) * 1.5
    xb = checks.on_backend(backend, x, Pair(arch, tc, w, tmp_path), "model", few=False)
    device = xb.device
    with torch.no_grad():
        acts = tc.encode(x)  # [T, d_sae]
    checks.close(ops.all_acts(w.to(device), xb, backend).cpu(), acts, f"{arch} encode {backend}")

    row = torch.arange(x.shape[0]) % 2
    half = lambda r: ((acts[row == r] > 0).float().mean(0) - 0.5).abs()  # noqa: E731
    f, g = int(half(0).argmin()), int(half(1).argmin())
    for r, feat in ((0, f), (1, g)):
        on = acts[row == r, feat] > 0
        assert bool(on.any()) and bool((~on).any()), f"feature {feat} must be on and off"
    monkeypatch.setenv("STEERKERNELS_BACKEND", backend)
    bank = SiteBank(2, D_MODEL, SteeringConfig(max_steering_rows=2), device)
    bank.add_edit(0, "all", "uid", w.to(device), f, "feature_clamp", 3.0)
    bank.add_edit(1, "all", "uid", w.to(device), g, "feature_scale", 2.0)
    assert bank.writes() == {w.site_out}
    h = xb.clone()
    out = bank.apply(h, (2 * row).to(device))  # slot 2 * row + pos_class: every token a prompt token
    assert torch.equal(h, xb), "a transcoder edit leaves the site it reads as it was"
    assert [site for site, _ in out] == [w.site_out]

    new = acts.clone()
    new[row == 0, f] = 3.0
    new[row == 1, g] *= 2.0
    with torch.no_grad():
        want = _reconstruction(tc, x, new) - _reconstruction(tc, x, acts)
    assert float(want.abs().max()) > 0.1
    checks.close(out[0][1].cpu(), want, f"{arch} bank delta {backend}")
