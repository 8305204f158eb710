"""The vector ISA our `-march=native` C kernels should report on this CPU, read from /proc/cpuinfo: a
build that silently fell back to the flags without -march=native runs scalar loops, right but several
times slower, which value tests cannot tell."""

from __future__ import annotations

import pytest


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(ln.split(":", 1)[1].split()) for ln in f if ln.startswith("flags")), set())
    except OSError:
        return set()


def expected_isa() -> int:
    """2 with AVX-512 (F, BW, VL), 1 with AVX2 + FMA (the kernels' `ss_isa` codes); skips the test elsewhere."""
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        return 2
    if {"avx2", "fma"} <= flags:
        return 1
    pytest.skip("neither AVX-512 nor AVX2 + FMA here")
