"""resample_bits / resample_draw: the reference against pure-Python-int implementations of the spec, the
draws' distribution (zero mass and KS against the stored samples), batch independence, and every
backend (C++ cpu, Triton) equal to the reference bit for bit."""

from __future__ import annotations

import pytest
import scipy.stats
import torch

import steerkernels as sk
import steerkernels._util as sk_util
from steerkernels import cpu, reference
from tests.kernels.helpers import py_bits, same_bits

SENTINEL = 7777.0  # NaN is this op's "no draw" value, so outputs are poisoned with a finite sentinel


def py_draw(slot, key, pos, stream, density, samples, count):
    """resample_draw as a plain loop over (token, column), float64 / int arithmetic."""
    T, (S, F, _) = slot.shape[0], samples.shape
    out = torch.full((T, F), float("nan"), dtype=torch.float64)
    for t in range(T):
        s = int(slot[t])
        if not 0 <= s < S:
            continue
        for j in range(F):
            st = int(stream[s, j])
            if st < 0:
                continue
            h1, h2 = py_bits(int(key[t]), int(pos[t]), st)
            n = int(count[s, j])
            active = (h1 >> 8) * 2.0**-24 < float(density[s, j]) and n > 0
            out[t, j] = float(samples[s, j, (h2 * n) >> 32]) if active else 0.0
    return out


def random_keys(gen, n: int) -> torch.Tensor:
    keys = torch.randint(-(2**63), 2**63 - 1, (n,), generator=gen, dtype=torch.int64)
    keys[:4] = torch.tensor([2**63 - 1, -(2**63), -1, 0])[:n]
    return keys


def draw_args(gen, T=37, S=5, F=3, N=7):
    """Random odd-shaped arguments: slots incl. -1, padding columns, counts incl. 0 and N, densities incl.
    0 and 1, negative and extreme keys."""
    slot = torch.randint(-1, S, (T,), generator=gen, dtype=torch.int32)
    slot[: S + 1] = torch.tensor([*range(S), -1], dtype=torch.int32)[:T]
    stream = torch.randint(0, 2**40, (S, F), generator=gen)
    density = torch.rand(S, F, generator=gen)
    count = torch.randint(1, N + 1, (S, F), generator=gen)
    # special cells (as far as the shape has cells): density 1 with all N samples, density 1 with one
    # sample, density 0, no samples, a padding column
    for cell, (dens, cnt, st) in enumerate([(1.0, N, None), (1.0, 1, None), (0.0, None, None),
                                            (None, 0, None), (None, None, -1)][: S * F - 1]):  # fmt: skip
        s, j = divmod(S * F - 1 - cell, F)  # from the last cell back: (1, 1, 1, 1) keeps a normal cell
        density[s, j] = density[s, j] if dens is None else dens
        count[s, j] = count[s, j] if cnt is None else cnt
        stream[s, j] = stream[s, j] if st is None else st
    return dict(
        slot_of_token=slot,
        token_key=random_keys(gen, T),
        token_pos=torch.randint(0, 2**33, (T,), generator=gen),
        stream=stream,
        density=density,
        samples=torch.randn(S, F, N, generator=gen),
        sample_count=count,
    )


@pytest.fixture
def sentinel(monkeypatch):
    monkeypatch.setattr(
        sk_util, "empty", lambda shape, dt, dev: torch.full(shape, SENTINEL, dtype=dt, device=dev)
    )


def test_bits_match_python_ints(gen):
    T, F = 29, 3
    key, pos = random_keys(gen, T), torch.randint(-(2**40), 2**62, (T,), generator=gen)
    stream = torch.randint(-(2**62), 2**62, (T, F), generator=gen)
    h1, h2 = reference.resample_bits(key, pos, stream)
    assert h1.shape == h2.shape == (T, F)
    want = [[py_bits(int(key[t]), int(pos[t]), int(stream[t, j])) for j in range(F)] for t in range(T)]
    assert h1.tolist() == [[w[0] for w in row] for row in want]
    assert h2.tolist() == [[w[1] for w in row] for row in want]
    # broadcasting: one stream row for every token
    b1, _ = reference.resample_bits(key, pos, stream[:1])
    assert b1[5].tolist() == [py_bits(int(key[5]), int(pos[5]), int(stream[0, j]))[0] for j in range(F)]


def test_draw_reference_matches_python_loop(gen):
    for shape in ((37, 5, 3, 7), (11, 2, 4, 1), (6, 3, 1, 13)):
        args = draw_args(gen, *shape)
        ref = sk.resample_draw(**args, backend="torch")
        naive = py_draw(*args.values())
        assert torch.equal(ref.isnan(), naive.isnan())
        assert torch.equal(ref.double().nan_to_num(), naive.nan_to_num())
    assert bool((naive.nan_to_num() != 0).any()) and bool((naive == 0).any()), "cases need both outcomes"


def test_draws_follow_the_distribution(gen):
    """Over 6000 (key, pos) pairs: zero fraction within a binomial bound of 1 - density, the active draws
    pass a KS test against Uniform(samples[:count]) (and fail it against another column's samples),
    and two columns of one token are active independently."""
    T, N = 6000, 257
    density = torch.tensor([[0.3, 1.0, 0.05, 0.5]])
    count = torch.tensor([[200, 257, 131, 60]])
    # lognormal (nonzero, skewed), each column on its own scale
    samples = torch.randn(1, 4, N, generator=gen).exp() * torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None]
    out = sk.resample_draw(
        torch.zeros(T, dtype=torch.int64), random_keys(gen, T), torch.randint(0, 4096, (T,), generator=gen),
        torch.tensor([[3, 4, 5, 6]]), density, samples, count, backend="torch",
    )  # fmt: skip
    active = out != 0
    for j in range(4):
        p, n_on = float(density[0, j]), int(active[:, j].sum())
        assert abs(n_on - T * p) <= 5 * (T * p * (1 - p)) ** 0.5 + 1e-9, (j, n_on)
        pool = samples[0, j, : int(count[0, j])].double().sort().values.numpy()
        draws = out[active[:, j], j].double().numpy()
        cdf = lambda x, pool=pool: pool.searchsorted(x, side="right") / len(pool)  # noqa: E731
        assert scipy.stats.kstest(draws, cdf).pvalue > 1e-3, j
        assert set(draws.tolist()) <= set(pool.tolist())
    other = samples[0, 1, :257].double().sort().values.numpy()
    wrong = scipy.stats.kstest(out[active[:, 0], 0].double().numpy(), lambda x: other.searchsorted(x) / 257)
    assert wrong.pvalue < 1e-3, "the KS test must be able to fail"
    both = int((active[:, 0] & active[:, 3]).sum())
    assert abs(both - T * 0.15) <= 5 * (T * 0.15 * 0.85) ** 0.5


def test_draw_is_independent_of_the_batch(gen):
    """A token's draws depend on (key, pos, stream) only: permuting and dropping tokens, and moving its
    slot to another row with the same columns, leave them unchanged."""
    args = draw_args(gen)
    ref = sk.resample_draw(**args, backend="torch")
    perm = torch.randperm(37, generator=gen)[:20]
    sub = dict(args, **{k: args[k][perm] for k in ("slot_of_token", "token_key", "token_pos")})
    assert same_bits(sk.resample_draw(**sub, backend="torch"), ref[perm])
    moved = {k: torch.cat([args[k][1:], args[k][:1]]) for k in ("stream", "density", "samples")}
    moved["sample_count"] = torch.cat([args["sample_count"][1:], args["sample_count"][:1]])
    slot = args["slot_of_token"]
    new_slot = torch.where(slot >= 0, (slot - 1) % 5, slot)
    out = sk.resample_draw(**dict(args, **moved, slot_of_token=new_slot), backend="torch")
    assert same_bits(out, ref)


def check_backend(backend: str, device: str, gen) -> None:
    for shape in ((37, 5, 3, 7), (70, 3, 5, 2), (1, 1, 1, 1), (9, 4, 9, 30)):
        args = draw_args(gen, *shape)
        ref = sk.resample_draw(**args, backend="torch")
        out = sk.resample_draw(**{k: v.to(device) for k, v in args.items()}, backend=backend).cpu()
        assert not (out == SENTINEL).any(), "unwritten cells"
        assert same_bits(out, ref), shape


def check_bank_views(backend: str, device: str, gen) -> None:
    """The banks as column slices of wider buffers (as the server passes them) and strided token ids."""
    wide = draw_args(gen, 37, 5, 6, 7)
    args = {
        k: v[:, :3] if k in ("stream", "density", "samples", "sample_count") else v for k, v in wide.items()
    }
    for k in ("token_key", "token_pos"):
        args[k] = torch.stack([args[k], -args[k]], 1)[:, 0]
    ref = sk.resample_draw(**{k: v.contiguous() for k, v in args.items()}, backend="torch")
    out = sk.resample_draw(**{k: v.to(device) for k, v in args.items()}, backend=backend).cpu()
    assert same_bits(out, ref)


def test_triton_matches_reference_bit_for_bit(device, gen, sentinel):
    check_backend("triton", device, gen)
    check_bank_views("triton", device, gen)


@pytest.mark.skipif(not cpu.available(), reason="the CPU backend needs a C++ compiler")
def test_cpu_matches_reference_bit_for_bit(gen, sentinel):
    check_backend("cpu", "cpu", gen)
    check_bank_views("cpu", "cpu", gen)


def check_masked(backend: str, device: str, gen) -> None:
    """validate=False: out-of-range slots give NaN rows, out-of-range counts are clamped to [0, N]; the
    backend agrees with the reference and reads nothing out of bounds."""
    args = draw_args(gen)
    args["slot_of_token"][[3, 7]] = torch.tensor([5, -4], dtype=torch.int32)
    args["sample_count"][0, 0], args["sample_count"][3, 1] = 10**6, -3
    ref = sk.resample_draw(**args, backend="torch", validate=False)
    out = sk.resample_draw(**{k: v.to(device) for k, v in args.items()}, backend=backend, validate=False)
    assert ref[[3, 7]].isnan().all()
    assert same_bits(out.cpu(), ref)


def test_triton_masks_unvalidated_bad_ids(device, gen, sentinel):
    check_masked("triton", device, gen)


@pytest.mark.skipif(not cpu.available(), reason="the CPU backend needs a C++ compiler")
def test_cpu_masks_unvalidated_bad_ids(gen, sentinel):
    check_masked("cpu", "cpu", gen)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(density=torch.full((5, 3), 1.5)), r"density: must lie in \[0, 1\]"),
        (dict(sample_count=torch.full((5, 3), 8)), r"sample_count: values must lie in \[0, 8\)"),
        (dict(slot_of_token=torch.full((37,), 5)), r"slot_of_token: values must lie in \[-1, 5\)"),
        (dict(stream=torch.zeros(5, 3, dtype=torch.int32)), r"stream: expected dtype in \(int64\)"),
        (dict(token_pos=torch.zeros(36, dtype=torch.int64)), r"token_pos: expected shape \[37\]"),
        (dict(samples=torch.zeros(5, 3, 7, dtype=torch.float64)), r"samples: expected dtype in \(float32\)"),
    ],
)
def test_rejects_bad_arguments(change, message, gen):
    with pytest.raises(ValueError, match=message):
        sk.resample_draw(**{**draw_args(gen), **change})
