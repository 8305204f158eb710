"""One hook per site the step needs, running steering then feature capture on the layer's hidden states.

`resid_post` of layer L is a forward hook on decoder layer L (its output), `resid_pre` a forward
pre-hook (its input). Hooks exist only at sites some live request steers or captures: no hook, no cost.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from steerserve.sites import Site

SiteFn = Callable[[Site, torch.Tensor], None]  # (site, hidden [T, d]) -> edits in place


class SiteHooks:
    def __init__(self, layers: torch.nn.ModuleList, on_site: SiteFn):
        self.layers = layers
        self.on_site = on_site
        self._handles: dict[Site, torch.utils.hooks.RemovableHandle] = {}

    def sync(self, sites: set[Site]) -> None:
        for site in list(self._handles):
            if site not in sites:
                self._handles.pop(site).remove()
        for site in sites - self._handles.keys():
            layer = self.layers[site.layer]
            if site.hook == "resid_pre":
                self._handles[site] = layer.register_forward_pre_hook(self._pre(site), with_kwargs=True)
            else:
                self._handles[site] = layer.register_forward_hook(self._post(site))

    def _call(self, site: Site, hidden: torch.Tensor) -> None:
        self.on_site(site, hidden.view(-1, hidden.shape[-1]))  # [T, d] view: edits land in the layer's tensor

    def _pre(self, site: Site):
        def hook(module, args, kwargs):
            self._call(site, args[0] if args else kwargs["hidden_states"])

        return hook

    def _post(self, site: Site):
        def hook(module, args, output):
            self._call(site, output[0] if isinstance(output, tuple) else output)

        return hook
