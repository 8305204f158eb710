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


def edit(x, items, is_generated, gate_open=None):
    """x [T, d]: apply `items` (dicts) at one site in order: feature edits, projections, additions.
    An item with "gate": name acts only where `gate_open[name]` [T] is true."""
    x0 = x.clone()
    delta = torch.zeros_like(x)

    def _positions(positions, is_generated, it=None):
        mask = _position_mask(positions, is_generated)
        return mask if it is None or "gate" not in it else mask * gate_open[it["gate"]].float()

    for it in items:
        mask = _positions(it["positions"], is_generated, it)
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
            mask = _positions(it["positions"], is_generated, it)
            u = it["vector"] / it["vector"].norm()
            p = x @ u
            clipped = p.clamp(it["lo"], it["hi"])
            x = x + ((clipped - p) * mask)[:, None] * u
    for it in items:
        if it["kind"] == "add":
            mask = _positions(it["positions"], is_generated, it)
            x = x + mask[:, None] * it["direction"]
    return x


def _position_mask(positions, is_generated):
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


def _register(layers, layer, hook, fn):
    """fn(h [T, d]) -> new h or None, as a hook at (layer, hook); batch of one."""
    if hook == "resid_post":

        def post(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            new = fn(h[0])
            if new is not None:
                h[0] = new

        return layers[layer].register_forward_hook(post)

    def pre(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        new = fn(h[0])
        if new is not None:
            h[0] = new

    return layers[layer].register_forward_pre_hook(pre, with_kwargs=True)


def _gate_reader(name, gate, gate_open, latched):
    """Reads gate `name` from the hidden state arriving at its site: above < a < below, and with latch
    open from the first token where that held (this call or an earlier one)."""

    def read(h):
        a = activation(h, gate["sae"], gate["index"])
        fire = torch.ones_like(a, dtype=torch.bool)
        if gate.get("above") is not None:
            fire &= a > gate["above"]
        if gate.get("below") is not None:
            fire &= a < gate["below"]
        if gate.get("latch"):
            fire = (fire.cumsum(0) > 0) | latched.get(name, False)
            latched[name] = bool(fire[-1])
        gate_open[name] = fire

    return read


def steered_generate(model_dir, prompt, max_tokens, by_site, logit_bias=None, gates=None):
    """Greedy generate() of the HF model with hooks doing `by_site` ({(layer, hook): [items]}).

    `gates`: {name: {"site": (layer, hook), "sae", "index", "above", "below", "latch"}}, read before any
    edit at their site; items with "gate": name act where it is open. At a site the ungated items act
    first, then each gate's items in the order of `gates`."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    layers = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    n_prompt = len(prompt)
    state = {"start": 0}
    gate_open, latched = {}, {}
    gates = gates or {}

    def generated_mask(t):
        pos = torch.arange(state["start"], state["start"] + t)
        return pos >= n_prompt

    handles = [
        _register(layers, *g["site"], _gate_reader(name, g, gate_open, latched)) for name, g in gates.items()
    ]  # NOTE: registered first, so they read before the edits at the same site
    for (layer, hook), items in by_site.items():
        groups = [[it for it in items if "gate" not in it]] + [
            [it for it in items if it.get("gate") == name] for name in gates
        ]

        def fn(h, groups=groups):
            mask = generated_mask(h.shape[0])
            for group in groups:
                if group:
                    h = edit(h, group, mask, gate_open)
            return h

        handles.append(_register(layers, layer, hook, fn))

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


def site_activations(model_dir, tokens, site, sae, index):
    """[len(tokens)] activations of feature `index` at `site` ((layer, hook)) over the unsteered model."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    layers = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    seen = {}

    def read(h):
        seen["a"] = activation(h, sae, index)

    handle = _register(layers, *site, read)
    try:
        with torch.inference_mode():
            model(torch.tensor([tokens]))
    finally:
        handle.remove()
    return seen["a"]
