"""An independent reference for steering: plain forward hooks on a transformers model doing the math of
API.md, and generate() with them. Written from the formulas, not from the server's code."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList


def activation(x, sae, f):
    """Feature f's activation on hidden states x [..., d] (relu or jumprelu)."""
    if sae["apply_b_dec_to_input"]:
        x = x - sae["b_dec"]
    pre = x @ sae["W_enc"][:, f] + sae["b_enc"][f]
    if sae.get("threshold") is not None:
        return pre * (pre > sae["threshold"][f])
    return torch.relu(pre)


def edit(x, items, is_generated):
    """x [T, d]: apply `items` (dicts) at one site in order: feature edits, projections, additions."""
    x0 = x.clone()
    delta = torch.zeros_like(x)
    for it in items:
        mask = _positions(it["positions"], is_generated)
        if it["kind"] in ("clamp", "scale", "ablate"):
            sae, f = it["sae"], it["index"]
            a = activation(x0, sae, f)
            new = {
                "clamp": torch.full_like(a, it.get("value", 0.0)),
                "scale": a * it.get("value", 1.0),
                "ablate": torch.zeros_like(a),
            }[it["kind"]]
            delta += ((new - a) * mask)[:, None] * sae["W_dec"][f]
    x = x0 + delta
    for it in items:
        if it["kind"] == "project":
            mask = _positions(it["positions"], is_generated)
            u = it["vector"] / it["vector"].norm()
            p = x @ u
            clipped = p.clamp(it["lo"], it["hi"])
            x = x + ((clipped - p) * mask)[:, None] * u
    for it in items:
        if it["kind"] == "add":
            mask = _positions(it["positions"], is_generated)
            x = x + mask[:, None] * it["direction"]
    return x


def _positions(positions, is_generated):
    if positions == "prompt":
        return (~is_generated).float()
    if positions == "generated":
        return is_generated.float()
    return torch.ones_like(is_generated, dtype=torch.float32)


class _DenseBias(LogitsProcessor):
    def __init__(self, bias):
        self.bias = bias

    def __call__(self, input_ids, scores):
        return scores + self.bias


def steered_generate(model_dir, prompt, max_tokens, by_site, logit_bias=None):
    """Greedy generate() of the HF model with hooks doing `by_site` ({(layer, hook): [items]})."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    layers = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    n_prompt = len(prompt)
    state = {"start": 0}

    def generated_mask(t):
        pos = torch.arange(state["start"], state["start"] + t)
        return pos >= n_prompt

    handles = []
    for (layer, hook), items in by_site.items():
        if hook == "resid_post":

            def post(module, args, output, items=items):
                h = output[0] if isinstance(output, tuple) else output
                h[0] = edit(h[0], items, generated_mask(h.shape[1]))

            handles.append(layers[layer].register_forward_hook(post))
        else:

            def pre(module, args, kwargs, items=items):
                h = args[0] if args else kwargs["hidden_states"]
                h[0] = edit(h[0], items, generated_mask(h.shape[1]))

            handles.append(layers[layer].register_forward_pre_hook(pre, with_kwargs=True))

    def advance(module, args, output):
        state["start"] += output.shape[1] if not isinstance(output, tuple) else output[0].shape[1]

    handles.append(layers[-1].register_forward_hook(advance))
    try:
        ids = torch.tensor([prompt])
        procs = LogitsProcessorList([_DenseBias(logit_bias)]) if logit_bias is not None else None
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=model.config.pad_token_id,
                logits_processor=procs,
            )
        return out[0, n_prompt:].tolist()
    finally:
        for h in handles:
            h.remove()
