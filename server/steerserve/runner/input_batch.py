"""Turning a SchedulerOutput into the tensors of one packed forward pass and one sampling call.

The runner keeps a small `CachedRequest` per live request (its generator, penalty counts); this module
builds, from those and the step's `ScheduledRequest`s, the packed `[1, T]` inputs, the attention
metadata, the rows whose logits are kept, and the `SamplingBatch`.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from steerserve.runner.attention import AttentionMetadata, PagedMetadata, RequestSpan
from steerserve.runner.cpu_prompt_rows import RowKinds
from steerserve.runner.steering.resample import DrawContext, request_key
from steerserve.sampling.sampler import SamplingBatch
from steerserve.types.requests import SamplingParams
from steerserve.types.steering import SteeringSpec
from steerserve.types.step import ScheduledRequest, is_run


@dataclass(slots=True)
class CachedRequest:
    """What the runner remembers about a live request between steps."""

    request_id: str
    sampling: SamplingParams
    generator: torch.Generator | None
    prompt_token_set: frozenset[int]
    output_counts: Counter = field(default_factory=Counter)
    steering: SteeringSpec | None = None
    row: int = -1  # steering row on the device; -1 = unsteered
    gate_state: torch.Tensor | None = None  # [G] bool: gates that fired in earlier steps (latches)
    resample_key: int = 0  # int64 key of its resample draws (runner/steering/resample.py)


def new_cached_request(item: ScheduledRequest, device: torch.device, rng: random.Random) -> CachedRequest:
    sp = item.sampling
    gen = None
    if not sp.greedy:
        gen = torch.Generator(device=device)
        gen.manual_seed(sp.seed if sp.seed is not None else rng.getrandbits(63))
    prompt = frozenset(item.prompt_token_ids) if sp.uses_penalties else frozenset()
    key = request_key(sp.seed, rng.getrandbits(63))
    return CachedRequest(item.request_id, sp, gen, prompt, steering=item.steering, resample_key=key)


@dataclass(slots=True)
class ForwardInputs:
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    attn: AttentionMetadata | PagedMetadata
    # [R + K] rows of the packed batch that reach the LM head: the R sampled rows first, then the K
    # prompt rows scored for prompt_logprobs
    logits_rows: torch.Tensor
    sample_ids: list[str]  # request ids of the R sampled rows, in order
    pos_class: torch.Tensor  # [T] int8: 0 prompt token, 1 generated token
    token_row: torch.Tensor | None  # [T] int64 steering row per token (-1 none); None = nobody steers
    num_tokens: int
    prompt_rows: list[PromptRows] = field(default_factory=list)  # the K scored rows, per request
    prompt_targets: torch.Tensor | None = None  # [K] int64: the prompt token each scored row predicts
    # the rows by kind, from the host (cpu_prompt_rows.py); a padded decode step's are all generated
    row_kinds: RowKinds = RowKinds(0, 0)


@dataclass(frozen=True, slots=True)
class PromptRows:
    """`count` consecutive scored rows of one request: positions `first..first+count-1` each score the
    prompt token after them."""

    request_id: str
    first: int
    count: int
    k: int  # top logprobs asked


def prompt_rows(item: ScheduledRequest) -> tuple[int, int]:
    """(first, count): the positions of this chunk whose next token is a prompt token, less those
    reported before a preemption (a recomputed chunk must not report a position twice)."""
    if item.sampling.prompt_logprobs is None:
        return item.start, 0
    first = max(item.start, item.num_reported)
    end = min(item.start + len(item.token_ids), item.num_prompt_tokens - 1)
    return first, max(0, end - first)


def _to_device(values, dtype, device) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def build_forward_inputs(
    scheduled: tuple[ScheduledRequest, ...], rows: list[int], block_size: int, device, paged: bool = False
) -> ForwardInputs:
    """Pack the step; `rows[k]` is the steering row of scheduled[k] (-1 = unsteered). `paged`: attention
    metadata for the paged kernels (block tables) instead of per-request spans."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    spans: list[RequestSpan] = []
    logits_rows: list[int] = []
    sample_ids: list[str] = []
    pos_class: list[bool] = []
    scored: list[PromptRows] = []
    scored_rows: list[int] = []
    targets: list[int] = []
    for item in scheduled:
        n = len(item.token_ids)
        q_start = len(ids)
        ids.extend(item.token_ids)
        if n == 1:  # NOTE: a decode row: Python ints cost ~50x less than numpy's per-call overhead
            pos = item.start
            positions.append(pos)
            slots.append(item.block_ids[pos // block_size] * block_size + pos % block_size)
            pos_class.append(pos >= item.num_prompt_tokens)
        else:
            pos = np.arange(item.start, item.start + n)
            blocks = np.asarray(item.block_ids, dtype=np.int64)
            positions.extend(pos.tolist())
            slots.extend((blocks[pos // block_size] * block_size + pos % block_size).tolist())
            pos_class.extend((pos >= item.num_prompt_tokens).tolist())
        if not paged:
            spans.append(_span(item, q_start, block_size, device))
        if item.sample:
            logits_rows.append(q_start + n - 1)
            sample_ids.append(item.request_id)
        first, count = prompt_rows(item)
        if count:
            scored.append(PromptRows(item.request_id, first, count, item.sampling.prompt_logprobs))
            scored_rows.extend(range(q_start + first - item.start, q_start + first - item.start + count))
            targets.extend(item.prompt_token_ids[first + 1 : first + 1 + count])
    slot_mapping = _to_device(slots, torch.int64, device)
    return ForwardInputs(
        input_ids=_to_device(ids, torch.int64, device).unsqueeze(0),
        position_ids=_to_device(positions, torch.int64, device).unsqueeze(0),
        attn=_paged_metadata(scheduled, slot_mapping, block_size, device)
        if paged
        else AttentionMetadata(spans, slot_mapping),
        logits_rows=_to_device(logits_rows + scored_rows, torch.int64, device),
        sample_ids=sample_ids,
        pos_class=_to_device(pos_class, torch.int8, device),
        token_row=_token_rows(scheduled, rows, device),
        num_tokens=len(ids),
        prompt_rows=scored,
        prompt_targets=_to_device(targets, torch.int64, device) if targets else None,
        row_kinds=RowKinds.of(pos_class),
    )


def _span(item: ScheduledRequest, q_start: int, block_size: int, device) -> RequestSpan:
    n = len(item.token_ids)
    ctx = item.start + n
    if is_run(item.block_ids):
        return RequestSpan(q_start, n, ctx, item.block_ids[0] * block_size, None)
    blocks = np.asarray(item.block_ids, dtype=np.int64)
    cache_rows = (blocks[:, None] * block_size + np.arange(block_size)[None, :]).reshape(-1)[:ctx]
    return RequestSpan(q_start, n, ctx, -1, _to_device(cache_rows, torch.int64, device))


def _paged_metadata(scheduled, slot_mapping: torch.Tensor, block_size: int, device) -> PagedMetadata:
    counts = np.asarray([len(item.token_ids) for item in scheduled], dtype=np.int64)
    table = np.zeros((len(scheduled), max(len(item.block_ids) for item in scheduled)), dtype=np.int64)
    for i, item in enumerate(scheduled):
        table[i, : len(item.block_ids)] = item.block_ids
    seq_lens = [item.start + len(item.token_ids) for item in scheduled]
    return PagedMetadata(
        slot_mapping=slot_mapping,
        block_table=_to_device(table, torch.int64, device),
        seq_lens=_to_device(seq_lens, torch.int64, device),
        query_start_loc=_to_device(np.concatenate([[0], np.cumsum(counts)]), torch.int64, device),
        token_seq=_to_device(np.repeat(np.arange(len(scheduled)), counts), torch.int64, device),
        block_size=block_size,
    )


def _token_rows(scheduled, rows: list[int], device) -> torch.Tensor | None:
    if all(r < 0 for r in rows):
        return None
    counts = [len(item.token_ids) for item in scheduled]
    return _to_device(np.repeat(np.asarray(rows, dtype=np.int64), counts), torch.int64, device)


def draw_context(scheduled, reqs: list[CachedRequest], inputs: ForwardInputs, device) -> DrawContext:
    """Each token's request key and position, for the resample draws of this step."""
    counts = [len(item.token_ids) for item in scheduled]
    keys = np.repeat(np.asarray([r.resample_key for r in reqs], dtype=np.int64), counts)
    return DrawContext(_to_device(keys, torch.int64, device), inputs.position_ids[0])


def _padded(rows: list[list], fill, dtype, device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), fill, dtype=dtype)
    if width:  # NOTE: most steps no row has any: the row loop was most of build_sampling_batch
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
    return _to_device(out, getattr(torch, np.dtype(dtype).name), device)


def build_sampling_batch(reqs: list[CachedRequest], vocab: int, device, dense=None) -> SamplingBatch:
    """`dense`: (bank [B, V], idx [R, D]) of feature logit biases, or None."""
    sps = [r.sampling for r in reqs]
    random_rows = [i for i, sp in enumerate(sps) if not sp.greedy]
    temperature = [1.0 if sp.greedy else sp.temperature for sp in sps]
    sparse = [list(sp.logit_bias) for sp in sps]
    penalty_ids: list[list[int]] = []
    penalty_counts: list[list[int]] = []
    for r in reqs:
        if r.sampling.uses_penalties:
            seen = r.prompt_token_set | r.output_counts.keys()
            penalty_ids.append(list(seen))
            penalty_counts.append([r.output_counts.get(t, 0) for t in seen])
        else:
            penalty_ids.append([])
            penalty_counts.append([])
    needs_processing = dense is not None or any(
        sp.logit_bias or sp.uses_penalties or (not sp.greedy and sp.temperature != 1.0) for sp in sps
    )
    if dense is None:
        dense = (
            torch.zeros((0, vocab), dtype=torch.float32, device=device),
            torch.full((len(reqs), 0), -1, dtype=torch.int64, device=device),
        )
    any_top_k = any(sps[i].top_k > 0 for i in random_rows)
    any_top_p = any(sps[i].top_p < 1.0 for i in random_rows)
    any_min_p = any(sps[i].min_p > 0.0 for i in random_rows)
    f32 = torch.float32
    return SamplingBatch(
        temperature=_to_device(temperature, f32, device),
        random_rows=_to_device(random_rows, torch.int64, device) if random_rows else None,
        top_k=_to_device([sp.top_k for sp in sps], torch.int64, device) if any_top_k else None,
        top_p=_to_device([sp.top_p for sp in sps], f32, device) if any_top_p else None,
        min_p=_to_device([sp.min_p for sp in sps], f32, device) if any_min_p else None,
        generators=[reqs[i].generator for i in random_rows],
        needs_processing=needs_processing,
        sparse_ids=_padded([[t for t, _ in s] for s in sparse], -1, np.int64, device),
        sparse_bias=_padded([[b for _, b in s] for s in sparse], 0.0, np.float32, device),
        dense_bank=dense[0],
        dense_idx=dense[1],
        penalty_ids=_padded(penalty_ids, -1, np.int64, device),
        penalty_counts=_padded(penalty_counts, 0, np.int32, device),
        repetition_penalty=_to_device([sp.repetition_penalty for sp in sps], f32, device),
        presence_penalty=_to_device([sp.presence_penalty for sp in sps], f32, device),
        frequency_penalty=_to_device([sp.frequency_penalty for sp in sps], f32, device),
        max_logprobs=max((sp.logprobs for sp in sps if sp.logprobs is not None), default=-1),
    )


class SamplingBatches:
    """`build_sampling_batch`, reusing the last step's batch while the same requests sample (decode steps,
    until a request joins or ends) with the same feature-bias rows and none of them counts tokens for
    penalties (those change every step). Rebuilding was ten small tensors, ~0.3-0.4 ms a step. Each call
    returns its own copy, since the runner sets the grammar mask on it."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._batch: SamplingBatch | None = None
        self._pinned: tuple = ()  # NOTE: what the key's ids name, kept alive so no new object takes an id

    def get(self, reqs: list[CachedRequest], vocab: int, device, dense=None) -> SamplingBatch:
        # NOTE: by identity: a request admitted again (preemption) or a new one under an old request id is a
        # new CachedRequest; the steering hands back the same index tensor while its rows hold
        dense = tuple(dense) if dense is not None else ()
        key = (*map(id, reqs), None, *map(id, dense))
        if key == self._key and self._batch is not None:
            return dataclasses.replace(self._batch)
        batch = build_sampling_batch(reqs, vocab, device, dense or None)
        cacheable = not any(r.sampling.uses_penalties for r in reqs)
        self._key, self._batch = (key, batch) if cacheable else (None, None)
        self._pinned = (tuple(reqs), dense) if cacheable else ()
        return dataclasses.replace(batch)
