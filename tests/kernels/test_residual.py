"""steer_add, project_clamp, sae_edit, sae_feature_acts: reference vs naive float64 loops written from
SAELens' encode() (helpers.library_acts), Triton vs reference, bad ids. SAE cases cover relu, jumprelu
with thresholds of both signs, and TopK (edited features inside and outside the token's top k)."""

from __future__ import annotations

import pytest
import torch

import steerkernels as sk
from tests.kernels.helpers import (
    DTYPES,
    assert_close,
    library_acts,
    naive_project_clamp,
    naive_sae_edit,
    naive_steer_add,
    naive_steered,
    rand,
    same_bits,
    token_plan,
)

# (T, d, S): odd d, a single token, d above one 128-wide block
SHAPES = [(9, 37, 4), (1, 45, 2), (6, 130, 3)]
D_SAE, F, K = 53, 4, 3
SAE_ARCHS = ("relu", "jumprelu", "topk")
TOPK_K = 7  # of D_SAE = 53 features


def steer_args(gen, T, d, S):
    return dict(slot_of_token=token_plan(T, S, gen), slot_vectors=rand(gen, S, d))


def clamp_args(gen, T, d, S):
    slot = token_plan(T, S, gen)
    dirs = torch.nn.functional.normalize(rand(gen, S, K, d), dim=-1)
    lo = -rand(gen, S, K).abs() * 0.3
    hi = rand(gen, S, K).abs() * 0.3
    lo[0, 0], hi[0, 1] = float("-inf"), float("inf")
    lo[0, 2] = hi[0, 2] = 0.0  # project_out
    count = torch.arange(S, dtype=torch.int64).remainder(K + 1).flip(0)  # the last slot: 0 directions
    count[0] = K
    return dict(slot_of_token=slot, slot_dirs=dirs, lo=lo, hi=hi, dir_count=count)


def sae_args(gen, T, d, S, dtype=torch.float32, arch="jumprelu", apply_b_dec=True):
    """sae_edit's arguments; a TopK SAE carries "topk": k instead of token_threshold (see `run_op`).
    jumprelu thresholds have both signs: below 0 SAELens' relu still zeroes negative pre-activations."""
    slot = token_plan(T, S, gen)
    feat = torch.randint(0, D_SAE, (S, F), generator=gen)
    feat[0] = torch.tensor([2, 2, D_SAE - 1, 0])  # duplicates, both ends, every column used (max features)
    if S > 1:
        feat[1, 2:] = -1
    feat[-1] = -1  # a slot with no work
    return dict(
        slot_of_token=slot,
        feat_idx=feat,
        W_enc=rand(gen, d, D_SAE, dtype=dtype) / d**0.5,
        b_enc=rand(gen, D_SAE, dtype=dtype) * 0.1,
        W_dec=rand(gen, D_SAE, d, dtype=dtype),
        b_dec=rand(gen, d, dtype=dtype) * 0.1,
        threshold=rand(gen, D_SAE) * 0.4 if arch == "jumprelu" else None,
        apply_b_dec_to_input=apply_b_dec,
        mode=torch.randint(0, 3, (S, F), generator=gen).to(torch.int8),
        value=rand(gen, S, F) * 2,
        **({"topk": TOPK_K} if arch == "topk" else {}),
    )


def run_op(op: str, h: torch.Tensor, args: dict, **kw) -> torch.Tensor:
    """`sk.<op>(h, **args)`; a "topk" entry becomes the token_threshold of the same h (full encoder)."""
    args = dict(args)
    k = args.pop("topk", None)
    if k is not None:
        enc = [args[n] for n in ("W_enc", "b_enc", "b_dec", "apply_b_dec_to_input")]
        args["token_threshold"] = sk.sae_topk_threshold(h, *enc, k)
    return getattr(sk, op)(h, **args, **kw)


def work_rows(op: str, args: dict) -> torch.Tensor:
    """[T] bool: the rows the op must write (naive per-token rule)."""
    slot = args["slot_of_token"]
    bank = {"steer_add": "slot_vectors", "project_clamp": "slot_dirs", "sae_edit": "feat_idx"}[op]
    S = args[bank].shape[0]
    rows = []
    for t in range(slot.shape[0]):
        s = int(slot[t])
        ok = naive_steered(s, S)
        if ok and op == "project_clamp":
            ok = int(args["dir_count"][s]) > 0
        if ok and op == "sae_edit":
            ok = bool((args["feat_idx"][s] >= 0).any())
        rows.append(ok)
    return torch.tensor(rows, dtype=torch.bool)


def to(args: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def check_in_place(
    op: str, h0: torch.Tensor, args: dict, device: str, dtype: torch.dtype, backend: str = "triton"
) -> None:
    """Run the reference and `backend` and compare. Every other row without work is poisoned with NaN (a
    stray read shows in the rows with work), the rest keep random values (a stray write shows)."""
    work = work_rows(op, args)
    assert work.any(), "a case without work tests nothing"
    h0 = h0.clone()
    idle = (~work).nonzero().squeeze(1)
    h0[idle[::2]] = float("nan")
    ref = run_op(op, h0.clone(), args, backend="torch")
    out = run_op(op, h0.clone().to(device), to(args, device), backend=backend).cpu()
    assert same_bits(out[~work], h0[~work]), "rows without work must be bit-identical"
    assert not torch.equal(ref[work], h0[work]), "the op changed nothing: the case is too weak"
    assert_close(out[work], ref[work], dtype, f"{op} {dtype}")


BUILD = {"steer_add": steer_args, "project_clamp": clamp_args, "sae_edit": sae_args}
NAIVE = {"steer_add": naive_steer_add, "project_clamp": naive_project_clamp, "sae_edit": naive_sae_edit}


@pytest.mark.parametrize("op", list(BUILD))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_naive_loop(op, dtype, gen):
    for T, d, S in SHAPES:
        args = BUILD[op](gen, T, d, S)
        h = rand(gen, T, d, dtype=dtype) * 2
        ref = getattr(sk.reference, op)(h.clone(), **args)
        assert_close(ref, NAIVE[op](h, **args).to(dtype), dtype, f"{op} T={T} d={d}")


@pytest.mark.parametrize("arch", SAE_ARCHS)
@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_sae_edit_reference_variants_match_naive(arch, apply_b_dec, gen):
    for T, d, S in SHAPES:
        args = sae_args(gen, T, d, S, arch=arch, apply_b_dec=apply_b_dec)
        h = rand(gen, T, d) * 2
        ref = run_op("sae_edit", h.clone(), args, backend="torch")
        assert_close(ref, naive_sae_edit(h, **args).float(), torch.float32, f"{arch} T={T} d={d}")


def old_formula_acts(h, args):
    """What the kernels computed before they followed SAELens: jumprelu without its relu, TopK as relu."""
    xin = h.double() - (args["b_dec"].double() if args["apply_b_dec_to_input"] else 0.0)
    pre = xin @ args["W_enc"].double() + args["b_enc"].double()
    thr = args["threshold"]
    return torch.where(pre > thr.double(), pre, 0.0) if thr is not None else pre.relu()


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_sae_cases_tell_the_library_from_the_old_formulas(arch, gen):
    """The random cases contain edited (token, feature) pairs where SAELens' activation differs from the
    old formulas (a negative jumprelu threshold with pre in (thr, 0]; a TopK feature off the top k with
    pre > 0), and pairs where they agree, so every sae_edit / sae_feature_acts test above can fail."""
    T, d, S = 40, 37, 4
    args = sae_args(gen, T, d, S, arch=arch)
    h = rand(gen, T, d) * 2
    lib = library_acts(h, *(args[n] for n in ("W_enc", "b_enc", "b_dec", "threshold")),
                       args["apply_b_dec_to_input"], args.get("topk"))  # fmt: skip
    old = old_formula_acts(h, args)
    slot = args["slot_of_token"].long()
    f = args["feat_idx"][slot.clamp(min=0)]  # [T, F]
    pairs = (slot >= 0)[:, None] & (f >= 0)
    differ = (lib.gather(1, f.clamp(min=0)) != old.gather(1, f.clamp(min=0))) & pairs
    agree_active = (lib.gather(1, f.clamp(min=0)) > 0) & pairs & ~differ
    assert bool(differ.any()) and bool(agree_active.any())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", list(BUILD))
def test_triton_matches_reference(op, dtype, device, gen):
    for T, d, S in SHAPES:
        check_in_place(op, rand(gen, T, d, dtype=dtype) * 2, BUILD[op](gen, T, d, S), device, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sae_edit_16bit_weights(dtype, device, gen):
    """SAE weights in 16 bits, hidden state in fp32 (and vice versa)."""
    args = sae_args(gen, 9, 37, 4, dtype=dtype)
    check_in_place("sae_edit", rand(gen, 9, 37), args, device, torch.float32)
    check_in_place("sae_edit", rand(gen, 9, 37, dtype=dtype), sae_args(gen, 9, 37, 4), device, dtype)


@pytest.mark.parametrize("arch", SAE_ARCHS)
@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_sae_edit_triton_variants(arch, apply_b_dec, device, gen):
    args = sae_args(gen, 7, 45, 3, arch=arch, apply_b_dec=apply_b_dec)
    check_in_place("sae_edit", rand(gen, 7, 45) * 2, args, device, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sae_edit_prefill_layout(dtype, device, gen):
    """Prefill layout: long runs of one slot, a mixed stretch, an unsteered stretch, a partial run."""
    T, d, S = 53, 45, 3
    args = sae_args(gen, T, d, S, dtype=dtype)
    slot = torch.zeros(T, dtype=torch.int32)
    slot[[3, 9]] = -1
    slot[16:32] = (torch.arange(16) + 1) % 3 - 1  # ends with a steered token
    slot[32:48] = -1
    slot[48:] = 1
    args["slot_of_token"] = slot
    args["feat_idx"][1] = torch.tensor([5, -1, 9, 5])
    check_in_place("sae_edit", rand(gen, T, d, dtype=dtype), args, device, dtype)


def test_sae_edit_strided_encoder_view(device, gen):
    """W_enc given as the transpose view of a row-major [d_sae, d] copy (the coalesced layout)."""
    args = sae_args(gen, 9, 37, 4)
    args["W_enc"] = args["W_enc"].t().contiguous().t()
    check_in_place("sae_edit", rand(gen, 9, 37), args, device, torch.float32)


def test_strided_operands(device, gen):
    """Views with non-unit strides (index tensors, banks, SAE vectors) read the right elements."""
    args = steer_args(gen, 9, 37, 4)
    args["slot_of_token"] = torch.stack([args["slot_of_token"], args["slot_of_token"]], 1)[:, 0]
    args["slot_vectors"] = args["slot_vectors"].t().contiguous().t()
    check_in_place("steer_add", rand(gen, 9, 37), args, device, torch.float32)
    args = sae_args(gen, 9, 37, 4)
    for name in ("b_enc", "b_dec", "threshold"):
        args[name] = torch.stack([args[name], -args[name]], 1)[:, 0]
    check_in_place("sae_edit", rand(gen, 9, 37), args, device, torch.float32)


# -- out-of-range ids ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "name", "bad", "message"),
    [
        ("steer_add", "slot_of_token", 4, r"slot_of_token: values must lie in \[-1, 4\)"),
        ("steer_add", "slot_of_token", -2, r"slot_of_token: values must lie in \[-1, 4\)"),
        ("project_clamp", "dir_count", K + 1, rf"dir_count: values must lie in \[0, {K + 1}\)"),
        ("sae_edit", "feat_idx", D_SAE, rf"feat_idx: values must lie in \[-1, {D_SAE}\).*d_sae={D_SAE}"),
        ("sae_edit", "feat_idx", -2, rf"feat_idx: values must lie in \[-1, {D_SAE}\)"),
        ("sae_edit", "mode", 3, r"mode: values must lie in \[0, 3\)"),
    ],
)
def test_launcher_rejects_out_of_range(op, name, bad, message, gen):
    args = BUILD[op](gen, 9, 37, 4)
    args[name] = args[name].clone()
    args[name].view(-1)[1] = bad
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match=message):
            getattr(sk, op)(rand(gen, 9, 37), **args, backend=backend)


def test_launcher_rejects_bad_bounds_and_shapes(gen):
    args = clamp_args(gen, 9, 37, 4)
    args["lo"] = args["hi"] + 1.0
    with pytest.raises(ValueError, match="hi: must be >= lo"):
        sk.project_clamp(rand(gen, 9, 37), **args)
    args = steer_args(gen, 9, 37, 4)
    with pytest.raises(ValueError, match=r"slot_vectors: expected shape \[\*, 37\]"):
        sk.steer_add(rand(gen, 9, 37), **{**args, "slot_vectors": rand(gen, 4, 36)})
    with pytest.raises(ValueError, match=r"slot_of_token: expected dtype in \(int32, int64\)"):
        sk.steer_add(rand(gen, 9, 37), **{**args, "slot_of_token": args["slot_of_token"].float()})
    with pytest.raises(ValueError, match="h: the last dimension must be contiguous"):
        sk.steer_add(rand(gen, 37, 9).t(), **args)


@pytest.mark.parametrize("op", list(BUILD))
def test_kernel_masks_bad_ids(op, device, gen):
    """With validation off, bad ids read and write nothing; the reference masks them the same way."""
    T, d, S = 9, 37, 4
    args = BUILD[op](gen, T, d, S)
    args["slot_of_token"][[1, 4]] = torch.tensor([S + 7, -9], dtype=args["slot_of_token"].dtype)
    if op == "project_clamp":
        args["dir_count"][0] = K + 50
    if op == "sae_edit":
        args["feat_idx"][0, 1] = 10**6
        args["feat_idx"][1, 0] = -7
    h = rand(gen, T, d)
    ref = getattr(sk, op)(h.clone(), **args, backend="torch", validate=False)
    out = getattr(sk, op)(h.clone().to(device), **to(args, device), backend="triton", validate=False).cpu()
    assert torch.equal(out[[1, 4]], h[[1, 4]])
    assert_close(out, ref, torch.float32)


# -- sae_feature_acts (gates) ---------------------------------------------------------------------


def naive_feature_acts(
    h, slot_of_token, feat_idx, W_enc, b_enc, b_dec, threshold, apply_b_dec_to_input, topk=None
):
    T, Fn = h.shape[0], feat_idx.shape[1]
    out = torch.full((T, Fn), float("nan"), dtype=torch.float64)
    acts = library_acts(h, W_enc, b_enc, b_dec, threshold, apply_b_dec_to_input, topk)
    for t in range(T):
        s = int(slot_of_token[t])
        if not 0 <= s < feat_idx.shape[0]:
            continue
        for j in range(Fn):
            f = int(feat_idx[s, j])
            if f >= 0:
                out[t, j] = float(acts[t, f])
    return out


def acts_args(gen, T, d, S, arch="jumprelu", apply_b_dec=True):
    args = sae_args(gen, T, d, S, arch=arch, apply_b_dec=apply_b_dec)
    for key in ("W_dec", "mode", "value"):
        del args[key]
    return args


@pytest.mark.parametrize("arch", SAE_ARCHS)
@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_sae_feature_acts_reference_matches_naive(arch, apply_b_dec, gen):
    fired = idle = False
    for T, d, S in SHAPES:
        args = acts_args(gen, T, d, S, arch, apply_b_dec)
        h = rand(gen, T, d) * 2
        ref = run_op("sae_feature_acts", h, args, backend="torch")
        naive = naive_feature_acts(h, **args)
        assert torch.equal(ref.isnan(), naive.isnan())
        torch.testing.assert_close(ref.double(), naive, rtol=2e-5, atol=2e-5, equal_nan=True)
        fired, idle = fired or bool((naive.nan_to_num() > 0).any()), idle or bool(naive.isnan().any())
    assert fired and idle, "the cases need fired and idle cells"


@pytest.mark.parametrize("arch", SAE_ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sae_feature_acts_triton_matches_reference(arch, dtype, device, gen, monkeypatch):
    import steerkernels._util as sk_util

    # NOTE: NaN is this op's "no gate" value, so poison the output with a finite sentinel instead
    monkeypatch.setattr(
        sk_util, "empty", lambda shape, dt, dev: torch.full(shape, 7777.0, dtype=dt, device=dev)
    )
    for T, d, S in SHAPES:
        args = acts_args(gen, T, d, S, arch)
        h = rand(gen, T, d, dtype=dtype) * 2
        ref = run_op("sae_feature_acts", h, args, backend="torch")
        out = run_op("sae_feature_acts", h.to(device), to(args, device), backend="triton").cpu()
        assert not (out == 7777.0).any(), "unwritten cells"
        assert torch.equal(out.isnan(), ref.isnan())
        assert_close(out.nan_to_num(), ref.nan_to_num(), torch.float32 if dtype == torch.float32 else dtype)
