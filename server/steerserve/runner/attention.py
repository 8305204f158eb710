"""Our attention function, registered with transformers' AttentionInterface as "steerserve".

transformers' own modeling code computes q/k/v (rotary, q/k norms, scaling...) and calls this function;
we write the new keys and values into our paged KV cache and attend each request's queries to its own
cached keys. The batch is packed: `[1, T]` tokens of many requests, described by `AttentionMetadata`,
which reaches us as the forward kwarg `steer_attn`.

Two kinds of metadata: `AttentionMetadata` (per-request spans, built on the host) and `PagedMetadata`
(block tables and lengths as device tensors only: what a CUDA graph replays). With `PagedMetadata`,
steerkernels' paged kernels write k/v at the slot mapping and attend every row of every request in one
launch (Triton on CUDA, or under TRITON_INTERPRET=1; else their torch reference).

With `AttentionMetadata`, on CPU (fp32/bf16), the C++ kernels of cpu_attention.py do the KV write and the attention of all
requests in one call per layer each for decode rows and prefill chunks, reading keys in place (a
start row, or a row index for fragmented requests). Elsewhere (CUDA, other dtypes, no compiler):
PyTorch SDPA per request. NOTE: there, a request whose blocks are contiguous (the usual case, see
engine/kv_cache.py) is attended to as a view of the cache; only fragmented requests pay a gather.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import steerkernels
from steerserve.runner import cpu_attention, cpu_memory

ATTENTION_NAME = "steerserve"
logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RequestSpan:
    """One request's tokens in the packed batch and where its keys live."""

    q_start: int  # first row of this request in the packed batch
    q_len: int
    ctx_len: int  # keys attended to: cached + new tokens
    cache_start: int  # first cache row when contiguous, else -1
    gather_index: torch.Tensor | None  # [ctx_len] cache rows when fragmented


@dataclass(slots=True)
class AttentionMetadata:
    spans: list[RequestSpan]
    slot_mapping: torch.Tensor  # [T] cache row each new token's k/v is written to
    cpu_plan: cpu_attention.StepPlan | None = None  # built by the first layer on the CPU kernel path


@dataclass(slots=True)
class PagedMetadata:
    """The step as the paged kernels read it (steerkernels.paged_attention): N sequences, T rows."""

    slot_mapping: torch.Tensor  # [T] cache row each new token's k/v is written to; -1 = padding row
    block_table: torch.Tensor  # [N, max_blocks]
    seq_lens: torch.Tensor  # [N] keys of each sequence (cached + new); 0 = padding sequence
    query_start_loc: torch.Tensor  # [N + 1] first row of each sequence in the packed batch
    token_seq: torch.Tensor  # [T] each row's sequence; -1 = padding row
    block_size: int


class KVCache:
    """The cache tensors: one `[n_kv_heads, num_rows, head_dim]` pair per layer."""

    def __init__(self, n_layers, n_kv_heads, head_dim, num_rows, dtype, device):
        shape = (n_kv_heads, num_rows, head_dim)

        def zeros():
            if torch.device(device).type != "cpu":
                return torch.zeros(shape, dtype=dtype, device=device)
            return cpu_memory.zeros_hugepages(shape, dtype)  # NOTE: decode streams it every step

        self.keys = [zeros() for _ in range(n_layers)]
        self.values = [zeros() for _ in range(n_layers)]

    @staticmethod
    def bytes_per_token(n_layers, n_kv_heads, head_dim, dtype) -> int:
        return 2 * n_layers * n_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def _span_mask(span: RequestSpan, window: int | None, device) -> torch.Tensor:
    """[q_len, ctx_len] bool: key j visible to query i (causal, and within the sliding window)."""
    past = span.ctx_len - span.q_len
    q_pos = torch.arange(past, span.ctx_len, device=device)[:, None]
    k_pos = torch.arange(span.ctx_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def _softcapped_attention(q, k, v, mask, scaling, softcap):
    """Eager attention with tanh soft-capping (Gemma-2): SDPA has no softcap."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # [1, H, q, ctx]
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


def _span_attention(q, k_cache, v_cache, span: RequestSpan, scaling, sliding_window, softcap, gqa):
    """One request's rows `q` [1, H, q, hd] attended to its cached keys (SDPA, or eager when soft-capped)."""
    first = 0
    if sliding_window is not None and span.q_len == 1:
        first = max(0, span.ctx_len - sliding_window)  # decode: only the window's keys
    if span.gather_index is None:
        lo = span.cache_start + first
        k = k_cache[:, lo : span.cache_start + span.ctx_len].unsqueeze(0)
        v = v_cache[:, lo : span.cache_start + span.ctx_len].unsqueeze(0)
    else:
        idx = span.gather_index[first:]
        k = k_cache.index_select(1, idx).unsqueeze(0)
        v = v_cache.index_select(1, idx).unsqueeze(0)
    mask = None
    causal = False
    if span.q_len > 1:
        if span.q_len == span.ctx_len and sliding_window is None:
            causal = True
        else:
            mask = _span_mask(span, sliding_window, q.device)
    if softcap is not None:
        if causal:
            mask = _span_mask(span, None, q.device)
        return _softcapped_attention(q, k, v, mask, scaling, softcap)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=gqa
    )


def _kernel_for(query, key, value, k_cache, dropout):
    """The CPU kernel library when it can run this call, else None (-> the SDPA path)."""
    if query.device.type != "cpu" or dropout != 0.0:
        return None
    codes = cpu_attention.DTYPE_CODES
    if (
        query.dtype not in codes
        or key.dtype not in codes
        or k_cache.dtype not in codes
        or value.dtype != key.dtype
    ):
        return None
    if query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1 or not k_cache.is_contiguous():
        return None
    if query.shape[1] % key.shape[1] != 0:
        return None
    return cpu_attention.load()


def steerserve_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H, T, hd]
    key: torch.Tensor,  # [1, H_kv, T, hd]
    value: torch.Tensor,  # [1, H_kv, T, hd]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    steer_attn: AttentionMetadata | None = None,
    steer_cache: KVCache | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if steer_attn is None or steer_cache is None:
        raise RuntimeError("steerserve attention called without batch metadata: use the ModelRunner")
    layer = module.layer_idx
    k_cache, v_cache = steer_cache.keys[layer], steer_cache.values[layer]  # [H_kv, rows, hd]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if isinstance(steer_attn, PagedMetadata):
        return _paged_attention(
            query, key, value, k_cache, v_cache, steer_attn, scaling, sliding_window, softcap
        )
    gqa = query.shape[1] != key.shape[1]
    lib = _kernel_for(query, key, value, k_cache, dropout)
    if lib is not None:
        return _kernel_attention(
            lib, query, key, value, k_cache, v_cache, steer_attn, scaling, sliding_window, softcap
        )

    k_cache.index_copy_(1, steer_attn.slot_mapping, key[0].to(k_cache.dtype))
    v_cache.index_copy_(1, steer_attn.slot_mapping, value[0].to(v_cache.dtype))
    out_dtype = query.dtype
    query = query.to(k_cache.dtype)  # NOTE: attention runs in the cache's dtype (fp32 on CPU, see config)
    outputs = []
    for span in steer_attn.spans:
        q = query[:, :, span.q_start : span.q_start + span.q_len]  # [1, H, q, hd]
        outputs.append(_span_attention(q, k_cache, v_cache, span, scaling, sliding_window, softcap, gqa))
    attn = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)  # [1, H, T, hd]
    return attn.transpose(1, 2).to(out_dtype).contiguous(), None


def _kernel_attention(lib, query, key, value, k_cache, v_cache, meta, scaling, sliding_window, softcap):
    """CPU: the C++ kernels write k/v, attend all decode rows in one call and all prefill chunks in
    another (SDPA does the chunks where the prefill kernel is not built)."""
    plan = meta.cpu_plan
    if plan is None:
        prefill = lib.has_prefill and cpu_attention.PREFILL
        plan = meta.cpu_plan = cpu_attention.StepPlan(
            meta.spans, meta.slot_mapping, query.shape[2], k_cache.shape[1], prefill
        )
    cpu_attention.write_kv(lib, key, value, k_cache, v_cache, plan.slots)
    n_tokens, n_heads, head_dim = query.shape[2], query.shape[1], query.shape[3]
    out = torch.empty(n_tokens, n_heads, head_dim, dtype=query.dtype)  # [T, H, hd]
    args = (query, k_cache, v_cache, out, scaling, sliding_window, softcap)
    if plan.decode.n:
        cpu_attention.decode_attention(lib, plan.decode, *args)
    if plan.prefill is not None:
        cpu_attention.prefill_attention(lib, plan.prefill, *args)
    gqa = n_heads != key.shape[1]
    for span in plan.sdpa_spans:
        q = query[:, :, span.q_start : span.q_start + span.q_len].to(k_cache.dtype)  # [1, H, q, hd]
        res = _span_attention(q, k_cache, v_cache, span, scaling, sliding_window, softcap, gqa)
        out[span.q_start : span.q_start + span.q_len] = res[0].transpose(0, 1)
    return out.unsqueeze(0), None


def _paged_attention(
    query, key, value, k_cache, v_cache, meta: PagedMetadata, scaling, sliding_window, softcap
):
    """Every row in one launch of the paged kernels; no host sync (CUDA-graph safe)."""
    steerkernels.write_kv(
        key[0].transpose(0, 1), value[0].transpose(0, 1), k_cache, v_cache, meta.slot_mapping
    )
    q = query[0].transpose(0, 1).to(k_cache.dtype)  # [T, H, hd]; NOTE: attention in the cache's dtype
    out = steerkernels.paged_attention(
        q, k_cache, v_cache, meta.block_table, meta.seq_lens, meta.query_start_loc, meta.token_seq,
        block_size=meta.block_size, scale=scaling, sliding_window=sliding_window, softcap=softcap,
    )  # fmt: skip
    return out.to(query.dtype).unsqueeze(0), None  # [1, T, H, hd]


def paged_kernels_work(device: torch.device, dtype: torch.dtype) -> bool:
    """The paged kernels agree with their torch reference here (two sequences, a decode row and a
    prefill chunk over scattered blocks, GQA): a start-up check before a server relies on them."""
    try:
        gen = torch.Generator().manual_seed(0)
        hk, h, hd, bs = 2, 4, 64, 16

        def rand(*shape):
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

        k_cache, v_cache = rand(hk, 8 * bs, hd), rand(hk, 8 * bs, hd)
        key, value, q = rand(4, hk, hd), rand(4, hk, hd), rand(4, h, hd)
        table = torch.tensor([[5, 2, 0], [7, 1, 3]], device=device)
        seq_lens = torch.tensor([20, 35], device=device)
        qsl = torch.tensor([0, 1, 4], device=device)
        token_seq = torch.tensor([0, 1, 1, 1], device=device)
        slots = torch.tensor([2 * bs + 3, 3 * bs, 3 * bs + 1, 3 * bs + 2], device=device)
        results = []
        for backend in ("auto", "torch"):
            kc, vc = k_cache.clone(), v_cache.clone()
            steerkernels.write_kv(key, value, kc, vc, slots, backend=backend)
            out = steerkernels.paged_attention(
                q, kc, vc, table, seq_lens, qsl, token_seq, block_size=bs, scale=hd**-0.5, backend=backend
            )
            results.append(out.float())
        tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
        return bool(torch.allclose(results[0], results[1], atol=tol, rtol=tol))
    except Exception:
        logger.exception("paged attention check")
        return False


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, steerserve_attention)
