"""write_kv and paged_attention: the reference against transformers' own eager attention (Gemma-2's, with
softcap) and torch SDPA on each seq's contiguous keys, masks from transformers' mask functions; Triton
against the reference on packed batches of decode rows, chunked-prefill rows with cached context, padding
rows and padding seqs, with shuffled cache blocks and every cache row no query may see poisoned with NaN."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

import steerkernels as sk
from steerkernels import _checks
from steerkernels.paged_attention import TRITON_MAX_HEAD_DIM
from tests.kernels.helpers import DTYPES, assert_close, rand, same_bits

# Seqs as (cached keys, new query rows); (0, 0) is a padding seq (seq_lens 0, no rows).
DECODE = [(6, 1), (13, 1), (0, 1), (0, 0), (30, 1)]
PREFILL = [(0, 7), (9, 5), (4, 21)]
MIXED = [(11, 1), (0, 6), (0, 0), (7, 4), (70, 1), (3, 9), (66, 3)]  # 69+ keys: several key tiles
PAD_ROWS = 3  # rows of a padded batch: token_seq -1, slot -1

# name: (seqs, H, H_kv, hd, block_size, sliding_window, softcap); odd head dims, GQA / MHA / MQA; the
# Triton tile holds 16 // (H / H_kv) query rows of a seq (5, 16, 8, 5, 3, 1 below): seqs span q-blocks.
CASES = {
    "decode-gqa": (DECODE, 6, 2, 80, 4, None, None),
    "prefill-mha": (PREFILL, 3, 3, 72, 4, None, None),
    "mixed-window": (MIXED, 4, 2, 96, 3, 5, None),
    "mixed-softcap": (MIXED, 6, 2, 64, 4, None, 2.0),
    "mixed-window-softcap-mqa": (MIXED, 5, 1, 40, 16, 3, 1.5),
    "mixed-group17": (MIXED[:4], 17, 1, 24, 8, None, None),  # a group over 16 heads: one row a q-block
}


def make_step(gen, seqs, H, H_kv, hd, bs, dtype, device, idx=torch.int32):
    """A packed step over a cache of shuffled blocks: every seq's cached keys are written, its new keys
    are returned (for write_kv); every other cache row (spare blocks, tails of last blocks, and the new
    rows until written) is NaN, and block table entries past a seq's blocks point at spare blocks."""
    need = [math.ceil((c + q) / bs) for c, q in seqs]
    n_blocks = sum(need) + 3
    perm = torch.randperm(n_blocks, generator=gen)
    spare = perm[sum(need) :]
    table = spare[torch.randint(0, len(spare), (len(seqs), max(need) + 1), generator=gen)]
    k_cache = torch.full((H_kv, n_blocks * bs, hd), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    keys, vals, rows, seq_of_row, slots, used = [], [], [], [], [], 0
    for i, (c, q) in enumerate(seqs):
        table[i, : need[i]] = perm[used : used + need[i]]
        used += need[i]
        j = torch.arange(c + q)
        cache_row = table[i, j // bs] * bs + j % bs
        keys.append(rand(gen, c + q, H_kv, hd, dtype=dtype))
        vals.append(rand(gen, c + q, H_kv, hd, dtype=dtype))
        k_cache[:, cache_row[:c]] = keys[i][:c].transpose(0, 1)
        v_cache[:, cache_row[:c]] = vals[i][:c].transpose(0, 1)
        rows.append(torch.arange(c, c + q))
        seq_of_row += [i] * q
        slots.append(cache_row[c:])
    T = len(seq_of_row) + PAD_ROWS
    new_k = torch.cat([k[c:] for k, (c, _) in zip(keys, seqs, strict=True)] + [rand(gen, PAD_ROWS, H_kv, hd)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(vals, seqs, strict=True)] + [rand(gen, PAD_ROWS, H_kv, hd)])
    to = dict(device=device, dtype=idx)
    qsl = torch.tensor([0] + [q for _, q in seqs]).cumsum(0)
    step = dict(
        query=rand(gen, T, H, hd, dtype=dtype, device=device),
        k_cache=k_cache.to(device),
        v_cache=v_cache.to(device),
        block_table=table.to(**to),
        seq_lens=torch.tensor([c + q for c, q in seqs]).to(**to),
        query_start_loc=qsl.to(**to),
        token_seq=torch.tensor(seq_of_row + [-1] * PAD_ROWS).to(**to),
    )
    new = dict(
        key=new_k.to(dtype=dtype, device=device),
        value=new_v.to(dtype=dtype, device=device),
        slot_mapping=torch.cat(slots + [torch.full((PAD_ROWS,), -1)]).to(**to),
    )
    return step, new, keys, vals


def expected_cache(step, new):
    """The caches after write_kv of the new tokens, by plain indexing."""
    kc, vc = step["k_cache"].clone(), step["v_cache"].clone()
    for t, s in enumerate(new["slot_mapping"].tolist()):
        if s >= 0:
            kc[:, s], vc[:, s] = new["key"][t], new["value"][t]
    return kc, vc


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_step_triton_vs_reference(device, gen, case, dtype):
    """write_kv of the step's new tokens (padding rows skipped), then attention: Triton == reference,
    padding rows zeros, and the cache rows nobody sees stay NaN (a kernel that reads one fails)."""
    seqs, H, H_kv, hd, bs, window, cap = CASES[case]
    idx = torch.int64 if case.startswith("mixed-w") else torch.int32
    step, new, _, _ = make_step(gen, seqs, H, H_kv, hd, bs, dtype, device, idx)
    want_k, want_v = expected_cache(step, new)
    sk.write_kv(**new, k_cache=step["k_cache"], v_cache=step["v_cache"], backend="triton")
    assert same_bits(step["k_cache"], want_k) and same_bits(step["v_cache"], want_v)
    kw = dict(block_size=bs, scale=hd**-0.5, sliding_window=window, softcap=cap)
    out = torch.full_like(step["query"], float("nan"))
    got = sk.paged_attention(**step, **kw, out=out, backend="triton")
    assert got is out
    ref = sk.paged_attention(**step, **kw, backend="torch")
    assert not ref.isnan().any()
    assert_close(got, ref, dtype, case)
    pad = step["token_seq"] < 0
    assert pad.sum() == PAD_ROWS and (got[pad] == 0).all() and (ref[pad] == 0).all()


def test_new_output_and_cpu_backend(device, gen):
    """out=None allocates (poisoned by the fixture: every cell must be written); backend='cpu' (no C++
    kernel) runs the reference."""
    seqs, H, H_kv, hd, bs, window, cap = CASES["mixed-softcap"]
    step, new, _, _ = make_step(gen, seqs, H, H_kv, hd, bs, torch.float32, device)
    sk.write_kv(**new, k_cache=step["k_cache"], v_cache=step["v_cache"])
    kw = dict(block_size=bs, scale=0.3, sliding_window=window, softcap=cap)
    got = sk.paged_attention(**step, **kw)
    ref = sk.paged_attention(**step, **kw, backend="torch")
    assert_close(got, ref, torch.float32)
    if device == "cpu" and _checks.cpu_available():
        assert torch.equal(sk.paged_attention(**step, **kw, backend="cpu"), ref)


def test_graph_padded_decode(device, gen):
    """A CUDA-graph decode batch's layout: each padding row is its own seq (seq_lens 0, token_seq -1,
    a stale block table row) after the real ones; its rows are zeros, the others as the reference."""
    seqs, H, H_kv, hd, bs, _, _ = CASES["decode-gqa"]
    step, new, _, _ = make_step(gen, seqs, H, H_kv, hd, bs, torch.float16, device)
    sk.write_kv(**new, k_cache=step["k_cache"], v_cache=step["v_cache"])
    n_real = step["seq_lens"].shape[0]
    stale = step["block_table"][torch.randint(0, n_real, (PAD_ROWS,), generator=gen).to(device)]
    step["block_table"] = torch.cat([step["block_table"], stale])
    step["seq_lens"] = torch.cat([step["seq_lens"], torch.zeros_like(step["seq_lens"][:PAD_ROWS])])
    qsl = step["query_start_loc"]
    step["query_start_loc"] = torch.cat([qsl, qsl[-1] + torch.arange(1, PAD_ROWS + 1, device=device)])
    kw = dict(block_size=bs, scale=hd**-0.5, sliding_window=4, softcap=3.0)
    got = sk.paged_attention(**step, **kw, out=torch.full_like(step["query"], float("nan")))
    ref = sk.paged_attention(**step, **kw, backend="torch")
    assert_close(got, ref, torch.float16)
    assert (got[-PAD_ROWS:] == 0).all() and (got[:-PAD_ROWS] != 0).any(dim=-1).all()


@pytest.mark.parametrize("window, cap", [(None, None), (4, None), (None, 1.5), (3, 2.0)])
def test_reference_vs_transformers_and_sdpa(gen, window, cap):
    """Per seq on its contiguous keys: Gemma-2's eager_attention_forward (repeat_kv, softcap, fp32
    softmax) with transformers' causal / sliding-window mask functions, and SDPA (no softcap)."""
    seqs, H, H_kv, hd, bs = MIXED, 6, 2, 24, 4
    step, new, keys, vals = make_step(gen, seqs, H, H_kv, hd, bs, torch.float32, "cpu")
    sk.write_kv(**new, k_cache=step["k_cache"], v_cache=step["v_cache"], backend="torch")
    scale = 0.37
    ref = sk.paged_attention(
        **step, block_size=bs, scale=scale, sliding_window=window, softcap=cap, backend="torch"
    )
    module = SimpleNamespace(num_key_value_groups=H // H_kv, head_dim=hd, training=False)
    mask_fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    qsl = step["query_start_loc"].tolist()
    for i, (c, q) in enumerate(seqs):
        if q == 0:
            continue
        qi = step["query"][qsl[i] : qsl[i + 1]].transpose(0, 1)[None]  # [1, H, q, hd]
        ki, vi = keys[i].transpose(0, 1)[None], vals[i].transpose(0, 1)[None]  # [1, H_kv, L, hd]
        allowed = mask_fn(0, 0, torch.arange(c, c + q)[:, None], torch.arange(c + q)[None, :])
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[None, None]
        lib, _ = eager_attention_forward(module, qi, ki, vi, additive, scaling=scale, softcap=cap)
        assert_close(ref[qsl[i] : qsl[i + 1]], lib[0], torch.float32, f"seq {i} vs transformers")
        if cap is None:
            sdpa = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=allowed, scale=scale, enable_gqa=True)
            assert_close(ref[qsl[i] : qsl[i + 1]], sdpa[0].transpose(0, 1), torch.float32, f"seq {i} sdpa")


@pytest.mark.parametrize(
    "key_dtype, cache_dtype", [(torch.float32, torch.bfloat16), (torch.float16, torch.float16)]
)
def test_write_kv_strided_and_cast(device, gen, key_dtype, cache_dtype):
    """Strided key/value views, int64 slots with -1 and an id past the cache (both skipped), a cast to
    the cache's dtype; rows not written keep their NaN bits."""
    T, H_kv, hd, R = 9, 3, 37, 23
    key = rand(gen, T, H_kv, hd + 5, dtype=key_dtype, device=device)[..., :hd]
    value = rand(gen, H_kv, T, hd, dtype=key_dtype, device=device).transpose(0, 1)
    slots = torch.randperm(R, generator=gen)[:T]
    slots[[1, 5]], slots[7] = -1, R
    slot_mapping = slots.to(device)
    caches = [torch.full((H_kv, R, hd), float("nan"), dtype=cache_dtype, device=device) for _ in range(4)]
    sk.write_kv(key, value, caches[0], caches[1], slot_mapping, backend="triton")
    sk.write_kv(key, value, caches[2], caches[3], slot_mapping, backend="torch")
    for got, want, src in ((caches[0], caches[2], key), (caches[1], caches[3], value)):
        got, want, src = got.cpu(), want.cpu(), src.cpu()
        written = torch.zeros(R, dtype=torch.bool)
        written[slots[(slots >= 0) & (slots < R)]] = True
        assert same_bits(got[:, ~written], want[:, ~written]) and got[:, ~written].isnan().all()
        assert_close(got[:, written], want[:, written], cache_dtype)
        for t, s in enumerate(slots.tolist()):  # the reference itself, by plain indexing
            if 0 <= s < R:
                assert torch.equal(want[:, s], src[t].to(cache_dtype))


def test_argument_errors(device, gen):
    seqs, H, H_kv, hd, bs, _, _ = CASES["decode-gqa"]
    step, new, _, _ = make_step(gen, seqs, H, H_kv, hd, bs, torch.float32, device)
    kw = dict(block_size=bs, scale=0.1)
    bad = {
        "query": (dict(query=step["query"][:, :5]), r"multiple of H_kv=2 heads"),
        "dtype": (dict(query=step["query"].half()), r"query: expected dtype in \(float32\)"),
        "strided cache": (
            dict(k_cache=step["k_cache"].transpose(0, 1).contiguous().transpose(0, 1)),
            "contiguous",
        ),
        "qsl": (dict(query_start_loc=step["query_start_loc"][:-1]), r"query_start_loc: expected shape \[6\]"),
        "float ids": (
            dict(token_seq=step["token_seq"].float()),
            r"token_seq: expected dtype in \(int32, int64\)",
        ),
    }
    for name, (change, msg) in bad.items():
        with pytest.raises(ValueError, match=msg):
            sk.paged_attention(**{**step, **change}, **kw, backend="torch")
        assert name
    for change, msg in (({"block_size": 0}, "block_size"), ({"sliding_window": 0}, "sliding_window"),
                        ({"softcap": 0.0}, "softcap")):  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            sk.paged_attention(**step, **{**kw, **change}, backend="torch")
    big = torch.zeros(1, 1, TRITON_MAX_HEAD_DIM + 8, device=device)
    one = torch.zeros(1, dtype=torch.int32, device=device)
    qsl = torch.tensor([0, 1], device=device)
    with pytest.raises(ValueError, match="head_dim <= 256"):
        sk.paged_attention(big, big, big, one[None], one, qsl, one, **kw, backend="triton")
    with pytest.raises(ValueError, match=r"value: expected shape \[7, 2, 80\]"):
        sk.write_kv(new["key"], new["value"][:-1], step["k_cache"], step["v_cache"], new["slot_mapping"])
