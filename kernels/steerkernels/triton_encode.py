"""Triton `sae_encode_topk`: fused SAE encoder and per-token top-k, one activation tile at a time.

Grid (token blocks, feature splits). A program owns BT tile rows (tokens; see FOLD) and a contiguous
range of feature tiles; for each [BT, BN] tile it computes the activations with `tl.dot`, packs
(value, index) into one int64 key per element (order-preserving), and merges the tile into a running
top-KP in registers with `tl.topk`. Each split writes KP candidates per token; a final `torch.topk` over
n_split * KP candidates picks k (skipped when there is one split). Memory: candidates are
[T, n_split, KP], never [T, d_sae].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from steerkernels import _util


@triton.jit
def _pack(v, idx):
    """int64 keys that sort like fp32 `v`; ties put the lower index first."""
    b = v.to(tl.int32, bitcast=True)
    key = b ^ ((b >> 31) & 0x7FFFFFFF)  # NOTE: flips negative floats so signed int order = float order
    return (key.to(tl.int64) << 32) | (0x7FFFFFFF - idx).to(tl.int64)


@triton.jit
def _unpack(keys):
    hi = (keys >> 32).to(tl.int32)
    v = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    return v, 0x7FFFFFFF - (keys & 0x7FFFFFFF)


@triton.jit
def _encode_topk_kernel(
    x_ptr, stride_xt, stride_xd, w_ptr, stride_wd, stride_wn, benc_ptr, bdec_ptr, thr_ptr,
    cand_v_ptr, cand_i_ptr, T, d, d_sae, n_tiles, tiles_per_split, n_split,
    HAS_THR: tl.constexpr, RANK_PRE: tl.constexpr, APPLY_B_DEC: tl.constexpr, DOT_16BIT: tl.constexpr,
    FOLD: tl.constexpr,
    PRECISION: tl.constexpr, BT: tl.constexpr, TOK: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    KP: tl.constexpr,
):  # fmt: skip
    # NOTE: FOLD (16-bit dot with b_dec): (x - b_dec) @ W = x @ W - b_dec @ W keeps the dot exact in
    # fp32; b_dec @ W comes from the same dot as tile rows BT-2 (b_dec rounded) and BT-1 (its residual),
    # so a tile holds TOK = BT - 2 tokens.
    split = tl.program_id(1)
    r = tl.arange(0, BT)
    rows = tl.program_id(0) * TOK + r
    rm = (r < TOK) & (rows < T)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xt
    run = _pack(tl.full([BT, KP], float("-inf"), tl.float32), tl.zeros([BT, KP], dtype=tl.int32))
    first = split * tiles_per_split
    for tile in range(first, tl.minimum(first + tiles_per_split, n_tiles)):
        cols = tile * BN + tl.arange(0, BN)
        cm = cols < d_sae
        acc = tl.zeros([BT, BN], dtype=tl.float32)
        for k0 in range(0, d, BK):
            ks = k0 + tl.arange(0, BK)
            km = ks < d
            xt = tl.load(x_rows + ks[None, :] * stride_xd, mask=rm[:, None] & km[None, :], other=0.0)
            w_off = ks.to(tl.int64)[:, None] * stride_wd + cols[None, :] * stride_wn
            w = tl.load(w_ptr + w_off, mask=km[:, None] & cm[None, :], other=0.0)  # [BK, BN]
            if DOT_16BIT:
                if FOLD:
                    bd = tl.load(bdec_ptr + ks, mask=km, other=0.0).to(tl.float32)
                    bd_hi = bd.to(xt.dtype)
                    bd_lo = (bd - bd_hi.to(tl.float32)).to(xt.dtype)
                    xt = tl.where(r[:, None] == BT - 2, bd_hi[None, :], xt)
                    xt = tl.where(r[:, None] == BT - 1, bd_lo[None, :], xt)
                acc = tl.dot(xt, w, acc)
            else:
                xt = xt.to(tl.float32)
                if APPLY_B_DEC:
                    bd = tl.load(bdec_ptr + ks, mask=km, other=0.0).to(tl.float32)
                    xt = tl.where(km[None, :], xt - bd[None, :], 0.0)
                acc = tl.dot(xt, w.to(tl.float32), acc, input_precision=PRECISION)
        if FOLD:
            acc -= tl.sum(tl.where(r[:, None] >= BT - 2, acc, 0.0), axis=0)[None, :]
        pre = acc + tl.load(benc_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
        if RANK_PRE:  # TopK: the largest pre-activations as they are (the wrapper applies relu and k)
            act = pre
        else:  # relu(pre) * (pre > thr): SAELens keeps the relu below a negative jumprelu threshold
            thr = tl.zeros([BN], dtype=tl.float32)
            if HAS_THR:
                thr = tl.load(thr_ptr + cols, mask=cm, other=0.0).to(tl.float32)
            act = tl.where((pre > thr[None, :]) & (pre > 0.0), pre, 0.0)
        act = tl.where(cm[None, :], act, float("-inf"))
        keys = _pack(act, tl.broadcast_to(cols[None, :], [BT, BN]))
        if BN > KP:
            keys = tl.topk(keys, KP)
        run = tl.topk(tl.reshape(tl.join(run, keys), [BT, 2 * KP]), KP)
    v, idx = _unpack(run)
    out = rows.to(tl.int64)[:, None] * (n_split * KP) + split * KP + tl.arange(0, KP)[None, :]
    tl.store(cand_v_ptr + out, v, mask=rm[:, None])
    tl.store(cand_i_ptr + out, idx, mask=rm[:, None])


def sae_encode_topk(x, W_enc, b_enc, b_dec, threshold, apply_b_dec_to_input, k, rank_pre=False):
    T, d = x.shape
    d_sae = W_enc.shape[1]
    dev = x.device
    if T == 0:
        return torch.empty(0, k, dtype=torch.float32, device=dev), torch.empty(
            0, k, dtype=torch.int64, device=dev
        )
    kp = _util.next_pow2(k)
    # NOTE: the CPU interpreter (triton 3.9) multiplies bf16 tiles as raw uint16, so there bf16 takes the
    # (numerically equivalent) fp32 path; fp16 and CUDA use the 16-bit dot.
    dot_16bit = x.dtype == W_enc.dtype and x.dtype != torch.float32
    dot_16bit = dot_16bit and (dev.type == "cuda" or x.dtype == torch.float16)
    fold = dot_16bit and apply_b_dec_to_input
    spare = 2 if fold else 0  # tile rows that carry b_dec
    bt = 16 if T + spare <= 16 else 32 if T + spare <= 32 else 64
    bn = max(kp, min(128, _util.next_pow2(d_sae)), 16)
    bk = min(64, max(16, _util.next_pow2(d)))
    n_tiles = triton.cdiv(d_sae, bn)
    n_tok = triton.cdiv(T, bt - spare)
    # NOTE: enough programs to fill the device; each split adds KP candidates per token.
    n_split = max(1, min(n_tiles, triton.cdiv(4 * _util.num_sms(dev), n_tok)))
    tiles_per_split = triton.cdiv(n_tiles, n_split)
    n_split = triton.cdiv(n_tiles, tiles_per_split)
    precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    b_enc, b_dec = b_enc.contiguous(), b_dec.contiguous()  # NOTE: indexed with unit stride
    threshold = threshold.contiguous() if threshold is not None else None
    cand_v = _util.empty((T, n_split, kp), torch.float32, dev)
    cand_i = _util.empty((T, n_split, kp), torch.int64, dev)
    _encode_topk_kernel[(n_tok, n_split)](
        x, x.stride(0), x.stride(1), W_enc, W_enc.stride(0), W_enc.stride(1), b_enc, b_dec,
        threshold if threshold is not None else b_enc, cand_v, cand_i, T, d, d_sae, n_tiles,
        tiles_per_split, n_split, HAS_THR=threshold is not None, RANK_PRE=bool(rank_pre),
        APPLY_B_DEC=bool(apply_b_dec_to_input),
        DOT_16BIT=dot_16bit, FOLD=fold, PRECISION=precision, BT=bt, TOK=bt - spare, BN=bn, BK=bk, KP=kp,
        num_warps=4 if bn * bt < 8192 else 8,
    )  # fmt: skip
    if n_split == 1:
        # NOTE: one split's merge is already sorted descending
        return cand_v[:, 0, :k].contiguous(), cand_i[:, 0, :k].contiguous()
    values, pos = torch.topk(cand_v.view(T, -1), k, dim=1)
    return values, cand_i.view(T, -1).gather(1, pos)
