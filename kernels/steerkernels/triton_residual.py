"""Triton kernels of the residual-stream ops: `steer_add`, `project_clamp`, `sae_edit` (both with optional
per-token targets, `token_value`), and the gates' `sae_feature_acts` (reads h, writes a new [T, F] tensor).

Each kernel edits `h [T, d]` in place, one program per token (steer_add: per token and d-block). A
token whose slot is -1 / out of range loads nothing and stores nothing, so unsteered tokens cost one
scalar load. All arithmetic is fp32; stores round to h's
dtype once. Launchers take arguments already checked by `steerkernels` and pass explicit strides, so
weight banks may be views (e.g. `W_enc` given as `W_enc_t.t()`).

NOTE: a per-token predicate joins a vector mask as `offs < where(pred, d, 0)`, never `mask & pred`:
as cheap on GPU, and the CPU interpreter (triton 3.9) splats scalar comparison results as int32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from steerkernels import _util
from steerkernels._util import next_pow2


@triton.jit
def _token_slot(slot_ptr, t, T, S):
    """(slot clamped to a valid row, steered?) for token(s) t (scalar or vector); t >= T and bad slot
    ids are unsteered."""
    slot = tl.load(slot_ptr + t, mask=t < T, other=-1).to(tl.int32)
    ok = (slot >= 0) & (slot < S)
    slot = tl.where(ok, slot, 0)
    return slot.to(tl.int64), ok


@triton.jit
def _steer_add_kernel(
    h_ptr, stride_h, slot_ptr, T, vec_ptr, stride_v, S, d, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    slot, ok = _token_slot(slot_ptr, t, T, S)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = offs < tl.where(ok, d, 0)  # NOTE: scalar predicates enter masks as a length (see module doc)
    row = h_ptr + t.to(tl.int64) * stride_h
    x = tl.load(row + offs, mask=m).to(tl.float32)
    v = tl.load(vec_ptr + slot * stride_v + offs, mask=m)
    tl.store(row + offs, (x + v).to(h_ptr.dtype.element_ty), mask=m)


@triton.jit
def _project_clamp_kernel(
    h_ptr, stride_h, slot_ptr, T,
    dir_ptr, stride_ds, stride_dk, lo_ptr, hi_ptr, stride_ls, stride_hs, cnt_ptr, S, K, d,
    tv_ptr, stride_tv, HAS_TV: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    slot, ok = _token_slot(slot_ptr, t, T, S)
    n = tl.load(cnt_ptr + slot, mask=ok, other=0).to(tl.int32)
    n = tl.minimum(tl.maximum(n, 0), K)
    offs = tl.arange(0, BLOCK_D)
    m = offs < tl.where(n > 0, d, 0)
    row = h_ptr + t.to(tl.int64) * stride_h
    x = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)  # [d]
    for k in range(0, n):
        u = tl.load(dir_ptr + slot * stride_ds + k * stride_dk + offs, mask=m, other=0.0)  # [d]
        c = tl.sum(x * u, axis=0)
        lo = tl.load(lo_ptr + slot * stride_ls + k)
        hi = tl.load(hi_ptr + slot * stride_hs + k)
        if HAS_TV:  # a per-token target (not NaN): lo = hi = it
            tv = tl.load(tv_ptr + t.to(tl.int64) * stride_tv + k)
            lo = tl.where(tv != tv, lo, tv)
            hi = tl.where(tv != tv, hi, tv)
        x += (tl.minimum(tl.maximum(c, lo), hi) - c) * u
    tl.store(row + offs, x.to(h_ptr.dtype.element_ty), mask=m)


@triton.jit
def _encode_feature(
    xin, offs, offs64, ok, feat_at, wenc_ptr, stride_ed, stride_ef, benc_ptr, thr_ptr, tok_thr, d_sae, d,
    HAS_THR: tl.constexpr, HAS_TTHR: tl.constexpr,
):  # fmt: skip
    """(f, valid, d-mask, activation) of the feature id at `feat_at` on encoder input `xin` [d]:
    relu(pre) * (pre > thr[f]) with HAS_THR * (pre > tok_thr) with HAS_TTHR (reference.activation);
    an invalid id (padding, out of range, no slot) reads nothing."""
    f = tl.load(feat_at, mask=ok, other=-1).to(tl.int64)
    fv = ok & (f >= 0) & (f < d_sae)
    f = tl.where(fv, f, 0)
    mf = offs < tl.where(fv, d, 0)
    w = tl.load(wenc_ptr + offs64 * stride_ed + f * stride_ef, mask=mf, other=0.0).to(tl.float32)
    pre = tl.sum(xin * w, axis=0) + tl.load(benc_ptr + f, mask=fv, other=0.0).to(tl.float32)
    a = tl.maximum(pre, 0.0)
    if HAS_THR:
        thr = tl.load(thr_ptr + f, mask=fv, other=0.0).to(tl.float32)
        a = a * (pre > thr).to(tl.float32)
    if HAS_TTHR:
        a = a * (pre > tok_thr).to(tl.float32)
    return f, fv, mf, a


@triton.jit
def _sae_edit_kernel(
    h_ptr, stride_h, slot_ptr, T,
    feat_ptr, stride_fs, mode_ptr, stride_ms, val_ptr, stride_vs, S, F,
    wenc_ptr, stride_ed, stride_ef, benc_ptr, wdec_ptr, stride_df, stride_dd, bdec_ptr, thr_ptr, tthr_ptr,
    tv_ptr, stride_tv, d_sae, d, HAS_THR: tl.constexpr, HAS_TTHR: tl.constexpr, HAS_TV: tl.constexpr,
    APPLY_B_DEC: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # NOTE: one program per token, also at prefill sizes: a 16-token tl.dot variant for blocks of one slot
    # (weights read once per block) measured 1.3-2x slower on an H100 (fewer programs, latency-bound).
    t = tl.program_id(0)
    slot, ok = _token_slot(slot_ptr, t, T, S)
    offs = tl.arange(0, BLOCK_D)
    md = offs < tl.where(ok, d, 0)
    row = h_ptr + t.to(tl.int64) * stride_h
    x = tl.load(row + offs, mask=md, other=0.0).to(tl.float32)  # [d]
    xin = x
    if APPLY_B_DEC:
        xin = x - tl.load(bdec_ptr + offs, mask=md, other=0.0).to(tl.float32)
    tok_thr = 0.0
    if HAS_TTHR:
        tok_thr = tl.load(tthr_ptr + t, mask=ok, other=0.0)
    delta = tl.zeros([BLOCK_D], dtype=tl.float32)
    n_valid = tl.full((), 0, tl.int32)
    offs64 = offs.to(tl.int64)  # NOTE: d * d_sae may exceed 2**31 elements
    # NOTE: every feature is encoded from the unedited x; edits only accumulate into delta.
    for j in range(0, F):
        f, fv, mf, a = _encode_feature(
            xin, offs, offs64, ok, feat_ptr + slot * stride_fs + j, wenc_ptr, stride_ed, stride_ef,
            benc_ptr, thr_ptr, tok_thr, d_sae, d, HAS_THR, HAS_TTHR,
        )  # fmt: skip
        v = tl.load(val_ptr + slot * stride_vs + j, mask=fv, other=0.0)
        new = tl.where(tl.load(mode_ptr + slot * stride_ms + j, mask=fv, other=0) == 1, a * v, v)
        if HAS_TV:  # a per-token target (not NaN) overrides the slot's mode/value
            tv = tl.load(tv_ptr + t.to(tl.int64) * stride_tv + j, mask=fv, other=float("nan"))
            new = tl.where(tv != tv, new, tv)
        coef = tl.where(fv, new - a, 0.0)
        wd = tl.load(wdec_ptr + f * stride_df + offs64 * stride_dd, mask=mf, other=0.0).to(tl.float32)
        delta += coef * wd
        n_valid += fv.to(tl.int32)
    tl.store(row + offs, (x + delta).to(h_ptr.dtype.element_ty), mask=offs < tl.where(n_valid > 0, d, 0))


@triton.jit
def _sae_feature_acts_kernel(
    h_ptr, stride_h, slot_ptr, T, out_ptr, stride_o, feat_ptr, stride_fs, S, F,
    wenc_ptr, stride_ed, stride_ef, benc_ptr, bdec_ptr, thr_ptr, tthr_ptr, d_sae, d,
    HAS_THR: tl.constexpr, HAS_TTHR: tl.constexpr, APPLY_B_DEC: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int32)
    ok = (slot >= 0) & (slot < S)
    slot = tl.where(ok, slot, 0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    md = offs < tl.where(ok, d, 0)
    x = tl.load(h_ptr + t.to(tl.int64) * stride_h + offs, mask=md, other=0.0).to(tl.float32)
    if APPLY_B_DEC:
        x = x - tl.load(bdec_ptr + offs, mask=md, other=0.0).to(tl.float32)
    offs64 = offs.to(tl.int64)
    tok_thr = 0.0
    if HAS_TTHR:
        tok_thr = tl.load(tthr_ptr + t, mask=ok, other=0.0)
    for j in range(0, F):
        _, fv, _, a = _encode_feature(
            x, offs, offs64, ok, feat_ptr + slot * stride_fs + j, wenc_ptr, stride_ed, stride_ef,
            benc_ptr, thr_ptr, tok_thr, d_sae, d, HAS_THR, HAS_TTHR,
        )  # fmt: skip
        tl.store(out_ptr + t.to(tl.int64) * stride_o + j, tl.where(fv, a, float("nan")))


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def steer_add(h, slot_of_token, slot_vectors):
    T, d = h.shape
    if T == 0 or d == 0 or slot_vectors.shape[0] == 0:
        return h
    slot = slot_of_token.contiguous()  # NOTE: kernels index 1-D operands with unit stride
    slot_vectors = slot_vectors if slot_vectors.stride(1) == 1 else slot_vectors.contiguous()
    block = min(next_pow2(d), 1024)
    _steer_add_kernel[(T, triton.cdiv(d, block))](
        h, h.stride(0), slot, T, slot_vectors, slot_vectors.stride(0),
        slot_vectors.shape[0], d, BLOCK_D=block, num_warps=_warps(block),
    )  # fmt: skip
    return h


def project_clamp(h, slot_of_token, slot_dirs, lo, hi, dir_count, token_value=None):
    T, d = h.shape
    S, K, _ = slot_dirs.shape
    if T == 0 or d == 0 or S == 0 or K == 0:
        return h
    slot = slot_of_token.contiguous()
    block = next_pow2(d)
    # NOTE: directions must be contiguous along d for coalesced loads; [S, K] banks are tiny to copy.
    slot_dirs = slot_dirs if slot_dirs.stride(2) == 1 else slot_dirs.contiguous()
    lo, hi, dir_count = lo.contiguous(), hi.contiguous(), dir_count.contiguous()
    has_tv = token_value is not None
    tv = token_value.contiguous() if has_tv else lo  # a stand-in pointer, never read
    _project_clamp_kernel[(T,)](
        h, h.stride(0), slot, T, slot_dirs, slot_dirs.stride(0), slot_dirs.stride(1),
        lo, hi, lo.stride(0), hi.stride(0), dir_count, S, K, d, tv, tv.stride(0),
        HAS_TV=has_tv, BLOCK_D=block, num_warps=_warps(block),
    )  # fmt: skip
    return h


def sae_edit(
    h, slot_of_token, feat_idx, W_enc, b_enc, W_dec, b_dec, threshold, apply_b_dec_to_input,
    mode, value, token_threshold=None, token_value=None,
):  # fmt: skip
    T, d = h.shape
    S, F = feat_idx.shape
    if T == 0 or d == 0 or S == 0 or F == 0:
        return h
    slot = slot_of_token.contiguous()
    feat_idx, mode, value = feat_idx.contiguous(), mode.contiguous(), value.contiguous()
    b_enc, b_dec = b_enc.contiguous(), b_dec.contiguous()
    has_thr = threshold is not None
    threshold = threshold.contiguous() if has_thr else b_enc  # a stand-in pointer, never read
    has_tthr = token_threshold is not None
    tok_thr = token_threshold.contiguous() if has_tthr else b_enc  # likewise
    has_tv = token_value is not None
    tv = token_value.contiguous() if has_tv else value  # likewise
    block = next_pow2(d)
    _sae_edit_kernel[(T,)](
        h, h.stride(0), slot, T,
        feat_idx, feat_idx.stride(0), mode, mode.stride(0), value, value.stride(0), S, F,
        W_enc, W_enc.stride(0), W_enc.stride(1), b_enc, W_dec, W_dec.stride(0), W_dec.stride(1),
        b_dec, threshold, tok_thr, tv, tv.stride(0), W_enc.shape[1], d,
        HAS_THR=has_thr, HAS_TTHR=has_tthr, HAS_TV=has_tv, APPLY_B_DEC=bool(apply_b_dec_to_input),
        BLOCK_D=block, num_warps=_warps(block),
    )  # fmt: skip
    return h


def sae_feature_acts(
    h, slot_of_token, feat_idx, W_enc, b_enc, b_dec, threshold, apply_b_dec_to_input, token_threshold=None
):
    T, d = h.shape
    S, F = feat_idx.shape
    out = _util.empty((T, F), torch.float32, h.device)
    if T == 0 or F == 0:
        return out
    if S == 0 or d == 0:
        return out.fill_(float("nan"))
    slot, feat_idx = slot_of_token.contiguous(), feat_idx.contiguous()
    b_enc, b_dec = b_enc.contiguous(), b_dec.contiguous()
    has_thr = threshold is not None
    threshold = threshold.contiguous() if has_thr else b_enc  # a stand-in pointer, never read
    has_tthr = token_threshold is not None
    tok_thr = token_threshold.contiguous() if has_tthr else b_enc  # likewise
    block = next_pow2(d)
    _sae_feature_acts_kernel[(T,)](
        h, h.stride(0), slot, T, out, out.stride(0), feat_idx, feat_idx.stride(0), S, F,
        W_enc, W_enc.stride(0), W_enc.stride(1), b_enc, b_dec, threshold, tok_thr, W_enc.shape[1], d,
        HAS_THR=has_thr, HAS_TTHR=has_tthr, APPLY_B_DEC=bool(apply_b_dec_to_input), BLOCK_D=block,
        num_warps=_warps(block),
    )  # fmt: skip
    return out
