"""ModelInfo: what the rest of the server may know about the served model (no tensors)."""

from __future__ import annotations

from dataclasses import dataclass

from steerserve.types.sites import HOOKS, Site


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the rest of the server may know about the served model (no tensors)."""

    name: str
    architecture: str
    d_model: int
    n_layers: int
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    has_chat_template: bool = False
    hooks: tuple[str, ...] = HOOKS  # the hooks its architecture has (runner/model_adapter.py)
    # hook_mlp_out is a post-MLP norm's output (Gemma-2/3), not the MLP module's raw output
    mlp_out_after_norm: bool = False

    def check_site(self, site: Site) -> Site:
        """`site` if the model has it, else SiteError saying which layers and hooks it has."""
        return site.check(self.n_layers, self.hooks)
