"""Thread pools for blocking work done on behalf of HTTP routes, one per kind of work.

Why separate pools: starlette's `run_in_threadpool` shares one anyio pool (40 threads) between every
route, so 60 slow registry searches could hold every thread while steered generations waited to compile
their steering. Generation-path work (steering compile, capture planning) gets its own pool; registry
reads and writes get a smaller one, so slow registry work queues behind itself, never in front of
generation.
Their threads compute serially: the engine thread's OpenMP pool is to be the process's only one
(cpu_threads.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from steerserve.cpu_threads import serialize_this_thread

P = ParamSpec("P")
T = TypeVar("T")

# generation path: compiling steering, planning captures (fast, latency-sensitive)
GENERATION_POOL = ThreadPoolExecutor(
    max_workers=16, thread_name_prefix="steerserve-gen", initializer=serialize_this_thread
)
# registry routes: uploads, searches, feature cards (may be slow; bounded so they cannot pile up threads)
REGISTRY_POOL = ThreadPoolExecutor(
    max_workers=4, thread_name_prefix="steerserve-registry", initializer=serialize_this_thread
)


async def run_in(pool: ThreadPoolExecutor, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`await` fn(*args, **kwargs) on `pool`, keeping the caller's context variables."""
    ctx = contextvars.copy_context()
    call = functools.partial(ctx.run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(pool, call)
