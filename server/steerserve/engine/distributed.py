"""Tensor parallelism, the engine's side: rank 0 tells every other rank what to run, step by step.

Rank 0 runs the API, the scheduler and the engine. Its runner is wrapped in `DistributedRunner`: before
each `execute(SchedulerOutput)` or `probe()` it broadcasts that command, so every rank runs the same step
on its shard of the weights (runner/tensor_parallel.py all-reduces the residual stream inside the
forward). The other ranks sit in `follow()`. Commands travel over a gloo group of their own (CPU
tensors even when the model's collectives are NCCL), encoded by engine/wire.py.

The runner's admissions can differ between ranks (one rank's registry read fails): `CommandChannel.union`
gathers every rank's refusals, so all ranks drop the same requests before the forward. A failed
collective (a rank died, or waited past --distributed-timeout-s) breaks the group for good:
`DistributedRunner` then raises on every call, the engine's probe fails and the engine is dead.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from steerserve.engine.wire import Command, decode, encode
from steerserve.types.requests import SamplingParams
from steerserve.types.step import RunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)


class RankFailure(RuntimeError):
    """The group of ranks is broken: a rank died or stopped answering."""


def command_group():
    """The group commands travel in: the default group when it is gloo, else a gloo group of all ranks
    (NCCL moves GPU tensors; a step's instructions are host bytes). Every rank must call this, in order."""
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


class CommandChannel:
    """Broadcasts from rank 0 and gathers from all, over a gloo group (`group`: None = the default)."""

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def send(self, obj) -> None:
        """Rank 0: `obj` to every other rank (a `recv()` there)."""
        data = encode(obj)
        dist.broadcast(torch.tensor([len(data)], dtype=torch.int64), 0, group=self.group)
        dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, group=self.group)

    def recv(self):
        """Every rank but 0: the next object rank 0 sent."""
        size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, 0, group=self.group)
        buf = torch.empty(int(size), dtype=torch.uint8)
        dist.broadcast(buf, 0, group=self.group)
        return decode(buf.numpy().tobytes())

    def agree_min(self, *values: int) -> tuple[int, ...]:
        """Every rank: the smallest of each value over all ranks (e.g. KV-cache blocks each can hold)."""
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return tuple(int(v) for v in t)

    def union(self, refused: dict[str, str]) -> dict[str, str]:
        """Every rank: all ranks' `refused` merged (rank 0's reason first where several refused one)."""
        data = encode(refused)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=self.group)
        longest = max(int(s) for s in sizes)
        mine = torch.zeros(longest, dtype=torch.uint8)
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        bufs = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        dist.all_gather(bufs, mine, group=self.group)
        merged: dict[str, str] = {}
        for rank, (size, buf) in enumerate(zip(sizes, bufs, strict=True)):
            for rid, why in decode(buf[: int(size)].numpy().tobytes()).items():
                merged.setdefault(rid, why if rank == 0 else f"rank {rank}: {why}")
        return merged


class DistributedRunner:
    """Rank 0's runner: every call is first broadcast, then run here. While the engine is idle a NOOP
    goes out every `heartbeat_s`, so the other ranks' wait never reaches the group's timeout."""

    def __init__(self, runner, channel: CommandChannel, heartbeat_s: float, on_broken: Callable[[str], None]):
        self.runner = runner
        self.channel = channel
        self.broken: str | None = None
        self._on_broken = on_broken
        self._lock = threading.Lock()  # one collective sequence at a time: a step, or a heartbeat
        self._last = time.monotonic()
        self._heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._sent: set[str] = set()  # requests whose prompt the other ranks hold (sent once)
        self._heart = threading.Thread(target=self._beat, name="steerserve-tp-heartbeat", daemon=True)
        self._heart.start()

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        with self._lock:
            self._send((Command.STEP, without_known_prompts(sched, self._sent)))
            try:
                return self.runner.execute(sched)
            finally:
                self._last = time.monotonic()

    def probe(self) -> None:
        with self._lock:
            self._send((Command.PROBE, None))
            self.runner.probe()

    def close(self) -> None:
        """Tell the other ranks to leave their loop (best effort: they may be gone, or hung in a step)."""
        self._stop.set()
        if not self._lock.acquire(timeout=5.0):  # a step stuck in a collective: the ranks are lost anyway
            return
        try:
            if self.broken is None:
                try:
                    self.channel.send((Command.STOP, None))
                except Exception:
                    logger.debug("could not send STOP to the other ranks", exc_info=True)
                self.broken = "the server shut down"
        finally:
            self._lock.release()

    def _send(self, message) -> None:
        if self.broken is not None:
            raise RankFailure(self.broken)
        try:
            self.channel.send(message)
        except Exception as exc:
            self._break(f"tensor-parallel ranks lost: {type(exc).__name__}: {exc}")
            raise RankFailure(self.broken) from exc
        self._last = time.monotonic()

    def _break(self, why: str) -> None:
        if self.broken is None:
            self.broken = why
            logger.error("%s", why)
            self._on_broken(why)

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat_s / 4):
            if time.monotonic() - self._last < self._heartbeat_s:
                continue
            with self._lock:
                if self.broken is not None or self._stop.is_set():
                    return
                try:
                    self._send((Command.NOOP, None))
                except RankFailure:
                    return

    def mark_broken(self, why: str) -> None:
        """From a watcher that saw a rank's process end: no collective will ever complete again."""
        self._break(why)


def forward_share(sched: SchedulerOutput) -> SchedulerOutput:
    """A step as the other ranks run it: without what only rank 0 reads after the forward (captures;
    grammar masks, compiled on rank 0's API side only). The forward and the steering are unchanged."""
    return dataclasses.replace(
        sched,
        scheduled=tuple(
            dataclasses.replace(item, capture=None, sampling=dataclasses.replace(item.sampling, grammar=None))
            if item.capture is not None or item.sampling.grammar is not None
            else item
            for item in sched.scheduled
        ),
    )


# what a running request's later steps carry instead of its sampling parameters (encoded once per step)
_HELD_SAMPLING = SamplingParams()


def without_known_prompts(sched: SchedulerOutput, sent: set[str]) -> SchedulerOutput:
    """Rank 0: `sched` with what the other ranks already hold left out: a request's prompt, sampling
    parameters and steering travel with its first step only (every step would otherwise carry every
    running request's whole prompt). Updates `sent`."""
    sent.difference_update(sched.finished_ids)
    items = []
    for item in sched.scheduled:
        if item.request_id in sent:
            item = dataclasses.replace(
                item, prompt_token_ids=(), sampling=_HELD_SAMPLING, steering=None, capture=None
            )
        else:
            sent.add(item.request_id)
        items.append(item)
    return dataclasses.replace(sched, scheduled=tuple(items))


def with_known_prompts(sched: SchedulerOutput, held: dict[str, tuple]) -> SchedulerOutput:
    """The other ranks: `sched` with what was left out put back from `held` (updated here). A prompt is
    never empty (the engine refuses those), so an empty one marks a request seen before."""
    for rid in sched.finished_ids:
        held.pop(rid, None)
    items = []
    for item in sched.scheduled:
        if item.prompt_token_ids:
            held[item.request_id] = (item.prompt_token_ids, item.sampling, item.steering)
        else:
            prompt, sampling, steering = held[item.request_id]
            item = dataclasses.replace(item, prompt_token_ids=prompt, sampling=sampling, steering=steering)
        items.append(item)
    return dataclasses.replace(sched, scheduled=tuple(items))


def follow(runner, channel: CommandChannel) -> None:
    """Every rank but 0: run what rank 0 sends until STOP; raises RankFailure when the group breaks."""
    held: dict[str, tuple] = {}
    while True:
        try:
            command, arg = channel.recv()
        except Exception as exc:
            raise RankFailure(f"lost rank 0: {type(exc).__name__}: {exc}") from exc
        if command is Command.STOP:
            return
        try:
            if command is Command.STEP:
                runner.execute(forward_share(with_known_prompts(arg, held)))
            elif command is Command.PROBE:
                runner.probe()
        except Exception:  # rank 0 ran the same step and handles its failure (isolation.py)
            logger.warning("a step failed on this rank", exc_info=True)
