"""Triton `resample_draw`: per-token draws of resampled columns from the counter-based stream.

One program per block of tokens; each holds a [BLOCK_T, BLOCK_F] tile of (token, column) cells. The
hash is native uint32 arithmetic (wrapping multiplies), the sample index the high word of a 32 x 32-bit
product, so every cell is bit-identical to `reference.resample_draw`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from steerkernels import _util
from steerkernels._util import next_pow2


@triton.jit
def _mix32(x):
    """Wellons' lowbias32 on uint32 (reference.mix32)."""
    x ^= x >> 16
    x *= tl.full((), 0x7FEB352D, tl.uint32)
    x ^= x >> 15
    x *= tl.full((), 0x846CA68B, tl.uint32)
    x ^= x >> 16
    return x


@triton.jit
def _low32(x):
    """The low 32 bits of int64 `x` as uint32."""
    return (x & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def _resample_draw_kernel(
    out_ptr, stride_o, slot_ptr, key_ptr, pos_ptr, T,
    stream_ptr, stride_st, dens_ptr, stride_de, cnt_ptr, stride_ct, smp_ptr, stride_ss, stride_sf, S, F, N,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    tm = t < T
    slot = tl.load(slot_ptr + t, mask=tm, other=-1).to(tl.int64)
    ok = (slot >= 0) & (slot < S)
    slot = tl.where(ok, slot, 0)
    key = tl.load(key_ptr + t, mask=tm, other=0)
    pos = tl.load(pos_ptr + t, mask=tm, other=0)
    j = tl.arange(0, BLOCK_F)  # [BF]
    cell = ok[:, None] & (j < F)[None, :]  # [BT, BF]
    at = slot[:, None] * stride_st + j[None, :]
    st = tl.load(stream_ptr + at, mask=cell, other=-1)  # int64
    key_lo = _low32(key)[:, None]
    key_hi = _low32(key >> 32)[:, None]  # NOTE: >> is arithmetic on int64; the mask keeps 32 bits
    base = _mix32(_mix32(_mix32(_low32(pos)[:, None]) ^ _low32(st)) ^ key_lo) ^ key_hi
    h1 = _mix32(base)
    h2 = _mix32(base ^ tl.full((), 0x9E3779B9, tl.uint32))
    u = (h1 >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24: exact
    dens = tl.load(dens_ptr + slot[:, None] * stride_de + j[None, :], mask=cell, other=0.0)
    cnt = tl.load(cnt_ptr + slot[:, None] * stride_ct + j[None, :], mask=cell, other=0).to(tl.int64)
    cnt = tl.minimum(tl.maximum(cnt, 0), N)
    active = cell & (st >= 0) & (u < dens) & (cnt > 0)
    idx = ((h2.to(tl.uint64) * cnt.to(tl.uint64)) >> 32).to(tl.int64)  # < cnt <= N
    smp = smp_ptr + slot[:, None] * stride_ss + j[None, :] * stride_sf + idx
    v = tl.load(smp, mask=active, other=0.0)
    out = tl.where(cell & (st >= 0), v, float("nan"))
    o = out_ptr + t.to(tl.int64)[:, None] * stride_o + j[None, :]
    tl.store(o, out, mask=tm[:, None] & (j < F)[None, :])


def resample_draw(slot_of_token, token_key, token_pos, stream, density, samples, sample_count):
    T = slot_of_token.shape[0]
    S, F, N = samples.shape
    out = _util.empty((T, F), torch.float32, samples.device)
    if T == 0 or F == 0:
        return out
    if S == 0:
        return out.fill_(float("nan"))
    # NOTE: kernels index the last dim (and 1-D operands) with unit stride; the banks are small to copy
    slot, key, pos = slot_of_token.contiguous(), token_key.contiguous(), token_pos.contiguous()
    stream, density, count = stream.contiguous(), density.contiguous(), sample_count.contiguous()
    samples = samples if samples.stride(2) == 1 else samples.contiguous()
    block_f = next_pow2(F)
    block_t = max(1, min(64, 1024 // block_f))
    _resample_draw_kernel[(triton.cdiv(T, block_t),)](
        out, out.stride(0), slot, key, pos, T,
        stream, stream.stride(0), density, density.stride(0), count, count.stride(0),
        samples, samples.stride(0), samples.stride(1), S, F, N,
        BLOCK_T=block_t, BLOCK_F=block_f,
    )  # fmt: skip
    return out
