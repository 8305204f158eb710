"""The sampler: fp32 logits of the rows that sample -> next tokens (and logprobs).

Steps, in order:
  1. raw log-probabilities, when any row asked for logprobs (OpenAI reports the model's distribution);
  2. biases, penalties and temperature in one pass (`steerkernels.apply_logit_bias`);
  3. greedy rows take the argmax;
  4. other rows: top-k, top-p, min-p filters, then a draw from the row's own generator, so a seeded
     request samples the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import steerkernels


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling inputs for one step, built by the runner (all tensors on the logits' device)."""

    temperature: torch.Tensor  # [R] fp32; 1.0 for greedy rows (they take the argmax)
    random_rows: torch.Tensor | None  # [Rs] int64 rows that sample randomly; None = all greedy
    top_k: torch.Tensor | None  # [R] int64, 0 = off; None when no row uses it
    top_p: torch.Tensor | None  # [R] fp32, 1.0 = off
    min_p: torch.Tensor | None  # [R] fp32, 0.0 = off
    generators: list[torch.Generator]  # one per random row, in random_rows order
    needs_processing: bool  # any bias, penalty or temperature != 1
    sparse_ids: torch.Tensor  # [R, S] int64, -1 pad
    sparse_bias: torch.Tensor  # [R, S] fp32
    dense_bank: torch.Tensor  # [B, V] fp32
    dense_idx: torch.Tensor  # [R, D] int64, -1 pad
    dense_scale: torch.Tensor  # [R, D] fp32
    penalty_ids: torch.Tensor  # [R, P] int64, -1 pad
    penalty_counts: torch.Tensor  # [R, P] int32
    repetition_penalty: torch.Tensor  # [R] fp32
    presence_penalty: torch.Tensor  # [R] fp32
    frequency_penalty: torch.Tensor  # [R] fp32
    max_logprobs: int  # largest top_logprobs asked in the batch; -1 = nobody wants logprobs


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [R] int64
    logprobs: torch.Tensor | None  # [R] fp32, the sampled tokens' logprobs
    top_ids: torch.Tensor | None  # [R, max_logprobs] int64
    top_logprobs: torch.Tensor | None  # [R, max_logprobs] fp32


def _filter_top_k_top_p(logits: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """Mask (to -inf) what top-k and top-p remove; rows with k = 0 and p = 1 are untouched."""
    vocab = logits.shape[-1]
    if top_k is not None:
        k = torch.where(top_k <= 0, vocab, top_k.clamp(max=vocab))  # [R]
        kth = logits.topk(int(k.max()), dim=-1).values.gather(-1, (k - 1).unsqueeze(-1))  # [R, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p.unsqueeze(-1)  # keep the token crossing p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _filter_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(-1)
    floor = probs.max(-1, keepdim=True).values * min_p.unsqueeze(-1)
    return logits.masked_fill(probs < floor, float("-inf"))


def _draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row: argmax(p / E) with E ~ Exp(1) from the row's generator (= a draw from p)."""
    noise = torch.empty_like(probs)
    for row, gen in enumerate(generators):
        noise[row].exponential_(generator=gen)
    return (probs / noise).argmax(-1)


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        x = logits.float()  # [R, V]
        raw_logprobs = x.log_softmax(-1) if batch.max_logprobs >= 0 else None
        if batch.needs_processing:
            x = steerkernels.apply_logit_bias(
                x.clone() if x.data_ptr() == logits.data_ptr() else x,  # NOTE: the caller's logits stay
                batch.temperature,
                batch.sparse_ids,
                batch.sparse_bias,
                batch.dense_bank,
                batch.dense_idx,
                batch.dense_scale,
                batch.penalty_ids,
                batch.penalty_counts,
                batch.repetition_penalty,
                batch.presence_penalty,
                batch.frequency_penalty,
                validate=False,  # convert.py bounds-checked every id; the kernel masks them again
            )
        tokens = steerkernels.argmax_rows(x)
        if batch.random_rows is not None:
            rows = batch.random_rows
            sub = x.index_select(0, rows)
            sub = _filter_top_k_top_p(
                sub,
                None if batch.top_k is None else batch.top_k.index_select(0, rows),
                None if batch.top_p is None else batch.top_p.index_select(0, rows),
            )
            if batch.min_p is not None:
                sub = _filter_min_p(sub, batch.min_p.index_select(0, rows))
            tokens = tokens.index_copy(0, rows, _draw(sub.softmax(-1), batch.generators))
        if raw_logprobs is None:
            return SamplerOutput(tokens, None, None, None)
        chosen = raw_logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        top = raw_logprobs.topk(batch.max_logprobs, dim=-1) if batch.max_logprobs > 0 else None
        return SamplerOutput(
            tokens, chosen, None if top is None else top.indices, None if top is None else top.values
        )
