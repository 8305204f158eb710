"""Checks on registry inputs that no file format owns: ids, fit to the served model, search queries.

(A variant's steering is checked by the steering layer: steering/variants.py.)
"""

from __future__ import annotations

import re

from steerserve.registry.errors import InvalidInput
from steerserve.registry.formats.common import LoadedSAE, Source
from steerserve.types.model import ModelInfo
from steerserve.types.sites import Site, SiteError

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# NOTE: full-text search cost grows with the number of terms (each a prefix scan, ANDed): bounded
MAX_QUERY_CHARS = 512
MAX_QUERY_TERMS = 16
_TERM = re.compile(r"\w+")


def check_id(value: object, param: str = "id") -> str:
    if not isinstance(value, str) or not ID_PATTERN.match(value) or ".." in value:
        raise InvalidInput(
            f"{param} must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter "
            f"or digit, without '..'; got {value!r}",
            param=param,
        )
    return value


def check_fits(site: Site, d: int, model: ModelInfo, what: str) -> None:
    """400 unless `site` exists in the served model and `d` equals its d_model."""
    try:
        model.check_site(site)
    except SiteError as exc:
        raise InvalidInput(
            f"{what} is at {site.hook_name}, but in model {model.name!r} {exc}", param="site"
        ) from None
    if d != model.d_model:
        # float64 sent where float32 is read (base64 vectors) doubles the length: say the dtype
        hint = " (twice d_model: float64 read as float32? send float32)" if d == 2 * model.d_model else ""
        raise InvalidInput(
            f"{what} has dimension {d}, but model {model.name!r} has d_model={model.d_model}{hint}",
            param="d_in",
        )


def search_terms(q: object) -> list[str]:
    """The distinct words of a feature search `q`, lower-cased, in order of first use; 400 naming `q`
    for a query over MAX_QUERY_CHARS characters or MAX_QUERY_TERMS distinct words."""
    if not isinstance(q, str) or len(q) > MAX_QUERY_CHARS:
        raise InvalidInput(f"q must be a string of at most {MAX_QUERY_CHARS} characters", param="q")
    terms = list(dict.fromkeys(_TERM.findall(q.lower())))
    if len(terms) > MAX_QUERY_TERMS:
        raise InvalidInput(
            f"q has {len(terms)} distinct words; at most {MAX_QUERY_TERMS} (every word must match)", param="q"
        )
    return terms


def check_raw_mlp_writer(loaded: LoadedSAE, fit: ModelInfo) -> None:
    """sparsify transcoders write the MLP module's raw output; where hook_mlp_out is the output of a
    post-MLP norm (Gemma-2/3) an edit there would not be the transcoder's edit: refuse, never approximate."""
    w = loaded.weights
    if (
        w.site_out is not None
        and fit.mlp_out_after_norm
        and loaded.meta.get("format") == Source.SPARSIFY.value
    ):
        raise InvalidInput(
            f"this sparsify transcoder writes the raw MLP output of layer {w.site_out.layer}, but in model "
            f"{fit.name!r} ({fit.architecture}) blocks.L.hook_mlp_out is the output of the post-MLP norm, "
            "so its edits cannot be applied exactly here; transcoders saved by SAELens against this "
            "model's hook names are accepted",
            param="site",
        )
