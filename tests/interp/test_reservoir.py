"""The bottom-k reservoir (interp/reservoir.py): a uniform sample without replacement per group,
whatever the batching, mergeable, and uniform by a chi-square / Kolmogorov-Smirnov test (scipy)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from steerserve.interp import reservoir
from steerserve.interp.reservoir import Reservoir, token_key


def corpus(seed: int, n: int = 5000, groups: int = 7):
    """n occurrences over `groups` groups (skewed sizes, one group never offered), odd float values."""
    rng = np.random.default_rng(seed)
    g = rng.choice(groups - 1, size=n, p=np.r_[0.6, 0.3, 0.06, 0.03, 0.008, 0.002])
    g = np.where(g == 5, 6, g)  # group 5 stays empty
    docs, pos = np.divmod(np.arange(n), 97)  # tokens of 97-token documents
    return g, token_key(docs, pos), rng.lognormal(0, 1, n).astype(np.float32)


def test_sample_is_a_subset_of_the_right_size(monkeypatch):
    monkeypatch.setattr(reservoir, "_MIN_COMPACT", 64)  # NOTE: compact often: exercises the merge path
    g, keys, vals = corpus(1)
    r = Reservoir(7, size=25, seed=3)
    for lo in range(0, len(g), 333):
        r.offer(g[lo : lo + 333], keys[lo : lo + 333], vals[lo : lo + 333])
    samples = r.samples()
    for j, s in enumerate(samples):
        offered = vals[g == j]
        assert len(s) == min(25, offered.size) and list(s) == sorted(s), j
        assert set(s) <= set(offered.tolist()), j
        if offered.size <= 25:
            assert list(s) == sorted(offered.tolist())  # small groups: all of it
    assert samples[5] == () and r.counts().tolist() == [len(s) for s in samples]


def test_batching_order_and_merging_do_not_change_the_sample(monkeypatch):
    monkeypatch.setattr(reservoir, "_MIN_COMPACT", 100)
    g, keys, vals = corpus(2)
    whole = Reservoir(7, size=40, seed=9)
    whole.offer(g, keys, vals)
    shuffled, a, b = Reservoir(7, 40, 9), Reservoir(7, 40, 9), Reservoir(7, 40, 9)
    order = np.random.default_rng(0).permutation(len(g))
    for chunk in np.array_split(order, 37):
        shuffled.offer(g[chunk], keys[chunk], vals[chunk])
    a.offer(g[:1700], keys[:1700], vals[:1700])
    b.offer(g[1700:], keys[1700:], vals[1700:])
    a.merge(b)
    assert shuffled.samples() == whole.samples() == a.samples()
    other = Reservoir(7, size=40, seed=10)
    other.offer(g, keys, vals)
    assert other.samples()[0] != whole.samples()[0]  # the seed matters
    with pytest.raises(ValueError):
        whole.merge(other)


def test_inclusion_is_uniform_over_seeds():
    """Each of 30 values is kept with probability 6 / 30: chi-square over 3000 seeds."""
    n, k, runs = 30, 6, 3000
    keys, vals = token_key(4, np.arange(n) * 3 + 1), np.arange(n, dtype=np.float32)
    hits = np.zeros(n)
    for seed in range(runs):
        r = Reservoir(1, size=k, seed=seed)
        r.offer(np.zeros(n, dtype=np.int64), keys, vals)
        hits[np.asarray(r.samples()[0], dtype=np.int64)] += 1
    assert hits.sum() == runs * k
    assert stats.chisquare(hits).pvalue > 1e-3, hits


def test_sample_follows_the_population():
    """256 of 20000 skewed values: the sample's distribution is the population's (two-sample KS)."""
    g, keys, vals = corpus(5, n=20000, groups=7)
    r = Reservoir(7, size=256, seed=1)
    r.offer(np.zeros_like(g), keys, vals)  # one group: all 20000
    sample = np.asarray(r.samples()[0])
    assert sample.size == 256 and stats.ks_2samp(sample, vals).pvalue > 1e-3
