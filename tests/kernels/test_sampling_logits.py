"""sampling_logits: the CPU backend's one pass (convert, bias, argmax per row) against the three ops it
replaces, run one after another: the same bits, NaN / inf rows and strided bf16 logits included."""

from __future__ import annotations

import pytest
import torch

import steerkernels as sk
from steerkernels import cpu
from tests.kernels.helpers import assert_close, rand, same_bits
from tests.kernels.test_logit_bias import CASES, logit_args

needs_cpu = pytest.mark.skipif(not cpu.available(), reason="steerkernels CPU backend not built here")


def poisoned_logits(gen, R: int, V: int, dtype: torch.dtype, width: int) -> torch.Tensor:
    """[R, V] logits as a view of [R, width] rows (width >= V: strided); row 1 holds a NaN, row 2 is all
    -inf but one +inf, and equal maxima tie (the first must win)."""
    base = (rand(gen, R, width) * 4).to(dtype)
    x = base[:, :V]
    x[0, V // 3] = x[0, V // 2] = 50.0  # a tie
    if R > 2:
        x[1, V - 2] = float("nan")
        x[2] = float("-inf")
        x[2, 5] = float("inf")
    return x


def unfused(logits, args, process: bool, argmax: bool):
    """What the sampler ran before: .float(), apply_logit_bias, argmax_rows, each a pass of its own."""
    x = logits.float().contiguous()
    if process:
        sk.apply_logit_bias(x, **args, backend="cpu")
    return x, (sk.argmax_rows(x, backend="cpu") if argmax else None)


@needs_cpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("process,argmax", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("width_extra", [0, 37])
def test_one_pass_equals_the_three_ops(case, dtype, process, argmax, width_extra, gen):
    R, V, S, D, P, B = case
    args = logit_args(gen, R, V, S, D, P, B)
    logits = poisoned_logits(gen, R, V, dtype, V + width_extra)
    want_x, want_tokens = unfused(logits.clone(), args, process, argmax)
    before = logits.clone()
    x, tokens = sk.sampling_logits(logits, *args.values(), process=process, argmax=argmax, backend="cpu")
    assert x.dtype == torch.float32 and x.shape == (R, V)
    assert same_bits(x.contiguous(), want_x)
    if dtype == torch.float32:  # the sampler's own logits: edited in place, no copy
        assert x.data_ptr() == logits.data_ptr()
    else:
        assert same_bits(logits, before), "bf16 logits are read, not written"
    if argmax:
        assert torch.equal(tokens, want_tokens)
        assert torch.equal(tokens, want_x.argmax(-1))  # torch's rule: first of ties, NaN the largest
    else:
        assert tokens is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_backend_agrees_with_the_torch_reference(dtype, gen):
    """The composition (torch backend, and CPU where built) against the reference ops by hand."""
    R, V, S, D, P, B = CASES[0]
    args = logit_args(gen, R, V, S, D, P, B)
    logits = (rand(gen, R, V) * 4).to(dtype)
    ref_x = sk.reference.apply_logit_bias(logits.float().clone(), **args)
    backends = ["torch"] + (["cpu"] if cpu.available() else [])
    for backend in backends:
        x, tokens = sk.sampling_logits(logits.clone(), *args.values(), backend=backend)
        assert_close(x, ref_x, torch.float32, backend)
        assert torch.equal(tokens, x.argmax(-1)), backend


def test_rejects_bad_logits(gen):
    args = logit_args(gen, 2, 50, 1, 0, 0, 0)
    with pytest.raises(ValueError, match="logits"):
        sk.sampling_logits(torch.zeros(2, 50, dtype=torch.int32), *args.values())
    with pytest.raises(ValueError, match="sparse_ids"):
        sk.sampling_logits(rand(gen, 2, 50), *{**args, "sparse_ids": torch.tensor([[0], [50]])}.values())
    with pytest.raises(TypeError, match="10 terms"):
        sk.sampling_logits(rand(gen, 2, 50), *list(args.values())[:-1])
