"""One hook per site the step needs, running steering then feature capture on the site's hidden states.

Which module a site is and how its hook attaches comes from runner/model_adapter.py. Every kind hands
`on_site` a `[T, d]` tensor (the packed `[1, T, d]` batch) whose edits become the site's tensor:
  OUTPUT        the module's output, edited in place (resid_post, attn_out, mlp_out; mlp_hook_in: the
                pre-MLP norm's output, which only the MLP reads)
  INPUT         the module's input, edited in place: it is the residual itself (resid_pre, resid_mid)
  BRANCH_INPUT  a copy of the norm's input, passed to the norm instead: the residual is left as it was
                (mlp_in)
  NORMALIZED    the norm's normalized input; what the edits changed reaches the norm's output through its
                weight, so tokens nobody edits keep the output bit for bit (ln2_normalized)
Hooks exist only at sites some live request steers or captures: no hook, no cost.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from steerserve.runner.model_adapter import Attach, ModelAdapter, NormOps
from steerserve.types.sites import Site

SiteFn = Callable[[Site, torch.Tensor], None]  # (site, hidden [T, d]) -> edits in place


class SiteHooks:
    def __init__(self, sites: ModelAdapter, on_site: SiteFn):
        self.sites = sites
        self.on_site = on_site
        self._installed: frozenset[Site] = frozenset()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def sync(self, sites: set[Site]) -> None:
        if sites == self._installed:
            return
        # NOTE: all again, in forward order: hooks on one module run in the order they were registered,
        # and resid_mid (in place) must run before mlp_in (a copy) on the same norm
        for handle in self._handles:
            handle.remove()
        self._handles = [self._install(site) for site in sorted(sites)]
        self._installed = frozenset(sites)

    def _install(self, site: Site) -> torch.utils.hooks.RemovableHandle:
        point = self.sites.point(site)
        module = point.module
        if point.attach is Attach.OUTPUT:
            return module.register_forward_hook(self._output(site))
        if point.attach is Attach.INPUT:
            return module.register_forward_pre_hook(self._input(site), with_kwargs=True)
        if point.attach is Attach.BRANCH_INPUT:
            return module.register_forward_pre_hook(self._branch_input(site), with_kwargs=True)
        assert point.norm is not None
        return module.register_forward_hook(self._normalized(site, point.norm))

    def _call(self, site: Site, hidden: torch.Tensor) -> None:
        self.on_site(site, hidden.view(-1, hidden.shape[-1]))  # [T, d] view: edits land in the tensor

    def _output(self, site: Site):
        def hook(module, args, output):
            self._call(site, output[0] if isinstance(output, tuple) else output)

        return hook

    def _input(self, site: Site):
        def hook(module, args, kwargs):
            self._call(site, args[0] if args else kwargs["hidden_states"])

        return hook

    def _branch_input(self, site: Site):
        def hook(module, args, kwargs):
            copy = args[0].clone()
            self._call(site, copy)
            return (copy, *args[1:]), kwargs

        return hook

    def _normalized(self, site: Site, norm: NormOps):
        gain = norm.gain()  # [d] float32

        def hook(module, args, output):
            h = norm.normalize(args[0]).to(output.dtype)
            before = h.clone()
            self._call(site, h)
            output += ((h.float() - before.float()) * gain).to(output.dtype)

        return hook
