"""Joining a tensor-parallel group: the ranks of `steerserve serve --tensor-parallel-size N`.

Two ways to start them, as with vLLM and torchrun:
- one machine: rank 0 (the command the operator ran) starts ranks 1..N-1 itself, re-running its own
  command line with torchrun's variables set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
  they die with it (PR_SET_PDEATHSIG) and it watches them;
- torchrun (any number of machines): those variables are already set; every rank joins them.
Then every rank calls `torch.distributed.init_process_group` (gloo on CPU, NCCL on CUDA). Joining and
loading get STARTUP_TIMEOUT_S; once the engine is built, the operator's timeout applies
(`steady_timeout`): a collective that waits longer fails, and the group is broken for good.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
STARTUP_TIMEOUT_S = 600.0  # joining the group and loading every rank's shard


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_world_size: int  # ranks on this machine (they share its memory and cores)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In a child, before exec: SIGTERM when the parent ends, however it ends (Linux)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class LocalRanks:
    """Ranks 1..N-1 started by rank 0 on this machine, watched until `stop()`."""

    def __init__(self, world_size: int, argv: list[str]):
        port = _free_port()
        base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size)}  # fmt: skip
        os.environ.update(base, RANK="0", LOCAL_RANK="0")
        self.procs: list[subprocess.Popen] = []
        for rank in range(1, world_size):
            env = {**os.environ, **base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            cmd = [sys.executable, "-m", "steerserve.cli", *argv]
            self.procs.append(subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent))
        self._stopping = threading.Event()

    def watch(self, on_exit: Callable[[str], None]) -> None:
        """Call `on_exit(why)` (once) if a rank's process ends before `stop()`."""

        def run() -> None:
            while not self._stopping.wait(0.5):
                for rank, proc in enumerate(self.procs, start=1):
                    code = proc.poll()
                    if code is not None:
                        on_exit(f"tensor-parallel rank {rank} exited (status {code})")
                        return

        threading.Thread(target=run, name="steerserve-rank-watch", daemon=True).start()

    def stop(self, timeout: float = 15.0) -> None:
        """Wait for the ranks to leave (they got STOP), then end those that did not."""
        self._stopping.set()
        for proc in self.procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def join_group(world_size: int, timeout_s: float, cuda: bool) -> RankInfo:
    """Initialise torch.distributed from torchrun's variables (set by LocalRanks or torchrun)."""
    env_world = int(os.environ["WORLD_SIZE"])
    if env_world != world_size:
        raise ValueError(
            f"--tensor-parallel-size {world_size} but WORLD_SIZE is {env_world}: start one rank per shard"
        )
    # NOTE: starting takes longer than a step (every rank imports torch and loads the model): the
    # operator's timeout applies once the engine is built (`steady_timeout`)
    startup = datetime.timedelta(seconds=max(timeout_s, STARTUP_TIMEOUT_S))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=startup)
    info = RankInfo(
        dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    )
    logger.info("tensor-parallel rank %d of %d joined", info.rank, info.world_size)
    return info


def steady_timeout(timeout_s: float, groups=(None,)) -> None:
    """From now on a collective of `groups` (None: the default group) that waits `timeout_s` fails."""
    from torch.distributed.distributed_c10d import _set_pg_timeout  # NOTE: torch has no public setter

    for group in groups:
        _set_pg_timeout(datetime.timedelta(seconds=timeout_s), group)


def in_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
