"""Triton kernels of `write_kv` and `paged_attention` (specified in `paged_attention`).

write_kv: one program per token copies its [H_kv, hd] key and value into cache row slot_mapping[t];
a slot outside [0, R) loads and stores nothing.

paged_attention: one program per (q-block, kv head), vLLM's unified-attention layout. A q-block is up to
BLOCK_Q consecutive query rows of one seq; its tile of BLOCK_M = BLOCK_Q * GROUP rows holds each row's
GROUP = H / H_kv query heads that share the kv head, so every key and value is loaded once per (q-block,
kv head): decode rows fill GROUP rows of the tile, chunked-prefill rows all of it. The program walks the
keys its rows see in tiles of BLOCK_N with an online softmax (flash-decoding without the split), each
tile's cache rows gathered through the block table. Decode and prefill rows of any seq share one launch:
the grid (T // BLOCK_Q + N + 1, H_kv) depends only on shapes, a program finds its seq by a binary search
over query_start_loc and reads its loop bounds from device memory: no host sync, CUDA-graph capturable.
The programs past the last seq's q-blocks store zeros on the padding rows after query_start_loc[N].

NOTE: a per-row predicate joins a vector mask as `offs < where(pred, n, 0)`, never `mask & pred`:
the CPU interpreter (triton 3.9) splats scalar comparison results as int32 (see triton_residual).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from steerkernels._util import next_pow2


@triton.jit
def _write_kv_kernel(
    key_ptr, stride_kt, stride_kh, val_ptr, stride_vt, stride_vh, kc_ptr, vc_ptr, slot_ptr, R, H_kv, hd,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    ok = (slot >= 0) & (slot < R)
    slot = tl.where(ok, slot, 0)
    h = tl.arange(0, BLOCK_H).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    m = (h[:, None] < H_kv) & (d[None, :] < tl.where(ok, hd, 0))
    k = tl.load(key_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=m)
    v = tl.load(val_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=m)
    at = h[:, None] * R * hd + slot * hd + d[None, :]  # [H_kv, R, hd] contiguous
    tl.store(kc_ptr + at, k.to(kc_ptr.dtype.element_ty), mask=m)
    tl.store(vc_ptr + at, v.to(vc_ptr.dtype.element_ty), mask=m)


@triton.jit
def _tanh(x):
    # NOTE: tl has no tanh that the interpreter runs; exp overflow gives the right limits (+-1)
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _find_seq(qsl_ptr, b, N, BLOCK_Q: tl.constexpr):
    """The last seq i whose first q-block (qsl[i] // BLOCK_Q + i) is <= b: a binary search (vLLM's)."""
    left = 0
    right = N
    while left < right:
        mid = (left + right) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= b:
            left = mid + 1
        else:
            right = mid
    return tl.maximum(left - 1, 0)


@triton.jit
def _paged_attention_kernel(
    q_ptr, stride_qt, stride_qh, kc_ptr, vc_ptr, R, hd, bt_ptr, stride_bs, stride_bb, max_blocks,
    seq_lens_ptr, qsl_ptr, tseq_ptr, N, T, out_ptr, stride_ot, stride_oh, block_size, scale, softcap, window,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_16BIT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    # Seq i owns q-blocks [qsl[i] // BLOCK_Q + i, qsl[i+1] // BLOCK_Q + i + 1); the programs past the
    # last seq's blocks zero the rows after qsl[N] (padding rows), BLOCK_Q each.
    seq = _find_seq(qsl_ptr, b, N, BLOCK_Q)
    q_start = tl.load(qsl_ptr + seq).to(tl.int64)
    q_end = tl.load(qsl_ptr + seq + 1).to(tl.int64)
    q_all = tl.load(qsl_ptr + N).to(tl.int64)
    n_used = q_all // BLOCK_Q + N
    tail = b >= n_used
    first = tl.where(tail, q_all + (b - n_used) * BLOCK_Q, q_start + (b - q_start // BLOCK_Q - seq) * BLOCK_Q)
    row_end = tl.where(tail, T, q_end)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int64)

    m_offs = tl.arange(0, BLOCK_M)  # tile row m: query row first + m // GROUP, head m % GROUP
    d = tl.arange(0, BLOCK_D)
    md = d < hd
    rows = first + m_offs // GROUP
    store = (m_offs < BLOCK_Q * GROUP) & (rows < row_end)
    row_seq = tl.load(tseq_ptr + rows, mask=store, other=-1)
    pos = seq_len - (q_end - rows)
    # NOTE: tail rows compare with -2, which no token_seq holds: computed rows are the seq's own
    mine = store & (row_seq == tl.where(tail, -2, seq)) & (pos >= 0)
    hi_m = tl.where(mine, pos + 1, 0)  # per tile row, keys [lo_m, hi_m)
    lo_m = tl.zeros([BLOCK_M], dtype=tl.int64)
    if HAS_WINDOW:
        lo_m = tl.maximum(hi_m - window, 0)
    lo_m = tl.where(mine, lo_m, 2**62)
    hi = tl.max(hi_m, axis=0)
    lo = tl.minimum(tl.min(lo_m, axis=0), hi)
    heads = kvh * GROUP + m_offs % GROUP
    q_at = q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_at, mask=mine[:, None] & md[None, :], other=0.0)
    if not DOT_16BIT:
        q = q.to(tl.float32)
    k_base = kc_ptr + kvh * R * hd
    v_base = vc_ptr + kvh * R * hd
    bt_row = bt_ptr + seq * stride_bs

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        blk_i = j // block_size
        mj = (j >= lo) & (j < hi) & (blk_i < max_blocks)
        blk = tl.load(bt_row + blk_i * stride_bb, mask=mj, other=0).to(tl.int64)
        row = blk * block_size + j % block_size
        mj = mj & (row >= 0) & (row < R)  # NOTE: a bad block id reads nothing
        row = tl.where(mj, row, 0)
        mkv = mj[:, None] & md[None, :]
        k = tl.load(k_base + row[:, None] * hd + d[None, :], mask=mkv, other=0.0)
        v = tl.load(v_base + row[:, None] * hd + d[None, :], mask=mkv, other=0.0)
        if DOT_16BIT:
            s = tl.dot(q, tl.trans(k))
        else:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=PRECISION)
        s = s * scale
        if HAS_SOFTCAP:
            s = _tanh(s / softcap) * softcap
        seen = mj[None, :] & (j[None, :] >= lo_m[:, None]) & (j[None, :] < hi_m[:, None])
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # NOTE: no key yet: exp(-inf - 0) = 0
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_16BIT:
            pv = tl.dot(p.to(v.dtype), v)
        else:
            pv = tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    res = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # no key seen: acc is 0, so zeros
    o_at = out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(o_at, res.to(out_ptr.dtype.element_ty), mask=store[:, None] & md[None, :])


def write_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    T, H_kv, hd = key.shape
    if T == 0 or k_cache.numel() == 0:
        return
    _write_kv_kernel[(T,)](
        key, key.stride(0), key.stride(1), value, value.stride(0), value.stride(1), k_cache, v_cache,
        slot_mapping.contiguous(), k_cache.shape[1], H_kv, hd,
        BLOCK_H=next_pow2(H_kv), BLOCK_D=next_pow2(hd), num_warps=4,
    )  # fmt: skip


def paged_attention(
    query, k_cache, v_cache, block_table, seq_lens, query_start_loc, token_seq,
    block_size, scale, sliding_window, softcap, out,
):  # fmt: skip
    T, H, hd = query.shape
    H_kv, R, _ = k_cache.shape
    if T == 0 or H == 0 or hd == 0:
        return out
    N = block_table.shape[0]
    if N == 0:
        return out.zero_()
    group = H // H_kv
    # NOTE: tl.dot needs tiles of at least 16 on GPU. A tile holds BLOCK_Q query rows of one seq times
    # their GROUP heads (vLLM's layout): decode fills GROUP rows of it, prefill all, so prefill rows share
    # every key and value load. Unused tile rows load zeros and are not stored.
    block_m = 16 if group <= 16 else next_pow2(group)
    block_q = block_m // group
    block_d = max(16, next_pow2(hd))
    block_n = 64 if block_d <= 64 else 32
    # NOTE: the CPU interpreter (triton 3.9) multiplies bf16 tiles as raw uint16 (see triton_encode), so
    # there bf16 takes the fp32 path; fp16 and CUDA use the 16-bit dot.
    dot_16bit = query.dtype != torch.float32 and (query.device.type == "cuda" or query.dtype == torch.float16)
    precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    # NOTE: seq i's blocks start at qsl[i] // block_q + i, so T // block_q + N + 1 programs cover every
    # seq's rows and the padding rows after them, whatever the split: the grid depends on shapes only.
    grid = (T // block_q + N + 1, H_kv)
    _paged_attention_kernel[grid](
        query, query.stride(0), query.stride(1), k_cache, v_cache, R, hd,
        block_table, block_table.stride(0), block_table.stride(1), block_table.shape[1],
        seq_lens.contiguous(), query_start_loc.contiguous(), token_seq.contiguous(), N, T,
        out, out.stride(0), out.stride(1), block_size, scale, 1.0 if softcap is None else softcap,
        0 if sliding_window is None else sliding_window,
        GROUP=group, BLOCK_Q=block_q, HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=softcap is not None,
        DOT_16BIT=dot_16bit, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=4 if block_d <= 128 else 8,
    )  # fmt: skip
    return out
