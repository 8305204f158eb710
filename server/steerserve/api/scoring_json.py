"""Scoring in JSON: `echo` (the prompt before the completion, its logprobs before the sampled ones) and
vLLM's `prompt_logprobs`. Position 0 has no logprob (nothing precedes it): `null`, as OpenAI and vLLM.

The engine reports one TokenLogprob per prompt token from the second on (types/step.py), raw (the
model's distribution, under the request's steering) with the top k and the token's rank.
"""

from __future__ import annotations

from steerserve.api.protocol import CompletionRequest
from steerserve.types.requests import TokenLogprob


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def logprobs_block(tokens: list[str], logprobs: list, tops: list, offset: int = 0) -> dict:
    """A completion's `logprobs` object; `text_offset` counts on from `offset`, token by token."""
    text_offset = []
    for text in tokens:
        text_offset.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": text_offset}


def prompt_logprobs_json(tokenizer, lps: list[TokenLogprob], k: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token null (the first) or {token_id: {logprob, rank,
    decoded_token}} holding the token itself and the top k (ranks 1..k)."""
    out: list[dict | None] = [None]
    for lp in lps:
        entry = {}
        for rank, (t, v) in enumerate(lp.top[:k], start=1):
            entry[str(t)] = {"logprob": v, "rank": rank, "decoded_token": token_text(tokenizer, t)}
        own = {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": token_text(tokenizer, lp.token_id)}
        entry[str(lp.token_id)] = own
        out.append(entry)
    return out


def echo_prompt_text(body: CompletionRequest, tokenizer, prompt_ids, prompt_index: int) -> str:
    """The prompt as the caller gave it (a string), or its ids decoded."""
    p = body.prompt
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and isinstance(p[0], str):
        return p[prompt_index]
    return tokenizer.decode(list(prompt_ids))


def echo_logprobs(tokenizer, prompt_ids, lps: list[TokenLogprob], k: int) -> dict:
    """The prompt's part of a completion's `logprobs` (the sampled tokens' part follows, its offsets
    from the end of the echoed text): `top_logprobs` hold the token itself and the top k, as vLLM's."""
    n = min(len(prompt_ids), len(lps) + 1)
    tokens = [token_text(tokenizer, t) for t in prompt_ids[:n]]
    scored = [None, *lps][:n]
    tops = [
        None if lp is None else {token_text(tokenizer, t): v for t, v in lp.top[:k]} | {text: lp.logprob}
        for lp, text in zip(scored, tokens, strict=True)
    ]
    return logprobs_block(tokens, [None if lp is None else lp.logprob for lp in scored], tops)


def joined(first: dict, then: dict) -> dict:
    """Two `logprobs` blocks of a completion, one after the other."""
    return {key: first[key] + then[key] for key in first}


def echo_head(body: CompletionRequest, tokenizer, plan, index: int, prompt_lps) -> tuple[str, dict | None]:
    """(the echoed prompt text, its `logprobs` block or None) of choice `index` of a completion call."""
    prompt_ids = plan.requests[index].prompt_token_ids
    prompt_index = (index if index < plan.num_steered else index - plan.num_steered) // body.n  # twins
    text = echo_prompt_text(body, tokenizer, prompt_ids, prompt_index)
    if body.logprobs is None:
        return text, None
    return text, echo_logprobs(tokenizer, prompt_ids, list(prompt_lps), body.logprobs)


def prompt_logprobs_extra(body, tokenizer, lps) -> dict:
    """{"prompt_logprobs": [...]} of a choice whose call asked for them, else {}."""
    if body.prompt_logprobs is None:
        return {}
    return {"prompt_logprobs": prompt_logprobs_json(tokenizer, list(lps), body.prompt_logprobs)}
