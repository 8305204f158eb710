"""Persistent, padded inputs of decode steps: what a CUDA graph replays (runner/cuda_graphs.py).

A decode step (every scheduled request feeds one token and samples) is written into the same device
tensors every step, padded to the next of a few batch sizes, so that a graph captured for that size reads
this step's inputs at the addresses it was captured with. The host fills one int64 staging buffer (pinned
on CUDA) and the device gets it in ONE copy.

Padding rows: token 0 at position 0, no KV write (slot -1), no keys (their sequence has length 0, the
paged kernel writes zeros), no steering (row -1); their logits are computed and never read.
"""

from __future__ import annotations

import torch

from steerserve.runner.attention import PagedMetadata
from steerserve.runner.input_batch import ForwardInputs
from steerserve.types.step import ScheduledRequest

# one [B] int64 field each, in this order, then the [B, max_blocks] block table
_FIELDS = ("input_ids", "positions", "slot_mapping", "seq_lens", "token_seq", "token_row", "pos_class")


def batch_sizes(max_batch: int) -> list[int]:
    """The padded sizes (vLLM's ladder): 1, 2, 4, 8, then every 8, up to max_batch."""
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch, 8))
    return sizes + [max_batch]


def is_decode_step(scheduled: tuple[ScheduledRequest, ...]) -> bool:
    """Every request feeds one token and samples the next (so scores no prompt token); none captures."""
    return all(len(item.token_ids) == 1 and item.sample and item.capture is None for item in scheduled)


class DecodeBuffers:
    def __init__(self, max_batch: int, max_blocks: int, block_size: int, device: torch.device):
        self.max_batch = max_batch
        self.block_size = block_size
        self.sizes = batch_sizes(max_batch)
        B = max_batch
        n = len(_FIELDS) * B + B * max_blocks
        self._host = torch.zeros(n, dtype=torch.int64, pin_memory=device.type == "cuda")
        self._device = torch.zeros(n, dtype=torch.int64, device=device)
        self._np = self._host.numpy()
        self._host_fields = {f: self._np[i * B : (i + 1) * B] for i, f in enumerate(_FIELDS)}
        self._host_table = self._np[len(_FIELDS) * B :].reshape(B, max_blocks)
        self._dev = {f: self._device[i * B : (i + 1) * B] for i, f in enumerate(_FIELDS)}
        self._dev_table = self._device[len(_FIELDS) * B :].view(B, max_blocks)
        # constant: each decode row is its own sequence (query_start_loc) and reaches the LM head
        self._arange = torch.arange(B + 1, dtype=torch.int64, device=device)
        self.loads = 0  # decode steps run through these buffers

    def padded(self, n: int) -> int | None:
        """The batch size a step of n requests runs at; None when larger than any."""
        return next((s for s in self.sizes if s >= n), None)

    def load(self, scheduled: tuple[ScheduledRequest, ...], rows: list[int], padded: int) -> ForwardInputs:
        """This decode step's inputs in the persistent buffers, as `ForwardInputs` of `padded` rows."""
        bs = self.block_size
        self.loads += 1
        h = self._host_fields
        for f, fill in zip(_FIELDS, (0, 0, -1, 0, -1, -1, 0), strict=True):
            h[f][:padded] = fill
        for i, item in enumerate(scheduled):
            p = item.start
            blocks = item.block_ids
            h["input_ids"][i] = item.token_ids[0]
            h["positions"][i] = p
            h["slot_mapping"][i] = blocks[p // bs] * bs + p % bs
            h["seq_lens"][i] = p + 1
            h["token_seq"][i] = i
            h["token_row"][i] = rows[i]
            h["pos_class"][i] = p >= item.num_prompt_tokens
            self._host_table[i, : len(blocks)] = blocks
        # NOTE: the one host->device copy of the step (asynchronous from pinned memory on CUDA: the step's
        # sampled-token read-back orders it before the next step refills the host buffer)
        self._device.copy_(self._host, non_blocking=True)
        d = self._dev
        steered = any(r >= 0 for r in rows)
        return ForwardInputs(
            input_ids=d["input_ids"][:padded].unsqueeze(0),
            position_ids=d["positions"][:padded].unsqueeze(0),
            attn=self.metadata(padded),
            logits_rows=self._arange[:padded],
            sample_ids=[item.request_id for item in scheduled],
            pos_class=d["pos_class"][:padded],
            token_row=d["token_row"][:padded] if steered else None,
            num_tokens=padded,
        )

    def metadata(self, padded: int) -> PagedMetadata:
        d = self._dev
        return PagedMetadata(
            slot_mapping=d["slot_mapping"][:padded],
            block_table=self._dev_table[:padded],
            seq_lens=d["seq_lens"][:padded],
            query_start_loc=self._arange[: padded + 1],
            token_seq=d["token_seq"][:padded],
            block_size=self.block_size,
        )

    def token_row(self, padded: int) -> torch.Tensor:
        """[padded] steering row per row (-1 none): what a steered graph's hooks read."""
        return self._dev["token_row"][:padded]

    def pos_class(self, padded: int) -> torch.Tensor:
        return self._dev["pos_class"][:padded]
