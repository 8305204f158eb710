"""Sites: where in the model an intervention acts, `(layer, hook)`.

`resid_pre` of layer L is the input of decoder layer L, `resid_post` its output (the convention of
SAELens, repeng and llama.cpp control vectors). SAELens hook names map onto sites.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HOOKS = ("resid_pre", "resid_post")
_SAELENS = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post)$")


class SiteError(ValueError):
    """A site that does not parse or does not exist in the served model."""


@dataclass(frozen=True, slots=True, order=True)
class Site:
    layer: int
    hook: str = "resid_post"

    @property
    def hook_name(self) -> str:
        """The SAELens hook name of this site."""
        return f"blocks.{self.layer}.hook_{self.hook}"

    def check(self, n_layers: int) -> Site:
        if not 0 <= self.layer < n_layers:
            raise SiteError(f"layer {self.layer} does not exist: the model has layers 0..{n_layers - 1}")
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
        return Site(value, "resid_post")
    if isinstance(value, str):
        m = _SAELENS.match(value.strip())
        if not m:
            raise SiteError(
                f"unknown hook name {value!r}: expected 'blocks.L.hook_resid_pre' or 'blocks.L.hook_resid_post'"
            )
        return Site(int(m.group(1)), m.group(2))
    if isinstance(value, dict):
        layer, hook = value.get("layer"), value.get("hook", "resid_post")
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise SiteError(f"site.layer must be an integer >= 0, got {layer!r}")
        if hook not in HOOKS:
            raise SiteError(f"site.hook must be one of {', '.join(HOOKS)}, got {hook!r}")
        return Site(layer, hook)
    raise SiteError(f"site must be a layer number, a hook name or an object, got {type(value).__name__}")
