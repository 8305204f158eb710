"""An independent reference for steering: plain forward hooks on a transformers model doing the math of
API.md, and generate() with them. Written from the formulas, not from the server's code."""

from __future__ import annotations

import functools

import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from tests.kernels.helpers import py_bits


def activation(x, sae, f):
    """Feature f's activation on hidden states x [..., d] (relu or jumprelu, as SAELens' encode())."""
    if sae["apply_b_dec_to_input"]:
        x = x - sae["b_dec"]
    pre = x @ sae["W_enc"][:, f] + sae["b_enc"][f]
    if sae.get("threshold") is not None:
        return torch.relu(pre) * (pre > sae["threshold"][f])  # the relu stays under a negative threshold
    return torch.relu(pre)


def resample_value(key: int, pos: int, stream: int, density: float, sample) -> float:
    """The draw of one token, from the request's key, the token's position and the intervention's
    stream id: 0 with probability 1 - density, else sample[i] for a uniform i (Python ints only)."""
    h1, h2 = py_bits(key, pos, stream)
    u = (h1 >> 8) * 2.0**-24
    if not sample or not u < float(torch.tensor(density, dtype=torch.float32)):
        return 0.0
    return float(sample[(h2 * len(sample)) >> 32])


def _draws(it, positions) -> torch.Tensor:
    """[T] the resample item's draws at absolute `positions` (its "key", "stream", "density", "sample")."""
    return torch.tensor(
        [resample_value(it["key"], int(p), it["stream"], it["density"], it["sample"]) for p in positions],
        dtype=torch.float32,
    )


def edit(x, items, is_generated, gate_open=None, positions=None):
    """x [T, d]: apply `items` (dicts) at one site in order: feature edits, projections, additions.
    An item with "gate": name acts only where `gate_open[name]` [T] is true. Resample items need the
    tokens' absolute `positions` [T]."""
    x0 = x.clone()
    delta = torch.zeros_like(x)

    def _positions(positions, is_generated, it=None):
        mask = _position_mask(positions, is_generated)
        return mask if it is None or "gate" not in it else mask * gate_open[it["gate"]].float()

    for it in items:
        mask = _positions(it["positions"], is_generated, it)
        if it["kind"] in ("clamp", "scale", "ablate", "resample"):
            sae, f = it["sae"], it["index"]
            a = activation(x0, sae, f)
            if it["kind"] == "resample":
                new = _draws(it, positions).to(a.dtype)
            else:
                new = {
                    "clamp": torch.full_like(a, it.get("value", 0.0)),
                    "scale": a * it.get("value", 1.0),
                    "ablate": torch.zeros_like(a),
                }[it["kind"]]
            delta += ((new - a) * mask)[:, None] * sae["W_dec"][f]
    x = x0 + delta
    for it in items:
        if it["kind"] in ("project", "project_resample"):
            mask = _positions(it["positions"], is_generated, it)
            u = it["vector"] / it["vector"].norm()
            p = x @ u
            if it["kind"] == "project_resample":
                clipped = _draws(it, positions).to(p.dtype)
            else:
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


# The module of each site inside a layer, read from transformers' decoder layers (written out here, not
# taken from steerserve.runner.model_adapter): what attention adds, the pre-MLP norm, what the MLP adds.
_SUBLAYER = {
    "gpt2": ("attn", "ln_2", "mlp"),
    "llama": ("self_attn", "post_attention_layernorm", "mlp"),
    "qwen2": ("self_attn", "post_attention_layernorm", "mlp"),
    "qwen3": ("self_attn", "post_attention_layernorm", "mlp"),
    "gemma2": ("post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
}


@functools.lru_cache(maxsize=4)
def _load(model_dir):
    """The HF model, loaded once per directory (every hook is removed after each use)."""
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()


def _layers(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def _normalized_hook(fn, gemma: bool):
    """TransformerLens' ln2.hook_normalized: the norm's input centred (LayerNorm) and divided by its
    scale, edited by fn, then the norm's weight (Gemma: 1 + weight) and bias applied."""

    def hook(module, args, output):
        x = args[0].float()
        if isinstance(module, torch.nn.LayerNorm):
            x = x - x.mean(-1, keepdim=True)
        eps = module.eps if hasattr(module, "eps") else module.variance_epsilon
        h = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        new = fn(h[0])
        if new is not None:
            h[0] = new
        w = module.weight.float()
        out = h * (1 + w if gemma else w)
        if getattr(module, "bias", None) is not None:
            out = out + module.bias.float()
        return out.to(output.dtype)

    return hook


def _register(model, layer, hook, fn):
    """fn(h [T, d]) -> new h or None, as a hook at (layer, hook); batch of one."""
    block = _layers(model)[layer]

    def edit_output(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        new = fn(h[0])
        if new is not None:
            h[0] = new

    def edit_input(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        new = fn(h[0])
        if new is not None:
            h[0] = new

    def edit_copy(module, args, kwargs):  # the MLP branch's own copy: the residual is left as it was
        h = args[0].clone()
        new = fn(h[0])
        if new is not None:
            h[0] = new
        return (h, *args[1:]), kwargs

    if hook == "resid_post":
        return block.register_forward_hook(edit_output)
    if hook == "resid_pre":
        return block.register_forward_pre_hook(edit_input, with_kwargs=True)
    attn_out, ln2, mlp_out = (getattr(block, name) for name in _SUBLAYER[model.config.model_type])
    if hook == "attn_out":
        return attn_out.register_forward_hook(edit_output)
    if hook == "mlp_out":
        return mlp_out.register_forward_hook(edit_output)
    if hook == "resid_mid":  # the residual after attention, edited where the pre-MLP norm reads it
        return ln2.register_forward_pre_hook(edit_input, with_kwargs=True)
    if hook == "mlp_in":
        return ln2.register_forward_pre_hook(edit_copy, with_kwargs=True)
    if hook == "ln2_normalized":
        return ln2.register_forward_hook(_normalized_hook(fn, model.config.model_type.startswith("gemma")))
    if hook == "mlp_hook_in":  # what the MLP module itself is called with (a copy, edited)
        return block.mlp.register_forward_pre_hook(edit_copy, with_kwargs=True)
    raise ValueError(f"no reference hook for {hook!r}")


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


def greedy_generate(model, prompt: list[int], max_tokens: int, logits_processor=None) -> list[int]:
    """HF `generate()`, greedy, exactly `max_tokens` new tokens (no EOS stop): the reference decode loop
    every exactness test compares the engine with, whatever hooks are on `model`."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=model.config.pad_token_id,
            logits_processor=logits_processor,
        )
    return out[0, len(prompt) :].tolist()


def steered_generate(model_dir, prompt, max_tokens, by_site, logit_bias=None, gates=None):
    """Greedy generate() of the HF model with hooks doing `by_site` ({(layer, hook): [items]}).

    `gates`: {name: {"site": (layer, hook), "sae", "index", "above", "below", "latch"}}, read before any
    edit at their site; items with "gate": name act where it is open. At a site the ungated items act
    first, then each gate's items in the order of `gates`."""
    model = _load(model_dir)
    layers = _layers(model)
    n_prompt = len(prompt)
    state = {"start": 0}
    gate_open, latched = {}, {}
    gates = gates or {}

    def token_positions(t):
        return torch.arange(state["start"], state["start"] + t)

    handles = [
        _register(model, *g["site"], _gate_reader(name, g, gate_open, latched)) for name, g in gates.items()
    ]  # NOTE: registered first, so they read before the edits at the same site
    for (layer, hook), items in by_site.items():
        groups = [[it for it in items if "gate" not in it]] + [
            [it for it in items if it.get("gate") == name] for name in gates
        ]

        def fn(h, groups=groups):
            pos = token_positions(h.shape[0])
            for group in groups:
                if group:
                    h = edit(h, group, pos >= n_prompt, gate_open, pos)
            return h

        handles.append(_register(model, layer, hook, fn))

    def advance(module, args, output):
        state["start"] += output.shape[1] if not isinstance(output, tuple) else output[0].shape[1]

    handles.append(layers[-1].register_forward_hook(advance))
    try:
        procs = LogitsProcessorList([_DenseBias(logit_bias)]) if logit_bias is not None else None
        return greedy_generate(model, prompt, max_tokens, procs)
    finally:
        for h in handles:
            h.remove()


def read_site(model, tokens, site, read):
    """read(h [T, d]) of what a plain hook at `site` ((layer, hook)) sees in one unsteered forward over
    `tokens` (the hook leaves h as it is). model: an HF model, or its directory (loaded once, eager)."""
    model = _load(model) if isinstance(model, str) else model
    seen = {}

    def hook(h):
        seen["out"] = read(h)

    handle = _register(model, *site, hook)
    try:
        with torch.inference_mode():
            model(torch.tensor([tokens]))
    finally:
        handle.remove()
    return seen["out"]


def site_activations(model_dir, tokens, site, sae, index):
    """[len(tokens)] activations of feature `index` at `site` ((layer, hook)) over the unsteered model
    (index slice(None): [len(tokens), d_sae], every feature)."""
    return read_site(model_dir, tokens, site, lambda h: activation(h, sae, index))
