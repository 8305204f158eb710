"""Attention over the paged KV cache for a packed step: `write_kv` and `paged_attention`.

Public as `steerkernels.write_kv` / `steerkernels.paged_attention`. This module owns their argument
checks, backend dispatch and the pure-torch references (`reference_write_kv`, `reference_paged_attention`:
the spec). The Triton kernels are in `triton_paged_attention`; there is no C++ backend, so `cpu` runs the
reference. The Triton path never syncs with the host and its grid depends only on shapes, so both ops can
be captured in a CUDA graph; the references read seq lengths on the host (a sync on CUDA) and are not.

Cache layout: k_cache / v_cache [H_kv, R, hd], contiguous; key j of seq i lives at cache row
block_table[i, j // block_size] * block_size + j % block_size.
"""

from __future__ import annotations

import torch

from steerkernels import _checks as C
from steerkernels import _util

# NOTE: the Triton kernel keeps a [16+, next_pow2(hd)] query tile and [BLOCK_N, next_pow2(hd)] key and value
# tiles in registers; past 256 they spill (no model we serve has a larger head).
TRITON_MAX_HEAD_DIM = 256


def _impl(backend: str | None, device: torch.device):
    if C.resolve_backend(backend, device) == "triton":
        from steerkernels import triton_paged_attention as mod

        return mod
    return None  # torch, or cpu (no C++ kernel): the reference


def _cache_pair(k_cache: object, v_cache: object, device: torch.device) -> tuple[int, int, int]:
    C.tensor("k_cache", k_cache, (None, None, None), C.FLOAT_DTYPES, device, "H_kv, R, hd")
    C.tensor("v_cache", v_cache, tuple(k_cache.shape), (k_cache.dtype,), device, "H_kv, R, hd (as k_cache)")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
    return tuple(k_cache.shape)


def _head_dim(name: str, t: torch.Tensor, hd: int, triton: bool) -> None:
    C.row_major(name, t)
    if triton and hd > TRITON_MAX_HEAD_DIM:
        raise ValueError(
            f"{name}: the triton backend supports head_dim <= {TRITON_MAX_HEAD_DIM}, got {hd} "
            "(use backend='torch')"
        )


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Write each new token's key and value into its cache row.

    key, value    [T, H_kv, hd] float, any strides with a contiguous last dim.
    k_cache, v_cache [H_kv, R, hd] float (same dtype), contiguous.
    slot_mapping  [T] int32/int64: token t goes to cache row slot_mapping[t]; -1 (or any id outside
                  [0, R)) skips the token (the padding rows of a CUDA-graph batch).
    k_cache[:, slot] = key[t] rounded to the cache dtype; likewise v. Other rows are not written.
    Duplicate slots: one of the tokens wins (unspecified which).
    """
    dev = getattr(k_cache, "device", None)
    H_kv, _, hd = _cache_pair(k_cache, v_cache, dev)
    C.tensor("key", key, (None, H_kv, hd), C.FLOAT_DTYPES, dev, "T, H_kv, hd")
    T = key.shape[0]
    C.tensor("value", value, (T, H_kv, hd), C.FLOAT_DTYPES, dev, "T, H_kv, hd")
    C.row_major("key", key)
    C.row_major("value", value)
    C.tensor("slot_mapping", slot_mapping, (T,), C.INDEX_DTYPES, dev, "T")
    impl = _impl(backend, dev)
    if impl is None:
        reference_write_kv(key, value, k_cache, v_cache, slot_mapping)
    else:
        impl.write_kv(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    token_seq: torch.Tensor,
    *,
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal attention of a packed step's query rows (decode and chunked-prefill rows of many seqs) over
    the paged cache, which already holds every key they see (`write_kv` first).

    query           [T, H, hd] float, the cache's dtype, contiguous last dim; H a multiple of H_kv (GQA:
                    head h reads kv head h // (H / H_kv), as transformers' repeat_kv).
    k_cache, v_cache [H_kv, R, hd], contiguous.
    block_table     [N, max_blocks] int32/int64; seq_lens [N] int: keys of seq i (cached + new; 0 for a
                    padding seq); query_start_loc [N+1] int: seq i's rows are [qsl[i], qsl[i+1]);
                    token_seq [T] int: each row's seq, -1 = padding row. Consistent, as a packed
                    step is (not checked: no host sync): query_start_loc[0] = 0, non-decreasing;
                    token_seq[t] is i or -1 on seq i's rows, -1 on the rows from query_start_loc[N] on.
                    (A CUDA-graph decode batch may pad with one-row seqs: seq_lens 0, token_seq -1.)
    Row t of seq i = token_seq[t] sits at position p = seq_lens[i] - (qsl[i+1] - t) and attends keys j
    with max(0, p - sliding_window + 1) <= j <= p, at cache row
    block_table[i, j // block_size] * block_size + j % block_size.
    s = (q . k) * scale, then s = tanh(s / softcap) * softcap when softcap is given (Gemma-2); softmax in
    fp32; out[t, h] = sum_j softmax(s)_j v_j cast to query's dtype. Padding rows (token_seq outside
    [0, N)) and rows that see no key (p < 0) are zeros. Returns out ([T, H, hd], new when None).
    """
    dev = getattr(query, "device", None)
    H_kv, _, hd = _cache_pair(k_cache, v_cache, dev)
    C.tensor("query", query, (None, None, hd), (k_cache.dtype,), dev, "T, H, hd; the cache's dtype")
    T, H, _ = query.shape
    if H % H_kv:
        raise ValueError(f"query: expected a multiple of H_kv={H_kv} heads (GQA), got H={H}")
    C.tensor("block_table", block_table, (None, None), C.INDEX_DTYPES, dev, "N, max_blocks")
    N = block_table.shape[0]
    C.tensor("seq_lens", seq_lens, (N,), C.INDEX_DTYPES, dev, "N")
    C.tensor("query_start_loc", query_start_loc, (N + 1,), C.INDEX_DTYPES, dev, "N+1")
    C.tensor("token_seq", token_seq, (T,), C.INDEX_DTYPES, dev, "T")
    if out is not None:
        C.tensor("out", out, (T, H, hd), (query.dtype,), dev, "T, H, hd")
        C.row_major("out", out)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: expected an int >= 1, got {block_size!r}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window: expected None or an int >= 1, got {sliding_window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap: expected None or a value > 0, got {softcap!r}")
    impl = _impl(backend, dev)
    _head_dim("query", query, hd, impl is not None)
    if out is None:
        out = _util.empty((T, H, hd), query.dtype, dev)
    args = (query, k_cache, v_cache, block_table, seq_lens, query_start_loc, token_seq)
    cfg = (int(block_size), float(scale), sliding_window, None if softcap is None else float(softcap))
    (reference_paged_attention if impl is None else impl.paged_attention)(*args, *cfg, out)
    return out


def reference_write_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    """The spec of `write_kv`: an index_copy_ of the tokens whose slot is a cache row."""
    slot = slot_mapping.long()
    keep = (slot >= 0) & (slot < k_cache.shape[1])
    rows = slot[keep]
    k_cache.index_copy_(1, rows, key[keep].transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(1, rows, value[keep].transpose(0, 1).to(v_cache.dtype))


def reference_paged_attention(
    query, k_cache, v_cache, block_table, seq_lens, query_start_loc, token_seq,
    block_size, scale, sliding_window, softcap, out,
) -> torch.Tensor:  # fmt: skip
    """The spec of `paged_attention`, per seq: gather its keys through the block table, mask, softmax."""
    T, H, hd = query.shape
    H_kv, R = k_cache.shape[:2]
    res = torch.zeros((T, H, hd), dtype=torch.float32, device=query.device)
    tseq = token_seq.long()
    for i in range(block_table.shape[0]):
        rows = (tseq == i).nonzero().flatten()
        L = int(seq_lens[i])
        if rows.numel() == 0 or L <= 0:
            continue
        j = torch.arange(L, device=query.device)
        cache_row = block_table[i].long()[j // block_size] * block_size + j % block_size
        if bool(((cache_row < 0) | (cache_row >= R)).any()):
            raise ValueError(f"block_table: seq {i} maps keys outside the cache's {R} rows")
        k = k_cache[:, cache_row].float().repeat_interleave(H // H_kv, dim=0)  # [H, L, hd]
        v = v_cache[:, cache_row].float().repeat_interleave(H // H_kv, dim=0)
        pos = L - (int(query_start_loc[i + 1]) - rows)  # [n]
        seen = j[None, :] <= pos[:, None]  # [n, L]
        if sliding_window is not None:
            seen &= j[None, :] > pos[:, None] - sliding_window
        s = torch.einsum("nhd,hld->hnl", query[rows].float(), k) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        # NOTE: a row that sees no key softmaxes all -inf to NaN; the second mask makes it zeros
        p = torch.softmax(s.masked_fill(~seen, float("-inf")), dim=-1).masked_fill(~seen, 0.0)
        res[rows] = torch.einsum("hnl,hld->nhd", p, v)
    return out.copy_(res)
