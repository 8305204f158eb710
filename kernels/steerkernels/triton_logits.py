"""Triton `apply_logit_bias`: biases, penalties and temperature over `[R, V]` fp32 logits, in place.

Three launches on one stream, so each sees the previous one finished:
  1. listed:  for every sparse / penalty entry (row r, token id), compute its FINAL value from the
              original logits (x + sparse sum at id + dense at id, penalties, / temperature) into a
              scratch [R, S + P]; duplicate ids compute identical values.
  2. dense:   one pass over each row that has a dense bias or temperature != 1: (x + dense) / temperature.
              Rows with neither load and store nothing.
  3. scatter: write the scratch values over the listed ids.
NOTE: step 1 runs before step 2 overwrites the row, so penalties see the pre-temperature biased logit
without a per-element lookup in the dense pass. Ids outside [0, V) and bank rows outside [0, B) are
masked: they read and write nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from steerkernels import _util


@triton.jit
def _listed_kernel(
    logits_ptr, stride_l, V, temp_ptr,
    sid_ptr, sbias_ptr, S, bank_ptr, stride_b, B, didx_ptr, D,
    pid_ptr, pcnt_ptr, P, rp_ptr, pres_ptr, freq_ptr, out_ptr, n_sblocks,
    BE: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)
    eb = tl.program_id(1)
    is_sparse = eb < n_sblocks
    if is_sparse:
        e = eb * BE + tl.arange(0, BE)
        em = e < S
        ids = tl.load(sid_ptr + r * S + e, mask=em, other=-1).to(tl.int64)
        out_col = e
    else:
        e = (eb - n_sblocks) * BE + tl.arange(0, BE)
        em = e < P
        ids = tl.load(pid_ptr + r * P + e, mask=em, other=-1).to(tl.int64)
        out_col = S + e
    valid = em & (ids >= 0) & (ids < V)
    tok = tl.where(valid, ids, 0)  # [BE]
    x = tl.load(logits_ptr + r.to(tl.int64) * stride_l + tok, mask=valid, other=0.0)
    # (1) sparse: the sum of every entry of this row with the same id (duplicates add up)
    ssum = tl.zeros([BE], dtype=tl.float32)
    for c0 in range(0, S, BC):
        c = c0 + tl.arange(0, BC)
        sid = tl.load(sid_ptr + r * S + c, mask=c < S, other=-1).to(tl.int64)
        sb = tl.load(sbias_ptr + r * S + c, mask=c < S, other=0.0)
        ssum += tl.sum(tl.where(tok[:, None] == sid[None, :], sb[None, :], 0.0), axis=1)
    x = x + ssum
    dsum = tl.zeros([BE], dtype=tl.float32)
    for j in range(0, D):
        bi = tl.load(didx_ptr + r * D + j).to(tl.int64)
        bv = (bi >= 0) & (bi < B)
        mb = tl.where(bv, valid, False)  # NOTE: not `valid & bv` (interpreter splats scalar bools as int32)
        dsum += tl.load(bank_ptr + tl.where(bv, bi, 0) * stride_b + tok, mask=mb, other=0.0)
    x = x + dsum
    # (2) penalties: penalty entries are penalized ids; a sparse entry looks its id up among them
    if is_sparse:
        pen = tl.zeros([BE], dtype=tl.int32)
        cnt = tl.zeros([BE], dtype=tl.int32)
        for c0 in range(0, P, BC):
            c = c0 + tl.arange(0, BC)
            pid = tl.load(pid_ptr + r * P + c, mask=c < P, other=-1).to(tl.int64)
            pc = tl.load(pcnt_ptr + r * P + c, mask=c < P, other=0).to(tl.int32)
            match = tok[:, None] == pid[None, :]
            pen += tl.sum(match.to(tl.int32), axis=1)
            cnt += tl.sum(tl.where(match, pc[None, :], 0), axis=1)
    else:
        pen = valid.to(tl.int32)
        cnt = tl.load(pcnt_ptr + r * P + e, mask=em, other=0).to(tl.int32)
    rp = tl.load(rp_ptr + r)
    cntf = cnt.to(tl.float32)
    y = tl.where(x > 0, x / rp, x * rp)
    y = tl.where(cntf > 0, y - tl.load(pres_ptr + r), y)
    y = y - tl.load(freq_ptr + r) * cntf
    x = tl.where(pen > 0, y, x)
    # (3) temperature
    tl.store(out_ptr + r * (S + P) + out_col, x / tl.load(temp_ptr + r), mask=em)


@triton.jit
def _dense_kernel(
    logits_ptr, stride_l, V, temp_ptr, bank_ptr, stride_b, B, didx_ptr, D, BV: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)
    temp = tl.load(temp_ptr + r)
    n_dense = tl.full((), 0, tl.int32)
    for j in range(0, D):
        bi = tl.load(didx_ptr + r * D + j)
        n_dense += ((bi >= 0) & (bi < B)).to(tl.int32)
    offs = tl.program_id(1) * BV + tl.arange(0, BV)
    m = offs < tl.where((n_dense > 0) | (temp != 1.0), V, 0)
    row = logits_ptr + r.to(tl.int64) * stride_l
    x = tl.load(row + offs, mask=m, other=0.0)
    acc = tl.zeros([BV], dtype=tl.float32)
    for j in range(0, D):
        bi = tl.load(didx_ptr + r * D + j).to(tl.int64)
        bv = (bi >= 0) & (bi < B)
        acc += tl.load(
            bank_ptr + tl.where(bv, bi, 0) * stride_b + offs, mask=tl.where(bv, m, False), other=0.0
        )
    tl.store(row + offs, (x + acc) / temp, mask=m)


@triton.jit
def _scatter_kernel(logits_ptr, stride_l, V, sid_ptr, S, pid_ptr, P, vals_ptr, BE: tl.constexpr):
    r = tl.program_id(0)
    e = tl.program_id(1) * BE + tl.arange(0, BE)
    is_s = e < S
    ids = tl.load(sid_ptr + r * S + e, mask=is_s, other=-1).to(tl.int64)
    pm = (e >= S) & (e < S + P)
    ids = tl.where(is_s, ids, tl.load(pid_ptr + r * P + (e - S), mask=pm, other=-1).to(tl.int64))
    valid = (ids >= 0) & (ids < V)
    v = tl.load(vals_ptr + r * (S + P) + e, mask=valid)
    tl.store(logits_ptr + r.to(tl.int64) * stride_l + tl.where(valid, ids, 0), v, mask=valid)


def _operand(t: torch.Tensor, stand_in: torch.Tensor) -> torch.Tensor:
    """Contiguous `t`, or a stand-in pointer for an empty operand (never dereferenced)."""
    return t.contiguous() if t.numel() else stand_in


def apply_logit_bias(
    logits, temperature, sparse_ids, sparse_bias, dense_bank, dense_idx,
    penalty_ids, penalty_counts, repetition_penalty, presence_penalty, frequency_penalty,
):  # fmt: skip
    R, V = logits.shape
    if R == 0 or V == 0:
        return logits
    S, D, P = sparse_ids.shape[1], dense_idx.shape[1], penalty_ids.shape[1]
    B = dense_bank.shape[0]
    sid, sbias = _operand(sparse_ids, logits), _operand(sparse_bias, logits)
    pid, pcnt = _operand(penalty_ids, logits), _operand(penalty_counts, logits)
    didx = _operand(dense_idx, logits)
    if B == 0 or dense_bank.stride(1) != 1:
        bank = _operand(dense_bank, logits)
    else:
        bank = dense_bank
    stride_b = bank.stride(0) if B else 0
    temp = temperature.contiguous()
    be = 64
    vals = None
    if S + P:
        vals = _util.empty((R, S + P), torch.float32, logits.device)  # [R, S + P]
        n_sblocks = triton.cdiv(S, be)
        _listed_kernel[(R, n_sblocks + triton.cdiv(P, be))](
            logits, logits.stride(0), V, temp, sid, sbias, S, bank, stride_b, B, didx, D,
            pid, pcnt, P, repetition_penalty.contiguous(), presence_penalty.contiguous(),
            frequency_penalty.contiguous(), vals, n_sblocks, BE=be, BC=64,
        )  # fmt: skip
    # NOTE: small batches use smaller blocks so that one row still spreads over many SMs.
    bv = 1024 if R * V < (1 << 22) else 4096
    _dense_kernel[(R, triton.cdiv(V, bv))](
        logits, logits.stride(0), V, temp, bank, stride_b, B, didx, D,
        BV=bv, num_warps=4 if bv == 1024 else 8,
    )  # fmt: skip
    if vals is not None:
        _scatter_kernel[(R, triton.cdiv(S + P, be))](
            logits, logits.stride(0), V, sid, S, pid, P, vals, BE=be
        )  # fmt: skip
    return logits
