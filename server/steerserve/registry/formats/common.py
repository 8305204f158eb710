"""What every loader shares: the LoadedSAE result and small checks on tensor dicts and sites."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

import torch

from steerserve.registry.errors import InvalidInput
from steerserve.registry.sae import SAEWeights
from steerserve.types.sites import Site, SiteError, parse_site

_LAYER_NAME = re.compile(r"^(?:direction|layers?|model\.layers)[._](\d{1,18})$|^(\d{1,18})$")


class Source(Enum):
    """The file layout an SAE came in: its `meta.format` value, and how errors name it."""

    SAELENS = "saelens"
    GEMMASCOPE = "gemmascope"
    GEMMASCOPE2 = "gemmascope2"
    LLAMASCOPE = "llamascope"
    SPARSIFY = "sparsify"

    @property
    def where(self) -> str:
        names = {"saelens": "SAELens", "gemmascope": "Gemma Scope", "gemmascope2": "Gemma Scope 2",
                 "llamascope": "Llama Scope", "sparsify": "sparsify"}  # fmt: skip
        return f"{names[self.value]} SAE"


@dataclass(frozen=True, eq=False)
class LoadedSAE:
    """A loader's output: the normalized weights, the model the file claims, and provenance notes."""

    weights: SAEWeights
    model_name: str | None = None
    meta: dict = field(default_factory=dict)  # JSON-able: format, hook name, folded steps, ids


def require(tensors: dict[str, torch.Tensor], name: str, where: str) -> torch.Tensor:
    if name not in tensors:
        raise InvalidInput(
            f"{where}: missing tensor {name!r} (found: {', '.join(sorted(tensors)) or 'none'})",
            param="weights",
        )
    return tensors[name]


def reject_unknown(tensors: dict[str, torch.Tensor], allowed: set[str], where: str) -> None:
    extra = sorted(set(tensors) - allowed)
    if extra:
        raise InvalidInput(
            f"{where}: unexpected tensors {', '.join(map(repr, extra))} (expected {', '.join(sorted(allowed))})",
            param="weights",
        )


def storage_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 files are stored as float32; other float dtypes are kept."""
    return torch.float32 if t.dtype == torch.float64 else t.dtype


def site_of(value: object, param: str = "site") -> Site:
    """A Site from a hook name, an int layer or a dict; a clear 400 for anything else."""
    try:
        return parse_site(value)
    except SiteError as exc:
        raise InvalidInput(f"{param}: {exc}", param=param) from None


def agreed_site(given: Site | None, in_file: Site | None, file_field: str, where: str) -> Site | None:
    """The site, when the one given beside the upload and the one the file names agree.

    The file's own hook name is what the SAE was trained on; a `layer` / `site` that says otherwise
    is a mistake on one side, and silently picking either would attach the SAE to the wrong tensor.
    """
    if given is not None and in_file is not None and given != in_file:
        raise InvalidInput(
            f"the given site {given.hook_name} contradicts {where}'s {file_field} {in_file.hook_name}; "
            f"drop the layer/site field (the file's hook is used) or fix {file_field}",
            param="site",
        )
    return in_file or given


def site_from_tensor_name(name: str) -> Site | None:
    """`direction.5`, `layers.5`, `5` -> resid_post of layer 5; SAELens hook names as they are."""
    m = _LAYER_NAME.match(name)
    if m:
        return Site(int(m.group(1) or m.group(2)), "resid_post")
    try:
        return parse_site(name)
    except SiteError:
        return None


def as_int(value: object, param: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInput(f"{param} must be an integer >= {minimum}, got {value!r}", param=param)
    return value
