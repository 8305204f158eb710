"""The sampler: fp32 logits of the rows that sample -> next tokens (and logprobs).

Steps, in order:
  1. raw log-probabilities, when any row asked for logprobs (OpenAI reports the model's distribution);
  2. biases, penalties and temperature in one pass (`steerkernels.apply_logit_bias`);
  3. greedy rows take the argmax;
  4. other rows: top-k, top-p, min-p filters, then a draw from the row's own generator, so a seeded
     request samples the same tokens whatever else is in the batch.
A row whose processed logits hold a NaN or +inf (or are all -inf) samples no token: its token id is -1
and the runner ends that request alone. `bounded()` maps a request's fields into what a step can hold.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

import steerkernels
from steerserve.types.requests import SamplingParams

GREEDY_BELOW = 1e-5  # temperatures below this sample greedily: 1/T would overflow fp32 logits
_LOGPROB_FLOOR = torch.finfo(torch.float32).min  # a reported logprob is finite (JSON has no -inf)


def bounded(sp: SamplingParams, vocab: int) -> SamplingParams:
    """`sp` with every field a step turns into a tensor, a seed or a size mapped into range (returned
    as is when nothing changes): the edge bounds these fields, the engine must survive whatever passes.
    The meaning is kept: a top_k at or above the vocabulary is no top_k, a temperature too small for fp32
    is greedy, a seed is taken modulo 2**64 (as torch already does for negative seeds)."""
    top_k = sp.top_k if 0 < sp.top_k < vocab else 0
    top_p = sp.top_p if 0.0 < sp.top_p < 1.0 else 1e-9 if sp.top_p <= 0.0 else 1.0  # 1e-9: the top token
    min_p = min(sp.min_p, 1.0) if sp.min_p > 0.0 else 0.0  # NaN: off
    temperature = 0.0 if sp.temperature < GREEDY_BELOW else sp.temperature
    logprobs = None if sp.logprobs is None else min(max(sp.logprobs, 0), vocab)
    prompt_logprobs = None if sp.prompt_logprobs is None else min(max(sp.prompt_logprobs, 0), vocab)
    seed = None if sp.seed is None else sp.seed % 2**64
    logit_bias = tuple((t, b) for t, b in sp.logit_bias if 0 <= t < vocab)  # ids a tensor can hold
    new = dict(
        top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature, logprobs=logprobs, seed=seed,
        logit_bias=logit_bias, prompt_logprobs=prompt_logprobs,
    )  # fmt: skip
    changed = {k: v for k, v in new.items() if v != getattr(sp, k)}
    return dataclasses.replace(sp, **changed) if changed else sp


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
    penalty_ids: torch.Tensor  # [R, P] int64, -1 pad
    penalty_counts: torch.Tensor  # [R, P] int32
    repetition_penalty: torch.Tensor  # [R] fp32
    presence_penalty: torch.Tensor  # [R] fp32
    frequency_penalty: torch.Tensor  # [R] fp32
    max_logprobs: int  # largest top_logprobs asked in the batch; -1 = nobody wants logprobs
    # [R, ceil(V/32)] int32, bit j of word w allows token 32w+j (runner/grammar.py); None: no row is
    # constrained
    grammar_bitmask: torch.Tensor | None = None

    def logit_terms(self) -> tuple[torch.Tensor, ...]:
        """steerkernels.apply_logit_bias' arguments after the logits, in its order."""
        return (
            self.temperature, self.sparse_ids, self.sparse_bias, self.dense_bank, self.dense_idx,
            self.penalty_ids, self.penalty_counts, self.repetition_penalty, self.presence_penalty,
            self.frequency_penalty,
        )  # fmt: skip


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [R] int64; -1 where the row's logits were not finite
    logprobs: torch.Tensor | None  # [R] fp32, the sampled tokens' logprobs
    top_ids: torch.Tensor | None  # [R, max_logprobs] int64
    top_logprobs: torch.Tensor | None  # [R, max_logprobs] fp32


@dataclass(slots=True)
class TokenScores:
    """Raw logprobs of given tokens, one per row (the model's distribution: before bias, penalties and
    temperature), with the rows' top k and, when asked, each token's rank."""

    logprobs: torch.Tensor  # [R] fp32, finite
    top_ids: torch.Tensor | None  # [R, k] int64; None when k = 0
    top_logprobs: torch.Tensor | None  # [R, k] fp32, finite
    ranks: torch.Tensor | None  # [R] int64 (int32 from score_tokens): 1 + tokens strictly more likely


def score_tokens(
    raw_logprobs: torch.Tensor, token_ids: torch.Tensor, k: int, ranks: bool = False
) -> TokenScores:
    """`token_ids`' rows of the log-softmaxed `raw_logprobs` [R, V]: what the sampled tokens report, and
    what each scored prompt token reports (`prompt_logprobs`, echo)."""
    chosen = raw_logprobs.gather(-1, token_ids.clamp(min=0).unsqueeze(-1))  # [R, 1]; -1: a failed row
    k = min(k, raw_logprobs.shape[-1])
    top = raw_logprobs.topk(k, dim=-1) if k > 0 else None
    # NOTE: an int32 count: 1.6x faster than the default int64 sum of the bool mask on CPU
    rank = (raw_logprobs > chosen).sum(-1, dtype=torch.int32) + 1 if ranks else None
    return TokenScores(
        _finite(chosen.squeeze(-1)),
        None if top is None else top.indices,
        None if top is None else _finite(top.values),
        rank,
    )


def _finite(x: torch.Tensor) -> torch.Tensor:
    """A reported logprob is finite (JSON has no -inf or NaN)."""
    return x.nan_to_num(nan=_LOGPROB_FLOOR).clamp(min=_LOGPROB_FLOOR)


_SCORE_BLOCK = 1 << 24  # logits scored at a time: a [K, V] fp32 copy of a long prompt would be GBs
# NOTE: on CPU a block's fp32 log-softmax should stay in cache while it is gathered, ranked and top-k'd.
# prompt_scores on 800 x 50257 fp32 logits, 2 threads (AVX2 EPYC): 198 ms in 16M blocks, 88 ms in 2M,
# 89 ms in 512K
_CPU_SCORE_BLOCK = 1 << 21


def prompt_scores(logits: torch.Tensor, targets: torch.Tensor, k: int, ranks: bool = True) -> TokenScores:
    """Prompt logprobs: row i of `logits` [K, V] scores token `targets[i]`, raw like sampled logprobs,
    with the top k and (`ranks`) each token's rank; in blocks of rows, so the log-softmax copy stays
    small (the values are bit-identical to one [K, V] `log_softmax` of the fp32 logits)."""
    n, vocab = logits.shape
    block = _CPU_SCORE_BLOCK if logits.device.type == "cpu" else _SCORE_BLOCK
    rows = max(1, block // vocab)
    k = min(k, vocab)
    dev = logits.device
    out = TokenScores(
        torch.empty(n, dtype=torch.float32, device=dev),
        torch.empty(n, k, dtype=torch.int64, device=dev) if k > 0 else None,
        torch.empty(n, k, dtype=torch.float32, device=dev) if k > 0 else None,
        torch.empty(n, dtype=torch.int64, device=dev) if ranks else None,
    )
    for i in range(0, n, rows):
        # log_softmax(dtype=fp32) reads bf16 / fp16 logits as they are: no separate fp32 copy of the block
        part = score_tokens(
            logits[i : i + rows].log_softmax(-1, dtype=torch.float32), targets[i : i + rows], k, ranks
        )
        for name in ("logprobs", "top_ids", "top_logprobs", "ranks"):
            dst = getattr(out, name)
            if dst is not None:
                dst[i : i + rows] = getattr(part, name)
    return out


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


def _apply_grammar(x: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Structured output: the tokens a row's grammar does not allow get -inf (in place on CPU)."""
    if x.device.type == "cpu":  # NOTE: xgrammar's CPU kernel: ~4x faster than the shifts below
        import xgrammar  # NOTE: here, so that a process that never constrains never loads it

        xgrammar.apply_token_bitmask_inplace(x, bitmask)
        return x
    return _mask_by_shifts(x, bitmask)


def _mask_by_shifts(x: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Bit j of word w of a row allows token 32w + j; a new tensor."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(bitmask.shape[0], -1)[:, : x.shape[-1]]
    return x.masked_fill(allowed == 0, float("-inf"))


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
        """`logits` [R, V] become the sampler's: fp32 ones are overwritten (biases, temperature, grammar)."""
        logits = logits.contiguous()  # [R, V]
        # NOTE: raw logprobs from the logits as they came: log_softmax(dtype=fp32) reads bf16 ones as fp32
        raw_logprobs = logits.log_softmax(-1, dtype=torch.float32) if batch.max_logprobs >= 0 else None
        # NOTE: fp32 conversion, biases / penalties / temperature and the argmax in one pass over each row
        # (steerkernels.sampling_logits; fp32 logits are the sampler's, edited in place); a grammar masks
        # between the biases and the argmax, so its argmax comes after
        x, tokens = steerkernels.sampling_logits(
            logits,
            *batch.logit_terms(),
            process=batch.needs_processing,
            argmax=batch.grammar_bitmask is None,
            validate=False,  # convert.py bounds-checked every id; the kernel masks them again
        )
        if batch.grammar_bitmask is not None:  # after biases and penalties, before any draw
            x = _apply_grammar(x, batch.grammar_bitmask)
            tokens = steerkernels.argmax_rows(x)
        # NOTE: argmax takes a NaN as the largest, so the argmax value is finite iff the row has no NaN,
        # no +inf and is not all -inf: the check costs R reads, not another pass over [R, V]
        finite = x.gather(-1, tokens[:, None]).isfinite().squeeze(-1)  # [R]
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
            return SamplerOutput(torch.where(finite, tokens, -1), None, None, None)
        scores = score_tokens(raw_logprobs, tokens, batch.max_logprobs)
        return SamplerOutput(
            torch.where(finite, tokens, -1), scores.logprobs, scores.top_ids, scores.top_logprobs
        )
