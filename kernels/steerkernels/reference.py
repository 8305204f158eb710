"""Pure-torch references: the spec of every op, and what runs in production on a CPU.

Each function has the signature of the public op in `steerkernels` (minus `backend`/`validate`) and
assumes its arguments were checked there. All arithmetic is fp32 whatever the storage dtype; in-place
ops store back in the target's dtype and leave rows without work bit-identical. Vectorized over tokens
and rows (gathers, `index_put_`); the only Python loops are over directions (K), over token chunks
that bound the memory of gathered weights, and over the dense logit biases of rows (in-place row adds).
"""

from __future__ import annotations

import torch

# NOTE: gathered weight rows per chunk ([chunk, F, d] floats); bounds scratch memory to ~16 MiB.
_GATHER_BUDGET = 1 << 22


def steered_tokens(slot_of_token: torch.Tensor, num_slots: int) -> torch.Tensor:
    """[T] bool: the token has a slot in [0, S)."""
    slot = slot_of_token.long()
    return (slot >= 0) & (slot < num_slots)


def activation(
    pre: torch.Tensor, threshold: torch.Tensor | None, token_threshold: torch.Tensor | None = None
) -> torch.Tensor:
    """SAELens' activations from pre-activations: `relu(pre) * (pre > threshold) * (pre > token_threshold)`,
    each factor only when given. relu: neither; jumprelu: threshold (per feature; SAELens keeps the relu,
    so a negative threshold never lets a negative activation through); TopK: token_threshold (per token,
    between its k-th and (k+1)-th largest pre-activation, see `sae_topk_threshold`)."""
    act = torch.relu(pre)
    if threshold is not None:
        act = act * (pre > threshold)
    if token_threshold is not None:
        act = act * (pre > token_threshold)
    return act


def steer_add(h, slot_of_token, slot_vectors):
    """h[t] += slot_vectors[slot_of_token[t]] for steered tokens; see `steerkernels.steer_add`."""
    steered = steered_tokens(slot_of_token, slot_vectors.shape[0])
    rows = steered.nonzero().squeeze(1)  # [n]
    if rows.numel() == 0:
        return h
    vec = slot_vectors.float().index_select(0, slot_of_token.long()[rows])  # [n, d]
    h.index_copy_(0, rows, (h.index_select(0, rows).float() + vec).to(h.dtype))
    return h


def project_clamp(h, slot_of_token, slot_dirs, lo, hi, dir_count, token_value=None):
    """Clip h[t] . u_k to [lo, hi] for the slot's directions in k order (to token_value[t, k] where that is
    not NaN); see `steerkernels.project_clamp`."""
    S, K, _ = slot_dirs.shape
    steered = steered_tokens(slot_of_token, S)
    slot = slot_of_token.long().clamp(0, max(S - 1, 0))  # [T]
    count = dir_count.long()[slot].clamp(0, K) if S else torch.zeros_like(slot)  # [T]
    rows = (steered & (count > 0)).nonzero().squeeze(1)  # [n]
    if rows.numel() == 0:
        return h
    s, count = slot[rows], count[rows]  # [n]
    x = h.index_select(0, rows).float()  # [n, d]
    tv = token_value.float()[rows] if token_value is not None else None  # [n, K]
    for k in range(K):
        u = slot_dirs[s, k].float()  # [n, d]
        c = (x * u).sum(-1)  # [n]
        lo_k, hi_k = lo[s, k].float(), hi[s, k].float()
        if tv is not None:  # a per-token target: lo = hi = token_value
            lo_k = torch.where(tv[:, k].isnan(), lo_k, tv[:, k])
            hi_k = torch.where(tv[:, k].isnan(), hi_k, tv[:, k])
        clipped = torch.clamp(c, min=lo_k, max=hi_k)
        step = torch.where(k < count, clipped - c, torch.zeros_like(c))
        x = x + step[:, None] * u
    h.index_copy_(0, rows, x.to(h.dtype))
    return h


def sae_edit(
    h,
    slot_of_token,
    feat_idx,
    W_enc,
    b_enc,
    W_dec,
    b_dec,
    threshold,
    apply_b_dec_to_input,
    mode,
    value,
    token_threshold=None,
    token_value=None,
):
    """Set/scale/ablate the slot's SAE features of each steered token (set to token_value[t, j] where that
    is not NaN); see `steerkernels.sae_edit`."""
    S, Fmax = feat_idx.shape
    d_sae = W_enc.shape[1]
    steered = steered_tokens(slot_of_token, S)
    slot = slot_of_token.long().clamp(0, max(S - 1, 0))  # [T]
    feat = feat_idx.long()  # [S, F]
    valid = (feat >= 0) & (feat < d_sae)  # [S, F]
    has_work = valid.any(1)[slot] if S else torch.zeros_like(steered)  # [T]
    rows = (steered & has_work).nonzero().squeeze(1)  # [n]
    if rows.numel() == 0:
        return h
    s = slot[rows]  # [n]
    f = feat.clamp(0, d_sae - 1)[s]  # [n, F]
    ok = valid[s]  # [n, F]
    x = h.index_select(0, rows).float()  # [n, d]
    xin = x - b_dec.float() if apply_b_dec_to_input else x
    thr = threshold.float()[f] if threshold is not None else None  # [n, F]
    tthr = token_threshold.float()[rows, None] if token_threshold is not None else None  # [n, 1]
    scale = mode[s] == 1  # [n, F]
    val = value.float()[s]  # [n, F]
    tv = token_value.float()[rows] if token_value is not None else None  # [n, F]
    cols, col_of = _encoder_columns(W_enc, f)
    chunk = max(1, _GATHER_BUDGET // max(1, Fmax * x.shape[1]))
    out = torch.empty_like(x)
    for i in range(0, rows.numel(), chunk):
        sl = slice(i, i + chunk)
        fc = f[sl]  # [c, F]
        a = _feature_acts(xin[sl], fc, cols, col_of[sl], b_enc, _part(thr, sl), _part(tthr, sl))  # [c, F]
        new = torch.where(scale[sl], a * val[sl], val[sl])
        if tv is not None:
            new = torch.where(tv[sl].isnan(), new, tv[sl])
        coef = torch.where(ok[sl], new - a, torch.zeros_like(a))  # [c, F]
        w_dec = W_dec[fc].float()  # [c, F, d]
        out[sl] = x[sl] + (coef[:, :, None] * w_dec).sum(1)
    h.index_copy_(0, rows, out.to(h.dtype))
    return h


def _encoder_columns(W_enc, f):
    """(cols [U, d] fp32: the distinct features' encoder columns, col_of [n, F]: f's row in cols).

    NOTE: a column of W_enc [d, d_sae] is d strided reads; gathering each distinct feature once (a
    prompt's tokens share their request's features) instead of once per token made a 64-row decode
    step's edit 2x faster and a prefill's O(features) instead of O(tokens)."""
    uniq, col_of = f.unique(return_inverse=True)
    return W_enc.index_select(1, uniq).t().float().contiguous(), col_of


def _part(t, sl):
    return None if t is None else t[sl]


def _feature_acts(xin, f, cols, col_of, b_enc, thr, tthr):
    """Activations [c, F] of features f [c, F] on encoder inputs xin [c, d] (cols, col_of: see
    `_encoder_columns`; thr [c, F] and tthr [c, 1] or None: see `activation`)."""
    # NOTE: multiply-and-sum, not bmm: a bmm of c [F, d] x [d, 1] products is ~5x slower on CPU
    pre = (cols[col_of] * xin[:, None, :]).sum(-1) + b_enc.float()[f]  # [c, F]
    return activation(pre, thr, tthr)


def sae_feature_acts(
    h, slot_of_token, feat_idx, W_enc, b_enc, b_dec, threshold, apply_b_dec_to_input, token_threshold=None
):
    """[T, F] fp32 activations of each token's slot features, NaN where none; see the public op."""
    T = h.shape[0]
    S, Fmax = feat_idx.shape
    d_sae = W_enc.shape[1]
    out = torch.full((T, Fmax), float("nan"), dtype=torch.float32, device=h.device)
    slot = slot_of_token.long()
    feat = feat_idx.long()
    valid = (feat >= 0) & (feat < d_sae)  # [S, F]
    ok = (slot >= 0) & (slot < S)
    rows = (ok & valid.any(1)[slot.clamp(0, max(S - 1, 0))]).nonzero().squeeze(1) if S else slot[:0]
    if rows.numel() == 0:
        return out
    s = slot[rows]  # [n]
    f = feat.clamp(0, d_sae - 1)[s]  # [n, F]
    x = h.index_select(0, rows).float()
    xin = x - b_dec.float() if apply_b_dec_to_input else x
    thr = threshold.float()[f] if threshold is not None else None
    tthr = token_threshold.float()[rows, None] if token_threshold is not None else None  # [n, 1]
    chunk = max(1, _GATHER_BUDGET // max(1, Fmax * x.shape[1]))
    cols, col_of = _encoder_columns(W_enc, f)
    for i in range(0, rows.numel(), chunk):
        sl = slice(i, i + chunk)
        a = _feature_acts(xin[sl], f[sl], cols, col_of[sl], b_enc, _part(thr, sl), _part(tthr, sl))
        out[rows[sl]] = torch.where(valid[s[sl]], a, float("nan"))
    return out


def apply_logit_bias(
    logits,
    temperature,
    sparse_ids,
    sparse_bias,
    dense_bank,
    dense_idx,
    penalty_ids,
    penalty_counts,
    repetition_penalty,
    presence_penalty,
    frequency_penalty,
):
    """Biases, then penalties, then temperature, in place; see `steerkernels.apply_logit_bias`."""
    R, V = logits.shape
    row = torch.arange(R, device=logits.device)[:, None]  # [R, 1]
    if sparse_ids.shape[1]:
        ids = sparse_ids.long()
        ok = (ids >= 0) & (ids < V)  # [R, S]
        r_idx, tok = row.expand_as(ids)[ok], ids[ok]
        logits.index_put_((r_idx, tok), sparse_bias.float()[ok], accumulate=True)
    B = dense_bank.shape[0]
    if dense_idx.shape[1] and B:
        idx = dense_idx.long()
        ok = (idx >= 0) & (idx < B)  # [R, D]
        # NOTE: one in-place add per (row, bias): it moves 3 [V] vectors each, where gathering the rows'
        # biases into an [n, V] block first moved ~3x more (64 rows of GPT-2's vocabulary: 0.9 vs 5 ms)
        rows = ok.nonzero()[:, 0].tolist()  # row-major, as idx[ok]
        for r, b in zip(rows, idx[ok].tolist(), strict=True):
            logits[r].add_(dense_bank[b])
    if penalty_ids.shape[1]:
        ids = penalty_ids.long()
        ok = (ids >= 0) & (ids < V)  # [R, P]
        r_idx, c_idx = ok.nonzero(as_tuple=True)  # [n] each
        tok = ids[r_idx, c_idx]
        g = logits[r_idx, tok]  # [n]
        rp = repetition_penalty.float()[r_idx]
        g = torch.where(g > 0, g / rp, g * rp)
        count = penalty_counts[r_idx, c_idx].float()
        g = torch.where(count > 0, g - presence_penalty.float()[r_idx], g)
        g = g - frequency_penalty.float()[r_idx] * count
        logits[r_idx, tok] = g
    if not bool((temperature == 1).all()):  # NOTE: greedy and T=1 rows need no pass over [R, V]
        logits.div_(temperature.float()[:, None])
    return logits


def sae_encode_topk(x, W_enc, b_enc, b_dec, threshold, apply_b_dec_to_input, k, rank_pre=False):
    """Top-k SAE activations per token, descending; see `steerkernels.sae_encode_topk`. With `rank_pre`
    (TopK SAEs) the k largest PRE-activations, as they are: the public op applies the SAE's own k."""
    T = x.shape[0]
    d_sae = W_enc.shape[1]
    W = W_enc.float()  # [d, d_sae]
    bias = b_enc.float()
    thr = threshold.float() if threshold is not None else None
    values = torch.empty(T, k, dtype=torch.float32, device=x.device)
    indices = torch.empty(T, k, dtype=torch.int64, device=x.device)
    chunk = max(1, (1 << 24) // max(1, d_sae))  # NOTE: at most ~64 MiB of activations at a time
    for i in range(0, T, chunk):
        xin = x[i : i + chunk].float()
        if apply_b_dec_to_input:
            xin = xin - b_dec.float()
        pre = xin @ W + bias  # [c, d_sae]
        act = pre if rank_pre else activation(pre, thr)
        values[i : i + chunk], indices[i : i + chunk] = torch.topk(act, k, dim=1)
    return values, indices


def sae_topk_threshold(x, W_enc, b_enc, b_dec, apply_b_dec_to_input, k, rows=None):
    """[T] fp32: per token of `rows` (all when None) the midpoint of its k-th and (k+1)-th largest
    pre-activations (-inf when k = d_sae), NaN for the other tokens; see the public op."""
    T, d_sae = x.shape[0], W_enc.shape[1]
    out = torch.full((T,), float("nan"), dtype=torch.float32, device=x.device)
    rows = torch.arange(T, device=x.device) if rows is None else rows.long()
    if rows.numel() == 0:
        return out
    if k >= d_sae:
        return out.index_fill_(0, rows, float("-inf"))
    W, bias = W_enc.float(), b_enc.float()  # NOTE: no copy for fp32 weights
    chunk = max(1, (1 << 24) // d_sae)  # NOTE: at most ~64 MiB of pre-activations at a time
    for i in range(0, rows.numel(), chunk):
        r = rows[i : i + chunk]
        xin = x.index_select(0, r).float()
        if apply_b_dec_to_input:
            xin = xin - b_dec.float()
        top = torch.topk(torch.addmm(bias, xin, W), k + 1, dim=1).values  # [c, k + 1]
        out[r] = 0.5 * (top[:, k - 1] + top[:, k])
    return out


# -- resampling: a counter-based random stream --------------------------------------------------------

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for x in [0, 2**32) held in int64, without int64 overflow (16-bit halves)."""
    return ((x & 0xFFFF) * c + (((x >> 16) * c) & 0xFFFF) * 65536) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 on uint32 values held in int64 (a bijection of [0, 2**32))."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def resample_bits(key: torch.Tensor, pos: torch.Tensor, stream: torch.Tensor):
    """(h1, h2): two uint32 words (in int64 tensors) of the counter-based stream at (key, pos, stream).

    key, pos [T] int64 (key two's complement: both halves are used); stream [T, F] or anything that
    broadcasts against [T, 1, ...] (key and pos get trailing unit dims up to stream's rank). All mod 2**32:
      base = mix32(mix32(mix32(pos & M) ^ (stream & M)) ^ key_lo) ^ key_hi
      h1 = mix32(base);  h2 = mix32(base ^ 0x9E3779B9)
    NOTE: counter-based, not a generator: a draw depends only on (request key, token position, stream),
    so it is the same whatever shares the batch and when a preempted request's tokens are recomputed.
    """
    key, pos, stream = key.long(), pos.long(), stream.long()
    extra = max(0, stream.dim() - key.dim())
    key = key.reshape(*key.shape, *([1] * extra))
    pos = pos.reshape(*pos.shape, *([1] * extra))
    key_lo, key_hi = key & _M32, (key >> 32) & _M32  # NOTE: >> is arithmetic; the mask keeps 32 bits
    base = mix32(mix32(mix32(pos & _M32) ^ (stream & _M32)) ^ key_lo) ^ key_hi
    return mix32(base), mix32(base ^ 0x9E3779B9)


def resample_draw(slot_of_token, token_key, token_pos, stream, density, samples, sample_count):
    """[T, F] fp32 draws of each token's resampled columns, NaN where none; see `steerkernels.resample_draw`.
    Out-of-range counts are clamped to [0, N] (only reachable with validate=False)."""
    T = slot_of_token.shape[0]
    S, F, N = samples.shape
    out = torch.full((T, F), float("nan"), dtype=torch.float32, device=samples.device)
    slot = slot_of_token.long()
    rows = ((slot >= 0) & (slot < S)).nonzero().squeeze(1)  # [n]
    if rows.numel() == 0 or F == 0:
        return out
    s = slot[rows]  # [n]
    st = stream.long()[s]  # [n, F]
    h1, h2 = resample_bits(token_key.long()[rows], token_pos.long()[rows], st)
    u = (h1 >> 8).float() * 2.0**-24  # NOTE: 24 bits: exact in fp32, in [0, 1)
    count = sample_count.long()[s].clamp(0, N)  # [n, F]
    active = (u < density.float()[s]) & (count > 0)
    idx = ((h2 * count) >> 32).clamp(max=max(N - 1, 0))  # [n, F]: < count; h2 * count < 2**63
    picked = samples.float()[s[:, None], torch.arange(F, device=s.device)[None, :], idx] if N else 0.0
    drawn = torch.where(active, picked, torch.zeros((), device=out.device))
    out[rows] = torch.where(st >= 0, drawn, float("nan"))
    return out


def argmax_rows(logits):
    """[R] int64: per row the index of the largest value (the first of ties; a NaN counts as largest)."""
    return logits.argmax(-1)
