"""Resample ablation on the device: per bank column, the distribution its draws come from, and the
per-token draws of one step (`steerkernels.resample_draw`).

A column (an SAE edit's `[slot, j]`, or a projection direction's `[slot, k]`) that resamples holds its
stream id (the intervention's place in its SteeringSpec), its density (the probability of a nonzero
draw; 1 for a vector's projection) and its sample (the values a nonzero draw picks uniformly from).
Other columns have stream -1 and draw nothing (NaN: the kernel keeps the slot's own mode and value).

NOTE: draws are counter-based, a pure function of (the request's key, the token's position, the stream
id), not the state of a generator: a request's draws are the same whatever shares its batch, and the same
when a preempted request's tokens are recomputed; the sampler's generator is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import steerkernels


@dataclass(frozen=True, slots=True)
class DrawContext:
    """This step's per-token inputs of the draws: each token's request key and absolute position."""

    token_key: torch.Tensor  # [T] int64
    token_pos: torch.Tensor  # [T] int64


def request_key(seed: int | None, fresh: int) -> int:
    """A request's resample key as int64: its sampling seed (mod 2**64, two's complement), so a seeded
    request draws the same values on every run; else `fresh` (a random 63-bit number per request)."""
    if seed is None:
        return fresh
    seed %= 2**64
    return seed - 2**64 if seed >= 2**63 else seed


class ResampleColumns:
    """The resampling state of a `[S, cap]` bank of columns."""

    def __init__(self, num_slots: int, cap: int, device):
        self.device = device
        self.live = 0  # columns with a stream >= 0: none = no draw at all
        self.stream = torch.full((num_slots, cap), -1, dtype=torch.int64, device=device)
        self.density = torch.zeros((num_slots, cap), dtype=torch.float32, device=device)
        self.count = torch.zeros((num_slots, cap), dtype=torch.int32, device=device)
        self.samples = torch.zeros((num_slots, cap, 1), dtype=torch.float32, device=device)

    def resize(self, cap: int) -> None:
        """Widen to `cap` columns per slot, keeping what is set."""
        old = self.stream.shape[1]
        for name, fill in (("stream", -1), ("density", 0), ("count", 0), ("samples", 0)):
            buf = getattr(self, name)
            new = torch.full((buf.shape[0], cap, *buf.shape[2:]), fill, dtype=buf.dtype, device=self.device)
            new[:, :old] = buf
            setattr(self, name, new)

    def set(self, slot: int, col: int, stream: int, density: float, sample: tuple[float, ...]) -> None:
        n = len(sample)
        if n > self.samples.shape[2]:  # NOTE: grown to a power of two: few reallocations, little padding
            width = 1 << (n - 1).bit_length()
            grown = torch.zeros((*self.samples.shape[:2], width), dtype=torch.float32, device=self.device)
            grown[:, :, : self.samples.shape[2]] = self.samples
            self.samples = grown
        self.live += int(self.stream[slot, col]) < 0
        self.stream[slot, col] = stream
        self.density[slot, col] = density
        self.count[slot, col] = n
        self.samples[slot, col].zero_()
        if n:
            self.samples[slot, col, :n] = torch.tensor(sample, dtype=torch.float32)

    def clear_slot(self, slot: int) -> None:
        self.live -= int((self.stream[slot] >= 0).sum())
        self.stream[slot].fill_(-1)
        self.count[slot].zero_()

    def draw(self, slots: torch.Tensor, ctx: DrawContext | None, width: int) -> torch.Tensor | None:
        """[T, width] fp32 targets of this step's tokens (NaN: not resampled), or None when no column
        resamples. `slots` [T]: each token's slot here (-1 none)."""
        if not self.live:
            return None
        if ctx is None:  # NOTE: the runner passes keys whenever a live row resamples
            raise RuntimeError("a resampling bank ran without this step's draw context")
        return steerkernels.resample_draw(
            slots, ctx.token_key, ctx.token_pos, self.stream[:, :width], self.density[:, :width],
            self.samples[:, :width], self.count[:, :width], validate=False,
        )  # fmt: skip
