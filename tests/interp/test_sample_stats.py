"""The samples of the stats jobs through the engine, against hidden states read by plain forward hooks
on the transformers model: a feature's `active_sample` holds real nonzero activations of that feature
(min(256, active count) of them, all of them where fewer), a vector's projection sample real
projections h . u; both reproducible whatever the batch size, and stored as computed."""

from __future__ import annotations

import argparse

import pytest
import torch

from steerserve.cli import main as steerserve_main
from steerserve.engine.tokenizer import encode_prompt
from steerserve.interp.stats import feature_stats, store_feature_stats
from steerserve.interp.vector_stats import store_vector_stats, vector_stats
from steerserve.registry import InvalidInput, NotFound, Registry, SteeringVector
from steerserve.registry.cli import stats_kind
from steerserve.types.sites import Site
from tests.engine.helpers import tiny_engine
from tests.steering.conftest import random_sae, sae_dict
from tests.steering.reference import activation, read_site

# ~700 byte tokens: some features fire on more than 256 of them, some on fewer
CORPUS = [
    "the cat sat on the mat and looked at the snow",
    "snow falls in winter; the wind is cold and grey",
    "a hot day in July, the sun over the dry fields",
    "x",
    "blue and green birds sing in the tall old trees",
    "Rain in London, a grey bird sang on the roof.",
    "The yellow house looked icy under the pale moon",
    "numbers: 12, 345, 6789 and 0.5 are not words!",
    "she said hello; he answered with a quiet smile",
    "mountains, rivers, lakes and a long dusty road",
    "QUICK BROWN FOX JUMPS OVER THE LAZY DOG, AGAIN",
    "in the morning the market opens at seven sharp",
    "ice melts in spring and the streams run fast",
    "a storm came at night and the lights went out",
    "dogs bark, cats purr, and the kettle whistles",
]


def hooked(model_dir: str, built, site: Site, read) -> torch.Tensor:
    """read(h) over every text's tokens, concatenated: [tokens, ...]."""
    return torch.cat(
        [
            read_site(model_dir, encode_prompt(built.tokenizer, t), (site.layer, site.hook), read)
            for t in CORPUS
        ]
    )


def among(values, reference: torch.Tensor) -> bool:
    """Every value equals (allclose) one of `reference`'s."""
    v = torch.tensor(values, dtype=torch.float32)[:, None]
    return bool(((v - reference[None, :]).abs() <= 1e-4 + 1e-4 * v.abs()).any(1).all())


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    model_dir = tiny_model_dir("gpt2")
    return model_dir, tiny_engine(model_dir, max_num_seqs=4)


def test_feature_sample_holds_real_activations(setup):
    model_dir, built = setup
    site = Site(0, "resid_post")
    sae = random_sae(64, site, 21, jumprelu=True)
    built.registry.add_sae(sae, sae_id="fs", model=built.info.name, fit=built.info)
    stats = feature_stats(built, "fs", CORPUS, batch=3, seed=5)
    acts = hooked(model_dir, built, site, lambda h: activation(h, sae_dict(sae), slice(None)))  # [T, d_sae]
    active = (acts > 0).sum(0)
    assert stats.num_tokens == acts.shape[0] > 600
    torch.testing.assert_close(stats.density, (acts > 0).float().mean(0))
    assert int((active > 256).sum()) > 0 and int(((active > 0) & (active <= 256)).sum()) > 0, active
    for f, sample in enumerate(stats.active_sample):
        assert len(sample) == min(256, int(active[f])), f
        assert list(sample) == sorted(sample) and all(v > 0 for v in sample), f
        nonzero = acts[:, f][acts[:, f] > 0]
        if sample:
            assert among(sample, nonzero), f
        if 0 < active[f] <= 256:  # all of them
            torch.testing.assert_close(torch.tensor(sample), nonzero.sort().values, rtol=1e-4, atol=1e-4)
    # reproducible; another batching picks the same tokens (its float sums may differ in the last bits);
    # another seed picks other values where there is a choice
    assert feature_stats(built, "fs", CORPUS, batch=3, seed=5).active_sample == stats.active_sample
    rebatched = feature_stats(built, "fs", CORPUS, batch=7, seed=5).active_sample
    for mine, theirs in zip(stats.active_sample, rebatched, strict=True):
        torch.testing.assert_close(torch.tensor(theirs), torch.tensor(mine), rtol=1e-5, atol=1e-6)
    other = feature_stats(built, "fs", CORPUS, batch=3, seed=6)
    full = [f for f in range(len(active)) if active[f] > 256]
    assert all(other.active_sample[f] != stats.active_sample[f] for f in full)
    assert store_feature_stats(built, "fs", stats) == len(active)
    for f in (full[0], int(active.argmin())):
        info = built.registry.get_feature("fs", f)
        assert info.active_sample == stats.active_sample[f] and info.density == float(stats.density[f])


def test_vector_sample_holds_real_projections(setup):
    model_dir, built = setup
    a, b = Site(0, "resid_post"), Site(1, "resid_pre")
    g = torch.Generator().manual_seed(4)
    vec = SteeringVector({a: torch.randn(64, generator=g) * 3, b: torch.randn(64, generator=g) * 0.2})
    built.registry.add_vector(vec, vector_id="vs", fit=built.info)
    stats = vector_stats(built, "vs", CORPUS, batch=4, seed=1)
    assert stats.num_tokens > 600 and set(stats.samples) == {a, b}
    for site in (a, b):
        u = vec.directions[site] / vec.directions[site].norm()
        proj = hooked(model_dir, built, site, lambda h, u=u: h @ u)  # [T]
        sample = stats.samples[site]
        assert len(sample) == 256 and list(sample) == sorted(sample) and among(sample, proj), site
        assert min(sample) < 0 < max(sample) or len(set(sample)) > 200  # a spread, not a constant
    assert vector_stats(built, "vs", CORPUS, batch=4, seed=1).samples == stats.samples
    rebatched = vector_stats(built, "vs", CORPUS, batch=9, seed=1).samples
    for site in (a, b):
        torch.testing.assert_close(torch.tensor(rebatched[site]), torch.tensor(stats.samples[site]))
    # a short corpus: every projection
    few = vector_stats(built, "vs", CORPUS[:2], batch=2)
    u = vec.directions[a] / vec.directions[a].norm()
    ref = torch.cat([read_site(model_dir, encode_prompt(built.tokenizer, t), (0, "resid_post"), lambda h: h @ u)
                     for t in CORPUS[:2]])  # fmt: skip
    torch.testing.assert_close(torch.tensor(few.samples[a]), ref.sort().values, rtol=1e-4, atol=1e-4)
    assert store_vector_stats(built, "vs", stats) == 2
    assert built.registry.get_vector_stats("vs") == stats.samples
    assert built.registry.get_vector("vs").projection_sample_sizes == {a: 256, b: 256}


def test_stats_command_takes_a_vector(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    reg = Registry(str(data))
    g = torch.Generator().manual_seed(8)
    reg.add_vector(SteeringVector({Site(1): torch.randn(64, generator=g)}), vector_id="cmd")
    reg.add_sae(random_sae(64, Site(0, "resid_post"), 3), sae_id="both")
    reg.add_vector(SteeringVector({Site(0): torch.randn(64, generator=g)}), vector_id="both")
    ns = lambda i, kind="auto": argparse.Namespace(id=i, kind=kind)  # noqa: E731
    assert stats_kind(reg, ns("cmd")) == "vector" and stats_kind(reg, ns("both", "sae")) == "sae"
    with pytest.raises(InvalidInput, match="--kind"):
        stats_kind(reg, ns("both"))
    with pytest.raises(NotFound):
        stats_kind(reg, ns("nothing"))
    reg.close()
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(CORPUS[:3]) + "\n")
    argv = ["registry", "stats", "cmd", "--texts", str(texts), "--model", tiny_model_dir("gpt2"),
            "--data-dir", str(data)]  # fmt: skip
    assert steerserve_main(argv) == 0
    n = sum(len(t.encode()) for t in CORPUS[:3])
    assert f"projection samples at 1 sites over {n} tokens" in capsys.readouterr().out
    reg = Registry(str(data))
    try:
        assert {s: len(v) for s, v in reg.get_vector_stats("cmd").items()} == {Site(1): min(256, n)}
    finally:
        reg.close()
