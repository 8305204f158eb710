"""Process memory on CPU (issue #26): keep glibc from handing step buffers back to the kernel, and back
the KV cache with transparent huge pages.

A step's activations are 2-25 MB tensors, allocated and freed every layer. glibc serves those from fresh
`mmap`s (its threshold adapts only up to 32 MB and trims freed heap back to the kernel), so each new
buffer page-faults in 4 KiB pieces: 1.3 of the 1.9 s the prefill GELU took in a fp32 GPT-2-small serving
run was first-touch faults (benchmarks/bench_breakdown.py). `tune_allocator` fixes the mmap threshold at
its 32 MB maximum, never trims, and pads heap growth by 64 MB (without the pad the engine thread's arena
still faulted 10x more: tests/runner/test_cpu_memory.py). Freed buffers are then reused, as tcmalloc or
jemalloc (which vLLM's CPU build preloads) would; the process keeps its peak heap instead of returning it.

Decode attention streams the whole KV cache every step; with 4 KiB pages the hardware prefetchers stop
at every page and every page is a TLB entry. `zeros_hugepages` asks for 2 MiB pages (`madvise
MADV_HUGEPAGE`, which THP's default `madvise` mode honours) on a fresh mapping, before anything touches it,
then faults them in at once, as vLLM's zero-filled cache is at startup.

Both are Linux / glibc only and best effort: elsewhere, or when a call fails, memory stays as it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import mmap
import platform

import torch

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit (HEAP_MAX_SIZE / 2)
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: trim only once 2 GiB lie free at the heap's top
_TOP_PAD = 64 << 20  # a thread's arena grows in whole 64 MB heaps (HEAP_MAX_SIZE)
_HUGE_PAGE = 2 << 20
_state: dict = {}


def _libc():
    if "libc" not in _state:
        name = ctypes.util.find_library("c") if platform.system() == "Linux" else None
        libc = ctypes.CDLL(name, use_errno=True) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        _state["libc"] = libc
    return _state["libc"]


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold at its maximum and turn off trimming (once per process); False where
    this is not glibc or mallopt refused."""
    if "tuned" in _state:
        return _state["tuned"]
    libc = _libc()
    ok = False
    if libc is not None and hasattr(libc, "mallopt") and platform.libc_ver()[0] == "glibc":
        settings = (
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX),
            (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
            (_M_TOP_PAD, _TOP_PAD),
        )
        ok = all([bool(libc.mallopt(param, value)) for param, value in settings])
    if not ok:
        logger.info("malloc tuning not applied (not glibc, or mallopt refused)")
    _state["tuned"] = ok
    return ok


def zeros_hugepages(shape, dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled CPU tensor whose memory asked for 2 MiB pages before anything touched it: a view into
    a fresh anonymous mapping one huge page larger, aligned to one. NOTE: its own mapping, not torch's
    allocator, whose buffers under the 32 MB mmap threshold are heap memory already touched in 4 KiB pages,
    which madvise cannot turn into huge ones. Small tensors, or where madvise fails: plain."""
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if nbytes < _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype)
    # NOTE: private: a shared anonymous mapping is shmem, which THP leaves alone by default
    buf = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # zero pages
    raw = torch.frombuffer(buf, dtype=torch.uint8)  # NOTE: holds `buf`, unmapped with the last view
    offset = -raw.data_ptr() % _HUGE_PAGE  # a multiple of the page size: mmap returns whole pages
    span = (raw.numel() - offset) // _HUGE_PAGE * _HUGE_PAGE  # the whole huge pages inside `raw`
    try:
        buf.madvise(mmap.MADV_HUGEPAGE, offset, span)
    except OSError as exc:
        logger.debug("madvise(MADV_HUGEPAGE) failed: %s", exc)
    # NOTE: one write a huge page faults each in now (the kernel zeroes it), as torch.zeros would have;
    # left to the first steps, the faults cost the first burst of prefills ~2 s (4.8 GB, GPT-2 small)
    raw[offset : offset + span : _HUGE_PAGE].fill_(0)
    return raw[offset : offset + nbytes].view(dtype).view(shape)
