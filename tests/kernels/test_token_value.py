"""sae_edit / project_clamp with per-token targets (token_value): the reference against naive float64
loops, every backend against the reference (a mix of NaN and targets, bf16 h, TopK), and an all-NaN
token_value giving the token_value=None result bit for bit."""

from __future__ import annotations

import pytest
import torch

import steerkernels as sk
from steerkernels import cpu
from tests.kernels.helpers import assert_close, naive_project_clamp, naive_sae_edit, rand, same_bits
from tests.kernels.test_residual import SHAPES, check_in_place, clamp_args, run_op, sae_args, to


def with_targets(gen, args: dict, T: int, width: int) -> dict:
    """args plus token_value [T, width]: about half NaN (no target), the rest random targets."""
    tv = rand(gen, T, width) * 3
    tv[torch.rand(T, width, generator=gen) < 0.5] = float("nan")
    tv[0, 0], tv[-1, -1] = float("nan"), 0.25  # both kinds whatever the draw
    return {**args, "token_value": tv}


def edit_case(gen, T, d, S, arch="jumprelu"):
    args = sae_args(gen, T, d, S, arch=arch)
    return with_targets(gen, args, T, args["feat_idx"].shape[1])


def clamp_case(gen, T, d, S):
    args = clamp_args(gen, T, d, S)
    return with_targets(gen, args, T, args["slot_dirs"].shape[1])


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
def test_sae_edit_reference_matches_naive(arch, gen):
    for T, d, S in SHAPES:
        args = edit_case(gen, T, d, S, arch)
        h = rand(gen, T, d) * 2
        ref = run_op("sae_edit", h.clone(), args, backend="torch")
        assert_close(ref, naive_sae_edit(h, **args), torch.float32, f"{arch} T={T} d={d}")
        old = run_op("sae_edit", h.clone(), {**args, "token_value": None}, backend="torch")
        assert not torch.equal(ref, old), "the targets changed nothing: the case is too weak"


def test_project_clamp_reference_matches_naive(gen):
    for T, d, S in SHAPES:
        args = clamp_case(gen, T, d, S)
        h = rand(gen, T, d) * 2
        ref = sk.project_clamp(h.clone(), **args, backend="torch")
        assert_close(ref, naive_project_clamp(h, **args), torch.float32, f"T={T} d={d}")
        old = sk.project_clamp(h.clone(), **{**args, "token_value": None}, backend="torch")
        assert not torch.equal(ref, old), "the targets changed nothing: the case is too weak"


BACKENDS = ["triton", pytest.param("cpu", marks=pytest.mark.skipif(not cpu.available(), reason="no C++"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_match_reference(backend, dtype, request, gen):
    device = "cpu" if backend == "cpu" else _triton_device(request)
    for T, d, S in SHAPES:
        h = rand(gen, T, d, dtype=dtype) * 2
        check_in_place("sae_edit", h, edit_case(gen, T, d, S), device, dtype, backend)
        check_in_place("project_clamp", h, clamp_case(gen, T, d, S), device, dtype, backend)
    h = rand(gen, 9, 37) * 2
    check_in_place("sae_edit", h, edit_case(gen, 9, 37, 4, "topk"), device, torch.float32, backend)


def _triton_device(request) -> str:
    """Triton's device here: CPU tensors under the interpreter, else CUDA (skip when neither)."""
    from tests.kernels.conftest import HAS_CUDA, INTERPRET

    if INTERPRET:
        return "cpu"
    if not HAS_CUDA:
        pytest.skip("Triton needs TRITON_INTERPRET=1 or a CUDA GPU")
    return "cuda"


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
def test_all_nan_targets_equal_none_bit_for_bit(backend, request, gen):
    device = "cpu" if backend in ("torch", "cpu") else _triton_device(request)
    for op, case in (("sae_edit", edit_case), ("project_clamp", clamp_case)):
        for dtype in (torch.float32, torch.bfloat16):
            args = to(case(gen, 9, 37, 4), device)
            args["token_value"] = torch.full_like(args["token_value"], float("nan"))
            h = (rand(gen, 9, 37, dtype=dtype) * 2).to(device)
            none = run_op(op, h.clone(), {**args, "token_value": None}, backend=backend)
            nan = run_op(op, h.clone(), args, backend=backend)
            assert same_bits(nan, none), (op, dtype)
            assert not torch.equal(none, h), "the op changed nothing: the case is too weak"


def test_rejects_bad_targets(gen):
    args = edit_case(gen, 9, 37, 4)
    with pytest.raises(ValueError, match=r"token_value: expected shape \[9, 4\] \(T, F\)"):
        run_op("sae_edit", rand(gen, 9, 37), {**args, "token_value": args["token_value"][:, :3]})
    bad = args["token_value"].clone()
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="token_value: must be finite or NaN"):
        run_op("sae_edit", rand(gen, 9, 37), {**args, "token_value": bad})
    args = clamp_case(gen, 9, 37, 4)
    with pytest.raises(ValueError, match=r"token_value: expected dtype in \(float32\)"):
        sk.project_clamp(rand(gen, 9, 37), **{**args, "token_value": args["token_value"].double()})
