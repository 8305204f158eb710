"""Checking steering on the demo model while training it: greedy completions of weather prompts, with
an SAE feature edit applied by a plain forward hook (the same formulas as API.md's `clamp` and `add`
at every position), judged by the corpus' weather vocabulary.

The trainer uses it to pick each variant's strength and to record success rates in the manifest;
the tests check the same behaviour through the real server.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch

from steerserve.demo.corpus import WEATHER_WORDS, weather_prompts, weather_vocabulary


def climates_said(completion: str) -> set[str]:
    """The climates whose words appear in the completion's first sentence."""
    first = completion.split(".")[0]
    words = set(re.findall(r"[a-z]+", first.lower()))
    return {c for c in WEATHER_WORDS if words & weather_vocabulary(c)}


def says_cleanly(completion: str, climate: str) -> bool:
    """The first sentence ends, says `climate` and no other weather, and repeats no word back to back."""
    if "." not in completion:
        return False
    words = re.findall(r"[a-z]+", completion.split(".")[0].lower())
    repeated = any(a == b for a, b in zip(words, words[1:], strict=False))
    return climates_said(completion) == {climate} and not repeated


@contextmanager
def feature_edits(model, layer: int, weights: dict, steering: list[dict], positions: str = "all"):
    """Apply API-style feature interventions (`clamp` / `add` raw / `ablate`) at resid_post of `layer`;
    `positions="prompt"` edits only the prefill of a `greedy` call (its one multi-token forward)."""
    from steerserve.runner.model_adapter import decoder_layers

    def hook(_module, _args, output):
        h = output[0] if isinstance(output, tuple) else output  # [B, T, d_model]
        if positions == "prompt" and h.shape[1] == 1:
            return output
        pre = (h - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]  # [B, T, d_sae]
        delta = torch.zeros_like(h)
        for item in steering:
            f = item["feature"]["index"]
            if item["mode"] == "add":
                delta += item["strength"] * weights["W_dec"][f]
            else:
                target = item.get("value", 0.0) if item["mode"] == "clamp" else 0.0
                delta += (target - torch.relu(pre[..., f : f + 1])) * weights["W_dec"][f]
        h.add_(delta)
        return output

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def flip_rate(
    model, tokenizer, layer, weights, steering, source: str, target: str, positions="all", template=None
) -> dict:
    """Over the weather prompts of `source` places the unsteered model calls `source`: the share that
    say `target` cleanly (`says_cleanly`) with the steering applied."""
    prompts = weather_prompts(source, *([template] if template else []))
    base = {p: greedy(model, tokenizer, p) for p, _ in prompts}
    eligible = [p for p, text in base.items() if source in climates_said(text)]
    with feature_edits(model, layer, weights, steering, positions):
        steered = {p: greedy(model, tokenizer, p) for p in eligible}
    ok = [p for p, text in steered.items() if says_cleanly(text, target)]
    return {
        "prompts": len(base),
        "unsteered_says_source": len(eligible),
        "flipped": len(ok),
        "rate": round(len(ok) / max(1, len(eligible)), 4),
        "example": (eligible[0], base[eligible[0]], steered[eligible[0]]) if eligible else None,
    }


def removal_rate(model, tokenizer, layer, weights, steering, climate: str) -> dict:
    """Over the `climate` places whose prompt the unsteered model calls `climate`: the share that no
    longer say it with the steering (e.g. its feature clamped to 0) applied."""
    base = {p: greedy(model, tokenizer, p) for p, _ in weather_prompts(climate)}
    eligible = [p for p, text in base.items() if climate in climates_said(text)]
    with feature_edits(model, layer, weights, steering):
        gone = [p for p in eligible if climate not in climates_said(greedy(model, tokenizer, p))]
    return {
        "eligible": len(eligible),
        "removed": len(gone),
        "rate": round(len(gone) / max(1, len(eligible)), 4),
    }
