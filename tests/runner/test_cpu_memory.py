"""CPU process memory (runner/cpu_memory.py): after `tune_allocator` a freed step-sized buffer comes back
without page faults; `zeros_hugepages` gives 2 MiB-aligned tensors that the kernel backs with huge pages
(read from /proc/self/smaps), and the CPU KV cache is built on it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steerserve.runner import cpu_memory
from steerserve.runner.attention import KVCache

linux_glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc on Linux only"
)


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "never"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else "never"


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping that holds `address` in this process."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


_PROBE = """
import resource, sys, threading, torch
if sys.argv[1] == "tuned":
    from steerserve.runner import cpu_memory
    assert cpu_memory.tune_allocator() and cpu_memory.tune_allocator()  # idempotent

def step():  # prefill-sized activations: [rows, 4d] and [rows, d] fp32, 0.2-25 MB
    for rows in (2048, 1900, 2047, 64, 512):
        a = torch.empty(rows, 3072).fill_(1.5)
        b = torch.empty(rows, 768).fill_(1.0)
        del a

def engine():  # NOTE: in a thread, as the server's engine runs: its own malloc arena
    step()  # the arena grows to its peak once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

thread = threading.Thread(target=engine)
thread.start()
thread.join()
"""


@linux_glibc
@pytest.mark.skipif(
    _thp_mode() == "always", reason="THP 'always' faults whole 2 MiB pages: counts say nothing"
)
def test_tuned_allocator_reuses_freed_step_buffers_without_faults():
    def faults(mode: str) -> int:
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0"}  # 4 KiB pages: the allocator's effect alone
        cmd = [sys.executable, "-c", _PROBE, mode]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    tuned, untuned = faults("tuned"), faults("untuned")
    # untuned, glibc maps the engine thread's buffers anew every step (~61,000 faults here, 2 cores, 2.36)
    assert tuned * 5 < untuned, (tuned, untuned)
    assert tuned < 15_000, tuned  # under 60 MB faulted in, over 5 steps that write ~650 MB


@linux_glibc
@pytest.mark.parametrize("shape,dtype", [((3, 70_001, 13), torch.float32), ((2, 1_234_567), torch.bfloat16)])
def test_zeros_hugepages_is_an_aligned_working_tensor(shape, dtype):
    t = cpu_memory.zeros_hugepages(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
    assert t.data_ptr() % (2 << 20) == 0
    data = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    t.copy_(data)
    assert torch.equal(t, data)
    if _thp_mode() in ("always", "madvise"):
        assert _anon_huge_kb(t.data_ptr()) >= 2048  # at least one 2 MiB page backs it


@linux_glibc
@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off here")
def test_zeros_hugepages_faults_its_pages_in_when_made():
    """Before anything writes it, the tensor is already backed (by huge pages): a first burst of prefills
    does not pay the faults (~2 s for GPT-2 small's 4.8 GB fp32 cache, benchmarks/bench_breakdown.py)."""
    t = cpu_memory.zeros_hugepages((9, 1_000_003), torch.float32)  # 34 MiB
    assert _anon_huge_kb(t.data_ptr()) >= t.numel() * 4 // 1024 // 2  # most of it, untouched by us
    assert not t.any()


def test_small_tensors_stay_plain():
    t = cpu_memory.zeros_hugepages((5, 7), torch.float32)
    assert t.shape == (5, 7) and t.untyped_storage().nbytes() == 5 * 7 * 4


def test_cpu_kv_cache_is_zeroed_on_hugepages():
    cache = KVCache(2, 3, 40, 9_000, torch.bfloat16, "cpu")
    for t in (*cache.keys, *cache.values):
        assert t.shape == (3, 9_000, 40) and t.dtype == torch.bfloat16 and not t.any()
        if platform.system() == "Linux":
            assert t.data_ptr() % (2 << 20) == 0
    cache.keys[0][1, 5].fill_(2.0)  # the tensors are separate buffers
    assert cache.keys[0].count_nonzero() == 40 and not cache.keys[1].any() and not cache.values[0].any()


_THP_PROBE = """
import steerserve, torch  # steerserve first, as the server's entry points import it
t = torch.empty(16 << 20, dtype=torch.uint8)
t.fill_(3)
print(t.data_ptr())
lines = open("/proc/self/smaps").read().splitlines()
"""


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off here")
def test_importing_steerserve_first_gives_torch_allocations_huge_pages():
    code = (
        _THP_PROBE
        + "from tests.runner.test_cpu_memory import _anon_huge_kb\nprint(_anon_huge_kb(t.data_ptr()))"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) >= 2048
    env["THP_MEM_ALLOC_ENABLE"] = "0"  # the operator's setting wins
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert _thp_mode() == "always" or int(out.stdout.split()[-1]) == 0
