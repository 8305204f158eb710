"""apply_logit_bias: reference vs naive float64 loop, Triton vs reference, bad ids, argument checks."""

from __future__ import annotations

import pytest
import torch

import steerkernels as sk
from tests.kernels.helpers import assert_close, naive_logit_bias, rand, same_bits

# (R, V, S, D, P, B): V over one 1024 block; R = 1 with only sparse ids; P and S over one 64-id chunk
CASES = [(4, 1031, 5, 2, 7, 3), (1, 257, 3, 0, 0, 0), (3, 300, 0, 1, 70, 2), (3, 129, 70, 0, 5, 1)]


def logit_args(gen, R, V, S, D, P, B):
    """Random biases and penalties; the last row (when R > 1) has no work at all."""
    temperature = 0.5 + torch.rand(R, generator=gen)
    temperature[0] = 1.0  # a greedy row
    sparse_ids = torch.randint(-1, V, (R, S), generator=gen)
    penalty_ids = torch.stack([torch.randperm(V, generator=gen)[:P] for _ in range(R)]).reshape(R, P)
    penalty_ids[:, P - P // 3 :] = -1  # padding at the end
    if S >= 3:
        sparse_ids[0, 1] = sparse_ids[0, 0] = 7  # duplicate ids add up
        if P:
            sparse_ids[0, 2] = int(penalty_ids[0, 0])  # biased and penalized
    dense_idx = torch.randint(-1, max(B, 1), (R, D), generator=gen) if B else torch.full((R, D), -1)
    args = dict(
        temperature=temperature,
        sparse_ids=sparse_ids,
        sparse_bias=rand(gen, R, S) * 3,
        dense_bank=rand(gen, B, V),
        dense_idx=dense_idx,
        penalty_ids=penalty_ids,
        penalty_counts=torch.randint(0, 4, (R, P), generator=gen, dtype=torch.int32),
        repetition_penalty=0.7 + torch.rand(R, generator=gen),
        presence_penalty=rand(gen, R).abs() * 0.5,
        frequency_penalty=rand(gen, R).abs() * 0.3,
    )
    if R > 1:
        for name in ("sparse_ids", "dense_idx", "penalty_ids"):
            args[name][-1] = -1
        args["temperature"][-1] = 1.0
    return args


def work_rows(args: dict, V: int, B: int) -> torch.Tensor:
    ids_ok = lambda t, n: ((t >= 0) & (t < n)).any(1)  # noqa: E731
    return (
        ids_ok(args["sparse_ids"], V)
        | ids_ok(args["penalty_ids"], V)
        | ids_ok(args["dense_idx"], B)
        | (args["temperature"] != 1.0)
    )


def to(args: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in args.items()}


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_naive_loop(case, gen):
    R, V, S, D, P, B = case
    args = logit_args(gen, R, V, S, D, P, B)
    logits = rand(gen, R, V) * 4
    ref = sk.reference.apply_logit_bias(logits.clone(), **args)
    assert_close(ref, naive_logit_bias(logits, *args.values()).float(), torch.float32)


def check_against_reference(case, device: str, backend: str, gen) -> None:
    """`backend` vs the reference on one case; rows without work are NaN and must stay bit-identical."""
    R, V, S, D, P, B = case
    args = logit_args(gen, R, V, S, D, P, B)
    work = work_rows(args, V, B)
    logits = rand(gen, R, V) * 4
    logits[~work] = float("nan")
    ref = sk.apply_logit_bias(logits.clone(), **args, backend="torch")
    out = sk.apply_logit_bias(logits.clone().to(device), **to(args, device), backend=backend).cpu()
    assert same_bits(out[~work], logits[~work]), "rows without work must be bit-identical"
    assert not torch.equal(ref[work], logits[work])
    assert_close(out[work], ref[work], torch.float32)


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference(case, device, gen):
    check_against_reference(case, device, "triton", gen)


def test_sparse_only_row_leaves_other_tokens_bit_identical(device, gen):
    """temperature 1 and no dense bias: only the listed ids of the row change."""
    V = 1031
    args = logit_args(gen, 2, V, 4, 0, 3, 0)
    args["temperature"][:] = 1.0
    logits = rand(gen, 2, V)
    out = sk.apply_logit_bias(logits.clone().to(device), **to(args, device), backend="triton").cpu()
    listed = torch.zeros(2, V, dtype=torch.bool)
    for name in ("sparse_ids", "penalty_ids"):
        ids = args[name]
        listed.scatter_(1, ids.clamp(min=0), (ids >= 0) | listed.gather(1, ids.clamp(min=0)))
    assert same_bits(out[~listed], logits[~listed])
    assert not torch.equal(out[listed], logits[listed])


def test_bias_then_penalty_then_temperature_order():
    """One id, by hand: (x + b) > 0 is divided by rp, presence and frequency subtracted, then / T."""
    logits = torch.tensor([[1.0, -2.0, 3.0]])
    r1 = lambda v: torch.tensor([v])  # noqa: E731
    sk.apply_logit_bias(
        logits, r1(2.0), torch.tensor([[0, 0]]), torch.tensor([[0.5, 0.5]]), torch.zeros(0, 3),
        torch.zeros(1, 0, dtype=torch.int64), torch.tensor([[0, 1]]),
        torch.tensor([[2, 0]], dtype=torch.int32), r1(2.0), r1(0.25), r1(0.125), backend="torch",
    )  # fmt: skip
    # id 0: ((1 + 1) / 2 - 0.25 - 2 * 0.125) / 2 = 0.25; id 1: (-2 * 2) / 2 = -2 (prompt only); id 2: 3 / 2
    assert logits.tolist() == [[0.25, -2.0, 1.5]]


@pytest.mark.parametrize(
    ("name", "row", "bad", "message"),
    [
        (
            "sparse_ids",
            0,
            1031,
            r"sparse_ids: values must lie in \[-1, 1031\) \(-1 = padding, vocab V=1031\)",
        ),
        ("sparse_ids", 1, -3, r"sparse_ids: values must lie in \[-1, 1031\)"),
        ("dense_idx", 2, 3, r"dense_idx: values must lie in \[-1, 3\) \(-1 = padding, B=3 bank rows\)"),
        ("penalty_ids", 0, 5000, r"penalty_ids: values must lie in \[-1, 1031\)"),
        ("penalty_counts", 0, -1, r"penalty_counts: values must lie in \[0, "),
        ("temperature", None, 0.0, r"temperature: must be > 0"),
        ("repetition_penalty", None, -1.0, r"repetition_penalty: must be > 0"),
    ],
)
def test_launcher_rejects_out_of_range(name, row, bad, message, gen):
    args = logit_args(gen, 4, 1031, 5, 2, 7, 3)
    if row is None:
        args[name][1] = bad
    else:
        args[name][row, 0] = bad
    with pytest.raises(ValueError, match=message):
        sk.apply_logit_bias(rand(gen, 4, 1031), **args, backend="torch")


def test_launcher_rejects_duplicate_penalty_ids_and_bad_shapes(gen):
    args = logit_args(gen, 4, 1031, 5, 2, 7, 3)
    args["penalty_ids"][0, 1] = args["penalty_ids"][0, 0]
    with pytest.raises(ValueError, match="penalty_ids: ids must be unique per row"):
        sk.apply_logit_bias(rand(gen, 4, 1031), **args)
    args = logit_args(gen, 4, 1031, 5, 2, 7, 3)
    with pytest.raises(ValueError, match=r"sparse_bias: expected shape \[4, 5\]"):
        sk.apply_logit_bias(rand(gen, 4, 1031), **{**args, "sparse_bias": rand(gen, 4, 6)})
    with pytest.raises(ValueError, match=r"dense_bank: expected shape \[\*, 1031\]"):
        sk.apply_logit_bias(rand(gen, 4, 1031), **{**args, "dense_bank": rand(gen, 3, 1030)})
    with pytest.raises(ValueError, match=r"logits: expected dtype in \(float32\), got bfloat16"):
        sk.apply_logit_bias(rand(gen, 4, 1031, dtype=torch.bfloat16), **args)


def test_kernel_masks_bad_ids(device, gen):
    """With validation off, bad ids and bank rows touch nothing, and never another row."""
    R, V, B = 4, 1031, 3
    args = logit_args(gen, R, V, 5, 2, 7, B)
    args["sparse_ids"][0, 3] = V  # would be row 1, token 0 in a flat view
    args["sparse_ids"][1, 4] = -5
    args["penalty_ids"][2, 0] = V + 1
    args["dense_idx"][0, 1] = B + 2
    args["sparse_ids"][3, :2] = torch.tensor([V, 2 * V])  # the no-work row gets only bad ids
    logits = rand(gen, R, V)
    ref = sk.apply_logit_bias(logits.clone(), **args, backend="torch", validate=False)
    out = sk.apply_logit_bias(
        logits.clone().to(device), **to(args, device), backend="triton", validate=False
    ).cpu()
    assert same_bits(out[3], logits[3])
    assert_close(out, ref, torch.float32)
