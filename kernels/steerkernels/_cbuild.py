"""Build C++ sources into a shared library once per machine, and open it with ctypes.

Plain C ABI libraries (no torch headers) compile in a second or two with the system C++ compiler. The
result is cached under `$STEERSERVE_KERNEL_CACHE`, else `$XDG_CACHE_HOME/steerserve/kernels`, else
`~/.cache/steerserve/kernels`, keyed by a hash of the sources, the flags, the compiler and the CPU (the
code is built with -march=native, so another CPU builds its own). `open_library` is what callers use:
built, opened, ABI-checked and set up, or None with one log line saying what runs instead. Used by
steerkernels' CPU backend (csrc/cpu_steer.cpp) and the server's CPU attention.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"])  # the first that compiles
COMMON_FLAGS = ["-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]


def cache_dir() -> Path:
    if os.environ.get("STEERSERVE_KERNEL_CACHE"):
        return Path(os.environ["STEERSERVE_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "steerserve" / "kernels"


def cpu_signature() -> str:
    """The CPU's model and feature flags: -march=native code must not run on another CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(name: str, cxx: str, sources, headers=()) -> Path:
    """The path of `name`'s library for these sources, compiled now unless already cached."""
    src = b"\0".join(Path(p).read_bytes() for p in (*sources, *headers))
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(
            b"\0".join(
                [src, " ".join(flags + COMMON_FLAGS).encode(), version.encode(), cpu_signature().encode()]
            )
        ).hexdigest()[:16]
        out = cache_dir() / f"{name}_{key}.so"
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        # NOTE: build into a temp file and rename: concurrent builders never see a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [cxx, *flags, *COMMON_FLAGS, *map(str, sources), "-o", tmp],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode == 0:
            os.chmod(tmp, 0o755)
            os.replace(tmp, out)
            logger.info("built %s in %.1f s", out, time.perf_counter() - t0)
            return out
        os.unlink(tmp)
        errors.append(f"{' '.join(flags)}: {proc.stderr.strip()[-2000:]}")
    raise RuntimeError("compilation failed:\n" + "\n".join(errors))


def load_once(state: dict, lock, opener: Callable):
    """`state["lib"]`, set by `opener()` (a library or None) on the first call only: double-checked under
    `lock`, so concurrent first callers build once. Callers keep `state` as a module global (tests reset it)."""
    if "lib" not in state:
        with lock:
            if "lib" not in state:
                state["lib"] = opener()
    return state["lib"]


def open_library(
    name: str, sources, headers=(), *, abi: tuple[str, int], setup: Callable, what: str, fallback: str
):
    """`name`'s library (built if needed) with `setup(lib)` applied, or None when it cannot be had here.

    abi: (symbol, version): the library's `symbol()` must return `version` (a stale cache never loads).
    what / fallback: for the log line, e.g. "CPU attention kernel" / "SDPA". Never raises: a machine
    without a compiler, or where the build fails, runs the fallback.
    """
    if platform.system() != "Linux":
        logger.info("%s: only built on Linux; using %s", what, fallback)
        return None
    cxx = compiler()
    if cxx is None:
        logger.warning("%s: no C++ compiler found (set CXX); using %s", what, fallback)
        return None
    try:
        path = build(name, cxx, sources, headers)
        lib = ctypes.CDLL(str(path))
        symbol, version = abi
        found = getattr(lib, symbol)()
        if found != version:
            raise RuntimeError(f"{path}: ABI version {found} != {version}")
        setup(lib)
        return lib
    except Exception as exc:  # any failure means the fallback, never a dead caller
        logger.warning("%s unavailable, using %s: %s", what, fallback, exc)
        return None
