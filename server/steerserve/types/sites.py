"""Sites: where in the model an intervention acts, `(layer, hook)`, named as in TransformerLens / SAELens.

Per decoder layer L, in forward order (runner/model_adapter.py says which module each is, per architecture):
  resid_pre       blocks.L.hook_resid_pre        the layer's input (the residual stream)
  attn_out        blocks.L.hook_attn_out         what attention adds to the residual (after Gemma-2's
                                                 post-attention norm)
  resid_mid       blocks.L.hook_resid_mid        resid_pre + attn_out: the residual the MLP block reads
  mlp_in          blocks.L.hook_mlp_in           the MLP branch's copy of resid_mid (before the pre-MLP
                                                 norm): an edit reaches the MLP only, not the residual
  ln2_normalized  blocks.L.ln2.hook_normalized   the pre-MLP norm's normalized input, before its weight
                                                 (and bias): an edit reaches the MLP through that weight
  mlp_hook_in     blocks.L.mlp.hook_in           what the MLP reads: the pre-MLP norm's output, weight
                                                 included (TransformerBridge's name); an edit reaches the
                                                 MLP only
  mlp_out         blocks.L.hook_mlp_out          what the MLP adds (after Gemma-2's post-MLP norm)
  resid_post      blocks.L.hook_resid_post       the layer's output
`resid_pre`/`resid_post` are also the convention of repeng and llama.cpp control vectors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class Hook(StrEnum):
    """The hook of a site. Members are in forward order within a layer (sites sort by it)."""

    RESID_PRE = "resid_pre"
    ATTN_OUT = "attn_out"
    RESID_MID = "resid_mid"
    MLP_IN = "mlp_in"
    LN2_NORMALIZED = "ln2_normalized"
    MLP_HOOK_IN = "mlp_hook_in"
    MLP_OUT = "mlp_out"
    RESID_POST = "resid_post"

    @property
    def tl_name(self) -> str:
        """The TransformerLens hook name within block L (`hook_attn_out`, `ln2.hook_normalized`)."""
        return _DOTTED.get(self, f"hook_{self.value}")


_DOTTED = {Hook.LN2_NORMALIZED: "ln2.hook_normalized", Hook.MLP_HOOK_IN: "mlp.hook_in"}  # a submodule's hook
HOOKS = tuple(h.value for h in Hook)
RESID_HOOKS = (Hook.RESID_PRE, Hook.RESID_POST)  # every decoder-only model has these
_ORDER = {h: i for i, h in enumerate(Hook)}
_BY_TL_NAME = {h.tl_name: h for h in Hook}
_SAELENS = re.compile(r"^blocks\.(\d{1,18})\.(" + "|".join(re.escape(n) for n in _BY_TL_NAME) + r")$")
_NAMES = ", ".join(f"blocks.L.{n}" for n in _BY_TL_NAME)


class SiteError(ValueError):
    """A site that does not parse or does not exist in the served model."""


@dataclass(frozen=True, slots=True)
class Site:
    layer: int
    hook: Hook = Hook.RESID_POST

    def __post_init__(self) -> None:
        if not isinstance(self.hook, Hook):  # a plain string (the registry's column, old callers)
            try:
                object.__setattr__(self, "hook", Hook(self.hook))
            except ValueError:
                raise SiteError(f"unknown hook {self.hook!r}: expected one of {', '.join(HOOKS)}") from None

    @property
    def hook_name(self) -> str:
        """The SAELens / TransformerLens hook name of this site."""
        return f"blocks.{self.layer}.{self.hook.tl_name}"

    # NOTE: forward order (layer, then the hook's place in the layer), not the hook's spelling: a gate must
    # be read at or before the site it controls, and sites sort into the order a forward pass meets them.
    def _key(self) -> tuple[int, int]:
        return self.layer, _ORDER[self.hook]

    def __lt__(self, other: Site) -> bool:
        return self._key() < other._key()

    def __le__(self, other: Site) -> bool:
        return self._key() <= other._key()

    def __gt__(self, other: Site) -> bool:
        return self._key() > other._key()

    def __ge__(self, other: Site) -> bool:
        return self._key() >= other._key()

    def check(self, n_layers: int, hooks: tuple[str, ...] = HOOKS) -> Site:
        """This site, if the served model has it: a layer in 0..n_layers-1 and a hook in `hooks`."""
        if not 0 <= self.layer < n_layers:
            raise SiteError(f"layer {self.layer} does not exist: the model has layers 0..{n_layers - 1}")
        if self.hook not in hooks:
            names = ", ".join(f"blocks.L.{Hook(h).tl_name}" for h in hooks)
            raise SiteError(
                f"the served model has no {self.hook_name}: its architecture is not mapped for sites "
                f"inside a layer; it has {names}"
            )
        return self


def parse_site(value: object) -> Site:
    """A site from an int layer (resid_post), a SAELens hook name, or `{"layer": L, "hook": h}`."""
    if isinstance(value, Site):
        return value
    if isinstance(value, bool):
        raise SiteError(f"site must be a layer number, a hook name or an object, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise SiteError(f"layer must be >= 0, got {value}")
        return Site(value, Hook.RESID_POST)
    if isinstance(value, str):
        m = _SAELENS.match(value.strip())
        if not m:
            raise SiteError(f"unknown hook name {value!r}: expected one of {_NAMES}")
        return Site(int(m.group(1)), _BY_TL_NAME[m.group(2)])
    if isinstance(value, dict):
        layer, hook = value.get("layer"), value.get("hook", "resid_post")
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise SiteError(f"site.layer must be an integer >= 0, got {layer!r}")
        if hook not in HOOKS:
            raise SiteError(f"site.hook must be one of {', '.join(HOOKS)}, got {hook!r}")
        return Site(layer, Hook(hook))
    raise SiteError(f"site must be a layer number, a hook name or an object, got {type(value).__name__}")
