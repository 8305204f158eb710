"""Helpers of the kernel tests: random inputs, per-dtype tolerances, and naive float64 loops.

The naive functions are the ops written the obvious way (Python loops over tokens / rows / ids, float64)
and check the torch references; the references then check the Triton kernels. SAE activations follow
SAELens' own encode() (`library_acts`), never our kernels' formulation: jumprelu keeps the relu
(`relu(pre) * (pre > threshold)`, so a negative threshold passes no negative value), TopK ranks the
token's pre-activations over ALL features and keeps relu(pre) of its top k.
"""

from __future__ import annotations

import torch

# (rtol, atol as a fraction of the largest reference magnitude) per storage dtype; bf16 allows 2 ulp
# because the CPU interpreter truncates fp32 -> bf16 where CUDA rounds to nearest.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rand(gen: torch.Generator, *shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Standard normal values (never zeros), drawn on CPU for reproducibility, then moved."""
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    rtol, atol = TOL[dtype]
    scale = max(float(ref.float().abs().max()), 1.0) if ref.numel() else 1.0
    torch.testing.assert_close(
        out.float().cpu(), ref.float().cpu(), rtol=rtol, atol=atol * scale, msg=what or None
    )


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, NaN payloads included."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.shape == b.shape and torch.equal(a.cpu().view(ints), b.cpu().view(ints))


def token_plan(T: int, S: int, gen: torch.Generator, dtype=torch.int32) -> torch.Tensor:
    """slot_of_token [T] covering every slot and -1; slot S-1 is left for callers to give no work."""
    slot = torch.randint(-1, S, (T,), generator=gen, dtype=torch.int64)
    cover = torch.cat([torch.arange(S), torch.tensor([-1])])
    slot[: min(T, S + 1)] = cover[: min(T, S + 1)]
    return slot.to(dtype)


def naive_steered(slot: int, S: int) -> bool:
    return 0 <= slot < S


def naive_steer_add(h, slot_of_token, slot_vectors):
    out = h.double().clone()
    for t in range(h.shape[0]):
        s = int(slot_of_token[t])
        if naive_steered(s, slot_vectors.shape[0]):
            out[t] += slot_vectors[s].double()
    return out


def naive_project_clamp(h, slot_of_token, slot_dirs, lo, hi, dir_count, token_value=None):
    """A plain loop; `token_value` [T, K]: per-token targets where not NaN."""
    out = h.double().clone()
    for t in range(h.shape[0]):
        s = int(slot_of_token[t])
        if not naive_steered(s, slot_dirs.shape[0]):
            continue
        for k in range(min(int(dir_count[s]), slot_dirs.shape[1])):
            u = slot_dirs[s, k].double()
            c = float(out[t] @ u)
            target = float("nan") if token_value is None else float(token_value[t, k])
            new = target if target == target else min(max(c, float(lo[s, k])), float(hi[s, k]))
            out[t] += (new - c) * u
    return out


def library_acts(x, W_enc, b_enc, b_dec, threshold, apply_b_dec_to_input, topk=None):
    """[T, d_sae] float64 activations as SAELens' encode() computes them (topk: a TopK SAE's k)."""
    pre = (x.double() - (b_dec.double() if apply_b_dec_to_input else 0.0)) @ W_enc.double() + b_enc.double()
    if topk is not None:  # TopK.forward: topk over the pre-activations, relu of the values, scattered
        top = pre.topk(topk, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    acts = pre.relu()
    return acts if threshold is None else acts * (pre > threshold.double())  # JumpReLUSAE.encode


def naive_sae_edit(
    h, slot_of_token, feat_idx, W_enc, b_enc, W_dec, b_dec, threshold, apply_b_dec_to_input, mode, value,
    topk=None, token_value=None,
):  # fmt: skip
    """A plain loop; `token_value` [T, F]: per-token targets where not NaN."""
    out = h.double().clone()
    acts = library_acts(h, W_enc, b_enc, b_dec, threshold, apply_b_dec_to_input, topk)  # [T, d_sae]
    for t in range(h.shape[0]):
        s = int(slot_of_token[t])
        if not naive_steered(s, feat_idx.shape[0]):
            continue
        for j in range(feat_idx.shape[1]):
            f = int(feat_idx[s, j])
            if f < 0:
                continue
            a = float(acts[t, f])
            new = a * float(value[s, j]) if int(mode[s, j]) == 1 else float(value[s, j])
            target = float("nan") if token_value is None else float(token_value[t, j])
            new = target if target == target else new
            out[t] += (new - a) * W_dec[f].double()
    return out


def naive_logit_bias(logits, temp, sids, sbias, bank, didx, pids, pcounts, rep, pres, freq):
    out = logits.double().clone()
    R, V = logits.shape
    for r in range(R):
        for j in range(sids.shape[1]):
            if 0 <= int(sids[r, j]) < V:
                out[r, int(sids[r, j])] += float(sbias[r, j])
        for j in range(didx.shape[1]):
            if 0 <= int(didx[r, j]) < bank.shape[0]:
                out[r] += bank[int(didx[r, j])].double()
        for j in range(pids.shape[1]):
            tok = int(pids[r, j])
            if not 0 <= tok < V:
                continue
            x = float(out[r, tok])
            x = x / float(rep[r]) if x > 0 else x * float(rep[r])
            n = int(pcounts[r, j])
            x = x - (float(pres[r]) if n > 0 else 0.0) - float(freq[r]) * n
            out[r, tok] = x
        out[r] /= float(temp[r])
    return out


def naive_encode(x, W_enc, b_enc, b_dec, thr, apply_b_dec, topk=None):
    """[T, d_sae] float64 activations (SAELens' encode())."""
    return library_acts(x, W_enc, b_enc, b_dec, thr, apply_b_dec, topk)


M32 = 0xFFFFFFFF


def py_mix32(x: int) -> int:
    """Wellons' lowbias32 on a Python int: the hash of the resample stream, written from its spec."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def py_bits(key: int, pos: int, stream: int) -> tuple[int, int]:
    """The resample stream's (h1, h2) on Python ints (negative keys: two's complement by & and >>)."""
    base = py_mix32(py_mix32(py_mix32(pos & M32) ^ (stream & M32)) ^ (key & M32)) ^ ((key >> 32) & M32)
    return py_mix32(base), py_mix32(base ^ 0x9E3779B9)
