"""The CPU decode-attention kernel against torch SDPA, and steerserve_attention's kernel path against its
SDPA path.

Random caches and queries of odd shapes: GQA groups, head dims that are not a multiple of 16, fragmented
(gathered) requests, sliding windows, soft-capping, one-key contexts, many requests; fp32 and bf16 caches
and queries. Kernel outputs are poisoned with NaN first, so a row it forgets to write fails.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from steerkernels import _cbuild
from steerserve.runner import cpu_attention
from steerserve.runner.attention import AttentionMetadata, KVCache, RequestSpan, steerserve_attention
from tests.runner.cpu_isa import expected_isa

LIB = cpu_attention.load()
needs_kernel = pytest.mark.skipif(LIB is None, reason="CPU attention kernel could not be built here")
DTYPES = (torch.float32, torch.bfloat16)


def random_layout(rng: random.Random, n_req: int, cache_rows: int, max_ctx: int, q_lens=(1,)):
    """Disjoint spans over a cache of `cache_rows`: contiguous runs at random offsets in the lower half,
    fragmented requests (every third) scattered over the upper half."""
    spans, q_start, cursor = [], 0, 0
    half = cache_rows // 2
    scattered = list(range(half, cache_rows))
    rng.shuffle(scattered)
    for i in range(n_req):
        q_len = rng.choice(q_lens)
        ctx = rng.randint(q_len, max_ctx)
        if i % 3 == 2:
            rows = torch.tensor([scattered.pop() for _ in range(ctx)], dtype=torch.int64)
            spans.append(RequestSpan(q_start, q_len, ctx, -1, rows))
        else:
            cursor += rng.randint(0, 3)
            assert cursor + ctx <= half, "cache too small for the layout"
            spans.append(RequestSpan(q_start, q_len, ctx, cursor, None))
            cursor += ctx
        q_start += q_len
    return spans, q_start


def span_rows(span: RequestSpan) -> torch.Tensor:
    if span.gather_index is not None:
        return span.gather_index[: span.ctx_len]
    return torch.arange(span.cache_start, span.cache_start + span.ctx_len)


def reference(q, k_cache, v_cache, span, scale, window, softcap):
    """float64 SDPA (eager when soft-capped) of one request's rows `q` [1, H, q, hd] over its keys."""
    rows = span_rows(span)
    k = k_cache[:, rows].double().unsqueeze(0)  # [1, H_kv, ctx, hd]
    v = v_cache[:, rows].double().unsqueeze(0)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    q_pos = torch.arange(span.ctx_len - span.q_len, span.ctx_len)[:, None]
    k_pos = torch.arange(span.ctx_len)[None, :]
    mask = k_pos <= q_pos
    if window:
        mask &= k_pos > q_pos - window
    q = q.double()
    if softcap:
        s = torch.tanh(q @ k.transpose(-1, -2) * scale / softcap) * softcap
        return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def make_case(seed, n_heads, n_kv, hd, n_req, max_ctx, q_dtype, kv_dtype, q_lens=(1,)):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    cache_rows = 2 * (n_req * (max_ctx + 3) + max_ctx)
    spans, n_tokens = random_layout(rng, n_req, cache_rows, max_ctx, q_lens)
    k_cache = torch.randn(n_kv, cache_rows, hd, generator=gen).to(kv_dtype)
    v_cache = torch.randn(n_kv, cache_rows, hd, generator=gen).to(kv_dtype)
    # queries as the models make them: a transposed view of [1, T, H, hd] (non-contiguous)
    q = (torch.randn(1, n_tokens, n_heads, hd, generator=gen) * 2).to(q_dtype).transpose(1, 2)
    return spans, n_tokens, q, k_cache, v_cache


def run_kernel(spans, n_tokens, q, k_cache, v_cache, scale, window, softcap, prefill=True):
    slots = torch.zeros(n_tokens, dtype=torch.int64)
    plan = cpu_attention.StepPlan(spans, slots, n_tokens, k_cache.shape[1], prefill)
    out = torch.full((n_tokens, q.shape[1], q.shape[3]), float("nan"), dtype=q.dtype)  # poisoned
    args = (q, k_cache, v_cache, out, scale, window, softcap)
    if plan.decode.n:
        cpu_attention.decode_attention(LIB, plan.decode, *args)
    if plan.prefill is not None:
        cpu_attention.prefill_attention(LIB, plan.prefill, *args)
    return out, plan


def tolerance(q_dtype, kv_dtype):
    return (2e-2, 2e-2) if torch.bfloat16 in (q_dtype, kv_dtype) else (2e-5, 2e-5)


@needs_kernel
@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("hd", [40, 7])
def test_decode_reads_reads_the_rows_decode_attends(kv_dtype, window, hd):
    """bench_attention's bound (`decode_reads`): the XOR of exactly the cache rows a decode step attends to
    (contiguous and gathered requests, with and without a window), as 64-bit words, each row's last bytes
    zero-padded to a word (head dim 7: 14 or 28 bytes a row)."""
    spans, n_tokens, q, k_cache, v_cache = make_case(3, 6, 2, hd, 9, 60, torch.bfloat16, kv_dtype)
    plan = cpu_attention.StepPlan(
        spans, torch.zeros(n_tokens, dtype=torch.int64), n_tokens, k_cache.shape[1], False
    )
    want = np.uint64(0)
    for span in spans:
        rows = span_rows(span)[max(0, span.ctx_len - window) if window else 0 :]
        for cache in (k_cache, v_cache):
            raw = cache[:, rows].contiguous().view(torch.uint8).numpy()  # [H_kv, n, row bytes]
            padded = np.zeros((*raw.shape[:2], -(-raw.shape[2] // 8) * 8), dtype=np.uint8)
            padded[..., : raw.shape[2]] = raw
            want ^= np.bitwise_xor.reduce(padded.view(np.uint64).ravel())
    got = cpu_attention.decode_reads(LIB, plan.decode, q, k_cache, v_cache, window)
    assert got == int(want) and got != 0


@needs_kernel
@pytest.mark.parametrize("q_dtype", DTYPES)
@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize(
    "n_heads,n_kv,hd,n_req,max_ctx,window,softcap",
    [
        (12, 12, 64, 64, 300, None, None),  # GPT-2 small's decode shape, many requests
        (6, 2, 40, 9, 70, None, None),  # GQA 3, head dim not a multiple of 16
        (8, 1, 24, 5, 33, 7, None),  # MQA, sliding window
        (4, 2, 16, 7, 40, 8, 50.0),  # Gemma-2-like: window and softcap
        (4, 4, 80, 3, 1, None, None),  # one key each
        (2, 2, 128, 2, 1100, None, 30.0),  # long contexts, wide heads, softcap alone
        (6, 3, 36, 11, 90, None, None),  # GQA 2, head dim not a multiple of 8 (AVX2 lane tails)
        (3, 1, 7, 4, 20, 5, 20.0),  # MQA, head dim 7: every load a tail; window and softcap
    ],
)
def test_decode_matches_sdpa(q_dtype, kv_dtype, n_heads, n_kv, hd, n_req, max_ctx, window, softcap):
    spans, n_tokens, q, k_cache, v_cache = make_case(1, n_heads, n_kv, hd, n_req, max_ctx, q_dtype, kv_dtype)
    scale = hd**-0.5 * 1.3
    out, plan = run_kernel(spans, n_tokens, q, k_cache, v_cache, scale, window, softcap)
    assert plan.decode.n == n_req and plan.prefill is None and not plan.sdpa_spans
    rtol, atol = tolerance(q_dtype, kv_dtype)
    for span in spans:
        ref = reference(
            q[:, :, span.q_start : span.q_start + 1], k_cache, v_cache, span, scale, window, softcap
        )
        got = out[span.q_start].double()  # [H, hd]
        torch.testing.assert_close(got, ref[0, :, 0], rtol=rtol, atol=atol, msg=f"span {span}")


@needs_kernel
@pytest.mark.parametrize(
    "n_heads,n_kv,hd",
    [(12, 12, 64), (6, 2, 40), (8, 1, 24), (4, 4, 80), (2, 2, 128), (6, 3, 36), (3, 1, 7), (16, 2, 96)],
)
def test_bf16_cache_decodes_as_its_values_in_fp32(n_heads, n_kv, hd):
    """A bf16 cache is decoded with the same products summed in the same order as the same values held in
    fp32 (its values load through their own conversion): the same bits, whatever the head dim or group."""
    spans, n_tokens, q, k_cache, v_cache = make_case(
        2, n_heads, n_kv, hd, 13, 150, torch.float32, torch.bfloat16
    )
    scale = hd**-0.5
    got, _ = run_kernel(spans, n_tokens, q, k_cache, v_cache, scale, None, None)
    want, _ = run_kernel(spans, n_tokens, q, k_cache.float(), v_cache.float(), scale, None, None)
    assert not got.isnan().any()
    assert torch.equal(got, want)


@needs_kernel
def test_kernels_are_vectorised_where_the_cpu_can():
    assert LIB.isa == expected_isa() and LIB.has_prefill


@needs_kernel
@pytest.mark.skipif(LIB is None or not LIB.has_prefill, reason="prefill kernel needs AVX-512 or AVX2 + FMA")
@pytest.mark.parametrize("q_dtype", DTYPES)
@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize(
    "n_heads,n_kv,hd,n_req,max_ctx,window,softcap",
    [
        (12, 12, 64, 6, 300, None, None),  # GPT-2 small's shape
        (6, 2, 40, 5, 150, None, None),  # GQA 3, head dim not a multiple of 16
        (8, 1, 24, 4, 140, 7, None),  # MQA, sliding window shorter than the chunks
        (4, 2, 16, 5, 140, 8, 50.0),  # Gemma-2-like: window and softcap
        (2, 2, 128, 3, 600, 200, 30.0),  # long chunks with past, wide heads, window > chunk
        (4, 4, 80, 4, 140, None, None),  # head dim 80: a partial 64-column tile
    ],
)
def test_prefill_matches_sdpa(q_dtype, kv_dtype, n_heads, n_kv, hd, n_req, max_ctx, window, softcap):
    """Chunks of 2..130 rows (with and without past, many 64-row work items, 4-row tails) beside decode rows."""
    q_lens = (1, 2, 5, 17, 64, 70, 130)
    spans, n_tokens, q, k_cache, v_cache = make_case(
        5, n_heads, n_kv, hd, n_req, max_ctx, q_dtype, kv_dtype, q_lens=q_lens
    )
    scale = hd**-0.5 * 0.9
    out, plan = run_kernel(spans, n_tokens, q, k_cache, v_cache, scale, window, softcap)
    assert plan.prefill is not None and not plan.sdpa_spans
    rtol, atol = tolerance(q_dtype, kv_dtype)
    for span in spans:
        rows = slice(span.q_start, span.q_start + span.q_len)
        ref = reference(q[:, :, rows], k_cache, v_cache, span, scale, window, softcap)  # [1, H, q, hd]
        got = out[rows].double().transpose(0, 1)  # [H, q, hd]
        torch.testing.assert_close(got, ref[0], rtol=rtol, atol=atol, msg=f"span {span}")


@needs_kernel
@pytest.mark.skipif(LIB is None or not LIB.has_prefill, reason="prefill kernel needs AVX-512 or AVX2 + FMA")
@pytest.mark.parametrize(
    "n_heads,n_kv,hd,window",
    [(12, 12, 64, None), (6, 2, 40, None), (8, 1, 24, 7), (4, 4, 80, None), (2, 2, 128, 200), (6, 3, 36, None),
     (3, 1, 7, None)],
)  # fmt: skip
def test_bf16_queries_attend_as_fp32_ones_when_every_sum_is_exact(n_heads, n_kv, hd, window):
    """bf16 queries over a bf16 cache score from bf16 pairs (AVX512-BF16), fp32 queries with fp32 FMAs. With
    small-integer queries and keys every product and partial sum is exact in fp32, so both paths must give
    the same scores, hence the same outputs bit for bit (a dropped, repeated or misplaced pair, key or row
    would not): prefill chunks with and without past, and decode rows."""
    q_lens = (1, 2, 5, 17, 64, 70, 130)
    spans, n_tokens, q, k_cache, v_cache = make_case(
        7, n_heads, n_kv, hd, 5, 300, torch.float32, torch.bfloat16, q_lens
    )
    q = (q * 1.5).round().clamp(-3, 3)  # a transposed view still
    k_cache = (k_cache.float() * 1.5).round().clamp(-3, 3).to(torch.bfloat16)
    scale = 0.125  # a power of two: the scaled scores stay exact
    want, _ = run_kernel(spans, n_tokens, q, k_cache, v_cache, scale, window, None)
    got, _ = run_kernel(spans, n_tokens, q.to(torch.bfloat16), k_cache, v_cache, scale, window, None)
    assert not want.isnan().any() and not got.isnan().any()
    assert torch.equal(got, want.to(torch.bfloat16))


@needs_kernel
def test_only_decode_rows_are_written_without_prefill_kernel():
    """Prefill spans left to SDPA: the decode kernel must not touch their rows."""
    spans, n_tokens, q, k_cache, v_cache = make_case(
        2, 4, 2, 32, 12, 60, torch.float32, torch.float32, q_lens=(1, 1, 5)
    )
    out, plan = run_kernel(spans, n_tokens, q, k_cache, v_cache, 0.2, None, None, prefill=False)
    assert plan.sdpa_spans and plan.decode.n and plan.prefill is None
    for span in spans:
        rows = out[span.q_start : span.q_start + span.q_len]
        assert torch.isnan(rows).all() if span.q_len > 1 else not torch.isnan(rows).any()


@needs_kernel
@pytest.mark.parametrize("src_dtype", DTYPES)
@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_write_kv_matches_index_copy(src_dtype, kv_dtype):
    gen = torch.Generator().manual_seed(3)
    n_kv, n_tokens, hd, rows = 3, 37, 40, 200
    slots = torch.randperm(rows, generator=gen)[:n_tokens]
    # key/value as the models make them: transposed views of [1, T, H_kv, hd]
    key = torch.randn(1, n_tokens, n_kv, hd, generator=gen).to(src_dtype).transpose(1, 2)
    value = torch.randn(1, n_tokens, n_kv, hd, generator=gen) * 1e3
    value[0, :4, 0, :5] = torch.tensor([float("inf"), -float("inf"), 1e-40, 3.4e38, -0.0])  # rounding edges
    value = value.to(src_dtype).transpose(1, 2)
    k_cache = torch.randn(n_kv, rows, hd, generator=gen).to(kv_dtype)
    v_cache = torch.randn(n_kv, rows, hd, generator=gen).to(kv_dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_ref.index_copy_(1, slots, key[0].to(kv_dtype))
    v_ref.index_copy_(1, slots, value[0].to(kv_dtype))
    cpu_attention.write_kv(LIB, key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)  # bit-exact, untouched rows too


@needs_kernel
def test_plan_rejects_out_of_range_indices():
    def plan(spans, slots, n_tokens=1):
        return cpu_attention.StepPlan(spans, slots, n_tokens, 100, True)

    zero = torch.zeros(1, dtype=torch.int64)
    plan([RequestSpan(0, 1, 10, 90, None)], zero)  # the last rows: fine
    with pytest.raises(ValueError):
        plan([RequestSpan(0, 1, 10, 95, None)], zero)
    with pytest.raises(ValueError):
        plan([RequestSpan(0, 1, 3, -1, torch.tensor([0, 5, 100]))], zero)
    with pytest.raises(ValueError):
        plan([RequestSpan(0, 1, 10, 0, None)], torch.tensor([100]))
    with pytest.raises(ValueError):  # a chunk running past the batch
        plan([RequestSpan(0, 3, 10, 0, None)], torch.zeros(2, dtype=torch.int64), 2)


class _Layer(torch.nn.Module):
    def __init__(self, idx):
        super().__init__()
        self.layer_idx = idx


@needs_kernel
@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize("window,softcap", [(None, None), (6, 20.0)])
def test_steerserve_attention_kernel_path_matches_sdpa_path(monkeypatch, kv_dtype, window, softcap):
    """A mixed step (prefill chunks + decode rows, fragmented requests) through both paths of the layer."""
    n_heads, n_kv, hd, q_dtype = 6, 2, 24, torch.bfloat16
    rng = random.Random(4)
    gen = torch.Generator().manual_seed(4)
    spans, n_tokens = random_layout(rng, 10, 800, 30, q_lens=(1, 1, 4))
    # new tokens go to the last q_len rows of each request's context
    slots = torch.cat([span_rows(s)[s.ctx_len - s.q_len :] for s in spans])
    cache = KVCache(1, n_kv, hd, 800, kv_dtype, "cpu")
    for t in (*cache.keys, *cache.values):
        t.copy_(torch.randn(t.shape, generator=gen))
    q = torch.randn(1, n_tokens, n_heads, hd, generator=gen).to(q_dtype).transpose(1, 2)
    k = torch.randn(1, n_tokens, n_kv, hd, generator=gen).to(q_dtype).transpose(1, 2)
    v = torch.randn(1, n_tokens, n_kv, hd, generator=gen).to(q_dtype).transpose(1, 2)
    kw = dict(scaling=0.3, sliding_window=window, softcap=softcap)

    meta = AttentionMetadata(spans, slots)
    got, _ = steerserve_attention(_Layer(0), q, k, v, None, steer_attn=meta, steer_cache=cache, **kw)
    assert meta.cpu_plan is not None, "the kernel path was not taken"
    got_cache = (cache.keys[0].clone(), cache.values[0].clone())

    monkeypatch.setattr(cpu_attention, "load", lambda: None)
    meta = AttentionMetadata(spans, slots)
    want, _ = steerserve_attention(_Layer(0), q, k, v, None, steer_attn=meta, steer_cache=cache, **kw)
    assert meta.cpu_plan is None
    assert torch.equal(got_cache[0], cache.keys[0]) and torch.equal(got_cache[1], cache.values[0])
    assert got.shape == want.shape == (1, n_tokens, n_heads, hd) and got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_build_failure_falls_back(monkeypatch, tmp_path):
    """No compiler, or a compiler that fails: load() is None (SDPA), never an exception."""
    monkeypatch.setenv("STEERSERVE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_attention, "_state", {})
    monkeypatch.setattr(_cbuild, "compiler", lambda: None)
    assert cpu_attention.load() is None
    monkeypatch.setattr(cpu_attention, "_state", {})
    monkeypatch.setattr(_cbuild, "compiler", lambda: "/bin/false")
    assert cpu_attention.load() is None
    monkeypatch.setattr(cpu_attention, "_state", {})
    monkeypatch.setenv("STEERSERVE_CPU_ATTENTION", "0")
    assert cpu_attention.load() is None


def test_preferred_kv_dtype(monkeypatch):
    monkeypatch.setattr(cpu_attention, "load", lambda: object())
    assert cpu_attention.preferred_kv_dtype(torch.bfloat16) == torch.bfloat16
    assert cpu_attention.preferred_kv_dtype(torch.float16) == torch.float32
    monkeypatch.setattr(cpu_attention, "load", lambda: None)
    assert cpu_attention.preferred_kv_dtype(torch.bfloat16) == torch.float32
