"""The CPU attention kernels (csrc/): build, load, and call them with ctypes.

Per layer and step: one call writes the step's new keys and values into the cache; one attends every
decode row (all requests, all heads); one attends every prefill chunk (causal within the chunk, over
its cached past). Keys are read in place from the `[n_kv_heads, rows, head_dim]` cache (a start row
when a request's blocks are contiguous, a row index when fragmented). fp32 and bf16 queries and caches;
GQA, sliding window and soft-capping. Decode is vectorised for AVX-512 and for AVX2 + FMA (scalar
elsewhere); prefill needs one of the two (else SDPA does the chunks).

The library is plain C ABI (no torch headers), compiled on first use with the system C++ compiler
(`-O3 -march=native -fopenmp`, about 1-2 s) into a per-machine cache (steerkernels/_cbuild.py), so a
machine compiles it once.
When the build or load fails (no compiler, odd CPU), `load()` returns None once with a warning and
attention stays on PyTorch SDPA. `STEERSERVE_CPU_ATTENTION=0` turns the kernels off,
`STEERSERVE_CPU_PREFILL=0` only the prefill one.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import torch

from steerkernels import _cbuild

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "cpu_attention.cpp", CSRC / "cpu_prefill.cpp")
HEADERS = (
    CSRC / "cpu_simd.h",
    CSRC / "cpu_attention.h",
    CSRC / "cpu_decode_avx2.h",
    CSRC / "cpu_decode_avx512.h",
)
ABI_VERSION = 4
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}

PREFILL = os.environ.get("STEERSERVE_CPU_PREFILL", "1") != "0"  # prefill chunks on the kernel too
_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library or None once tried


class AttnArgs(ctypes.Structure):
    """Mirror of `AttnArgs` in csrc/cpu_attention.h (element strides)."""

    _fields_ = [
        ("q", ctypes.c_void_p),
        ("q_row", ctypes.c_int64),
        ("q_head", ctypes.c_int64),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
        ("cache_head", ctypes.c_int64),
        ("out", ctypes.c_void_p),
        ("out_row", ctypes.c_int64),
        ("out_head", ctypes.c_int64),
        ("q_rows", ctypes.c_void_p),
        ("q_lens", ctypes.c_void_p),
        ("ctx_lens", ctypes.c_void_p),
        ("starts", ctypes.c_void_p),
        ("gather", ctypes.c_void_p),
        ("rows", ctypes.c_void_p),
        ("n_req", ctypes.c_int64),
        ("n_heads", ctypes.c_int64),
        ("n_kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("window", ctypes.c_int64),
        ("scale", ctypes.c_float),
        ("softcap", ctypes.c_float),
        ("q_dtype", ctypes.c_int32),
        ("kv_dtype", ctypes.c_int32),
        ("n_threads", ctypes.c_int32),
    ]


class WriteArgs(ctypes.Structure):
    """Mirror of `WriteArgs` in the C++ source."""

    _fields_ = [
        ("key", ctypes.c_void_p),
        ("value", ctypes.c_void_p),
        ("k_head", ctypes.c_int64),
        ("k_row", ctypes.c_int64),
        ("v_head", ctypes.c_int64),
        ("v_row", ctypes.c_int64),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
        ("cache_head", ctypes.c_int64),
        ("slots", ctypes.c_void_p),
        ("n_tokens", ctypes.c_int64),
        ("n_kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("src_dtype", ctypes.c_int32),
        ("kv_dtype", ctypes.c_int32),
        ("n_threads", ctypes.c_int32),
    ]


def _setup(lib) -> None:
    lib.ss_decode_attention.argtypes = [ctypes.POINTER(AttnArgs)]
    lib.ss_decode_reads.argtypes = [ctypes.POINTER(AttnArgs)]
    lib.ss_decode_reads.restype = ctypes.c_uint64
    lib.ss_prefill_attention.argtypes = [ctypes.POINTER(AttnArgs)]
    lib.ss_write_kv.argtypes = [ctypes.POINTER(WriteArgs)]
    lib.isa = int(lib.ss_isa())  # 2 AVX-512, 1 AVX2 + FMA, 0 none (scalar decode, SDPA prefill)
    lib.has_prefill = lib.isa > 0


def load():
    """The kernel library (built on first use), or None when it cannot be had on this machine."""
    return _cbuild.load_once(_state, _lock, _try_load)


def _try_load():
    if os.environ.get("STEERSERVE_CPU_ATTENTION", "1") == "0":
        return None
    return _cbuild.open_library(
        "cpu_attention", SOURCES, HEADERS, abi=("ss_abi_version", ABI_VERSION), setup=_setup,
        what="CPU attention kernel", fallback="SDPA",
    )  # fmt: skip


def available() -> bool:
    return load() is not None


def preferred_kv_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The KV-cache dtype to pick on CPU for `auto`: the model's own when the kernel runs it (bf16 halves
    the bytes decode reads, and is what HF's own bf16 cache holds), else fp32 (SDPA's fast CPU dtype)."""
    return model_dtype if model_dtype in DTYPE_CODES and available() else torch.float32


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class SpanArrays:
    """Spans as the kernel's arrays and argument block (pointers into tensors this object keeps)."""

    def __init__(self, spans):
        self.spans = spans
        self.n = len(spans)
        gathered, offsets, total = [], [], 0
        for s in spans:
            if s.gather_index is None:
                offsets.append(-1)
            else:
                offsets.append(total)
                gathered.append(s.gather_index.to(torch.int64))
                total += s.gather_index.numel()
        cols = [[getattr(s, f) for s in spans] for f in ("q_start", "q_len", "ctx_len", "cache_start")]
        self.meta = torch.tensor([*cols, offsets], dtype=torch.int64).reshape(5, -1)  # [5, n]
        self.rows = torch.cat(gathered) if gathered else None
        self.args = AttnArgs()
        base, step = self.meta.data_ptr(), self.meta.stride(0) * 8
        a = self.args
        a.q_rows, a.q_lens, a.ctx_lens = base, base + step, base + 2 * step
        a.starts, a.gather = base + 3 * step, base + 4 * step
        a.rows = _ptr(self.rows)
        a.n_req = self.n


def _check_span(s, n_tokens: int, cache_rows: int) -> None:
    ok = s.q_start >= 0 and s.q_len >= 1 and s.q_start + s.q_len <= n_tokens and s.ctx_len >= s.q_len
    if s.gather_index is None:
        ok = ok and s.cache_start >= 0 and s.cache_start + s.ctx_len <= cache_rows
    else:
        idx = s.gather_index
        ok = ok and idx.numel() >= s.ctx_len and int(idx.min()) >= 0 and int(idx.max()) < cache_rows
    if not ok:
        raise ValueError(f"span outside the batch or the cache ({n_tokens} tokens, {cache_rows} rows): {s}")


class StepPlan:
    """One step's spans for the kernels, built by the first layer and reused by the others: decode rows,
    prefill chunks for the prefill kernel, and (without it) the chunks left to SDPA.

    NOTE: the kernels trust these indices, so they are bounds-checked here, once per step.
    """

    def __init__(self, spans, slot_mapping: torch.Tensor, n_tokens: int, cache_rows: int, prefill: bool):
        self.slots = slot_mapping.to(torch.int64).contiguous()  # [T]
        if self.slots.numel() != n_tokens or (
            n_tokens and not (int(self.slots.min()) >= 0 and int(self.slots.max()) < cache_rows)
        ):
            raise ValueError(f"slot mapping out of range for {n_tokens} tokens and {cache_rows} cache rows")
        for s in spans:
            _check_span(s, n_tokens, cache_rows)
        chunks = [s for s in spans if s.q_len != 1]
        self.decode = SpanArrays([s for s in spans if s.q_len == 1])
        self.prefill = SpanArrays(chunks) if prefill and chunks else None
        self.sdpa_spans = [] if prefill else chunks


def write_kv(lib, key, value, k_cache, v_cache, slots) -> None:
    """k_cache[:, slots[t]] = key[0, :, t] (and values), converting to the cache's dtype."""
    a = WriteArgs()
    k, v = key[0], value[0]  # [H_kv, T, hd]
    a.key, a.value = k.data_ptr(), v.data_ptr()
    a.k_head, a.k_row, a.v_head, a.v_row = k.stride(0), k.stride(1), v.stride(0), v.stride(1)
    a.k_cache, a.v_cache, a.cache_head = k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0)
    a.slots = slots.data_ptr()
    a.n_tokens, a.n_kv_heads, a.head_dim = k.shape[1], k.shape[0], k.shape[2]
    a.src_dtype, a.kv_dtype = DTYPE_CODES[key.dtype], DTYPE_CODES[k_cache.dtype]
    a.n_threads = torch.get_num_threads()
    if lib.ss_write_kv(ctypes.byref(a)) != 0:
        raise RuntimeError("ss_write_kv: unsupported dtypes")


def _fill(a: AttnArgs, query, k_cache, v_cache, out, scale, window, softcap) -> None:
    q = query[0]  # [H, T, hd]
    a.q, a.q_row, a.q_head = q.data_ptr(), q.stride(1), q.stride(0)
    a.k_cache, a.v_cache, a.cache_head = k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0)
    a.out, a.out_row, a.out_head = out.data_ptr(), out.stride(0), out.stride(1)
    a.n_heads, a.n_kv_heads, a.head_dim = q.shape[0], k_cache.shape[0], q.shape[2]
    a.window = window or 0
    a.scale, a.softcap = scale, softcap or 0.0
    a.q_dtype, a.kv_dtype = DTYPE_CODES[query.dtype], DTYPE_CODES[k_cache.dtype]
    a.n_threads = torch.get_num_threads()


def decode_attention(lib, spans: SpanArrays, query, k_cache, v_cache, out, scale, window, softcap) -> None:
    """out[q_row] = attention of each decode row over its cached keys; query [1, H, T, hd], out [T, H, hd]."""
    _fill(spans.args, query, k_cache, v_cache, out, scale, window, softcap)
    if lib.ss_decode_attention(ctypes.byref(spans.args)) != 0:
        raise RuntimeError("ss_decode_attention: unsupported dtypes")


def decode_reads(lib, spans: SpanArrays, query, k_cache, v_cache, window=None) -> int:
    """Read every cache row `decode_attention` would, in its order, and nothing else (a benchmark's bound:
    benchmarks/bench_attention.py); returns the rows' XOR fold (64-bit words, a row's tail zero-padded)."""
    _fill(spans.args, query, k_cache, v_cache, query[0].transpose(0, 1), 1.0, window, None)
    return int(lib.ss_decode_reads(ctypes.byref(spans.args)))


def prefill_attention(lib, spans: SpanArrays, query, k_cache, v_cache, out, scale, window, softcap) -> None:
    """out[rows of each chunk] = causal attention of the chunk over its cached past and itself."""
    _fill(spans.args, query, k_cache, v_cache, out, scale, window, softcap)
    if lib.ss_prefill_attention(ctypes.byref(spans.args)) != 0:
        raise RuntimeError("ss_prefill_attention: unsupported dtypes or no AVX-512 / AVX2")
