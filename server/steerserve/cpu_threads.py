"""OpenMP threads on CPU: the engine thread is the one thread of the server that computes in parallel
(issue #26).

torch's CPU ops and our C++ kernels run on OpenMP (libgomp in torch's wheels). Every thread that starts a
parallel region gets its own pool of workers, and libgomp counts the workers of all pools: once they
outnumber the cores, each worker spins only ~100 times after a region (GOMP's throttled spin count, which
no variable raises) before it sleeps on a futex, so every later region, a GEMM or a layer norm, wakes
its workers through the kernel. The server loads its model on the event loop's thread and steps on the
engine thread: two pools, three threads on a 2-core machine. It served 12-19% fewer tokens/s than the same
steps run engine-only in a process with one pool (interleaved), and a 32-row layer norm or add took ~65 us
instead of ~12. With it, the same server served 1.05-1.16x the tokens/s (bursts
alternating between a server with it and one without, 2026-12-06).

`serialize_this_thread()` gives the calling thread's workers back (`omp_pause_resource_all`) and runs
its later parallel regions on itself alone: `omp_set_num_threads(1)` for torch's and oneDNN's regions,
`mkl_set_num_threads_local(1)` for MKL's (it asks for its own global count, so an MKL call on a serial
thread would build a new pool). Both are the calling thread's own settings: the engine thread keeps
torch's thread count. The HTTP side calls it on the event loop's thread once the engine is built
and on each thread of its worker pools (api/executors.py), so the engine thread's pool is the process's
only one. Work on those threads is light (tokenizing, compiling steering, parsing
uploads); what is heavy runs on the engine thread (engine/jobs.py).

Best effort: where no OpenMP runtime is loaded (or it lacks OpenMP 5's pause), nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import threading

import torch

logger = logging.getLogger(__name__)

_TORCH_CPU = "libtorch_cpu"
_OMP_PAUSE_SOFT = 1
_lock = threading.Lock()
_state: dict = {}  # "lib": torch's CPU library, its OpenMP and MKL functions set up, or None


def _torch_cpu_library() -> str | None:
    """The path of torch's CPU library as mapped into this process (Linux), if any."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if path.startswith("/") and path.rsplit("/", 1)[-1].startswith(_TORCH_CPU):
                    return path
    except OSError:
        pass
    return None


def openmp_runtime():
    """A ctypes handle on torch's CPU library, whose `omp_*` symbols resolve to the OpenMP runtime torch
    runs on, or None (not Linux, no OpenMP 5 runtime). NOTE: through torch's library, not by a runtime's
    name: a process may map several (sentencepiece's wheel brings its own libgomp)."""
    with _lock:
        if "lib" not in _state:
            _state["lib"] = None
            path = _torch_cpu_library()
            try:
                lib = ctypes.CDLL(path) if path else None
                if lib is not None:
                    lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
                    lib.omp_set_num_threads.argtypes = [ctypes.c_int]
                    # NOTE: MKL's C symbol (mkl.h's macro); the lower-case one is the Fortran one, by pointer
                    mkl = getattr(lib, "MKL_Set_Num_Threads_Local", None)
                    if mkl is not None:
                        mkl.argtypes, mkl.restype = [ctypes.c_int], ctypes.c_int
                    lib.mkl_local = mkl
                    _state["lib"] = lib
            except (OSError, AttributeError) as exc:
                logger.info("no OpenMP runtime to set up in %s (%s): threads stay as they are", path, exc)
        return _state["lib"]


def serialize_this_thread() -> bool:
    """Free the calling thread's OpenMP workers and run its later parallel regions on itself alone; the
    process's other threads keep theirs. Returns whether it did."""
    lib = openmp_runtime()
    if lib is None:
        return False
    # NOTE: torch sets a thread's OpenMP thread count on its first parallel op (from its global count), so
    # that has happened (get_num_threads) before this thread's count is set to 1
    torch.get_num_threads()
    lib.omp_set_num_threads(1)
    if lib.mkl_local is not None:
        lib.mkl_local(1)
    return lib.omp_pause_resource_all(_OMP_PAUSE_SOFT) == 0
