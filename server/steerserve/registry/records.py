"""Registry records: frozen rows of the metadata store, with their JSON view for the API and the CLI.

Every record checks its fields when it is built (`storable`: int64 integers, finite floats, valid
Unicode, bounded plain JSON). Each write builds its record before committing, so this is the one
validation point every write goes through: what the database or a JSON response cannot hold is
refused with a 400 before anything is stored, instead of being stored and then failing to render.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from steerserve.registry.errors import InvalidInput
from steerserve.registry.samples import check_sample
from steerserve.registry.storable import check_float, check_int, check_json, check_text
from steerserve.types.sites import Site

_MAX_META_BYTES = 64 << 10  # provenance notes copied from a cfg or a GGUF header
_MAX_SPEC_BYTES = 1 << 20  # a variant: at most 3 x 256 small interventions
_MAX_NAME = 1024


def _check_site(site: Site, param: str) -> None:
    check_int(site.layer, f"{param}.layer")
    check_text(site.hook, f"{param}.hook", _MAX_NAME)


@dataclass(frozen=True)
class SAERecord:
    id: str
    uid: str  # unique per stored row: a re-created id gets a new uid (device caches compare it)
    model: str
    site: Site
    d_in: int
    d_sae: int
    architecture: str  # relu | jumprelu | topk
    has_threshold: bool
    k: int | None
    apply_b_dec_to_input: bool
    dtype: str
    blob_sha256: str
    size_bytes: int
    created: float  # unix seconds
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("id", "uid", "model", "architecture", "dtype", "blob_sha256"):
            check_text(getattr(self, name), "model" if name == "model" else name, _MAX_NAME)
        _check_site(self.site, "site")
        check_int(self.d_in, "d_in", 1)
        check_int(self.d_sae, "d_sae", 1)
        if self.k is not None:
            check_int(self.k, "k", 1)
        check_int(self.size_bytes, "size_bytes")
        check_float(self.created, "created")
        check_json(self.meta, "cfg", _MAX_META_BYTES)  # the cfg fields it copies keep their names

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "object": "sae",
            "model": self.model,
            "site": self.site.hook_name,
            "layer": self.site.layer,
            "hook": self.site.hook,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "architecture": self.architecture,
            "has_threshold": self.has_threshold,
            "k": self.k,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "dtype": self.dtype,
            "sha256": self.blob_sha256,
            "size_bytes": self.size_bytes,
            "created": int(self.created),
            "meta": self.meta,
        }


@dataclass(frozen=True)
class VectorRecord:
    id: str
    uid: str
    model: str
    d: int
    norms: dict[Site, float]  # one entry per site the vector acts at
    source: str  # upload | contrast
    blob_sha256: str
    size_bytes: int
    created: float
    meta: dict = field(default_factory=dict)
    # sites with a stored projection sample (Registry.put_vector_stats) -> its size; read with the row
    projection_sample_sizes: dict[Site, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("id", "uid", "model", "source", "blob_sha256"):
            check_text(getattr(self, name), name, _MAX_NAME)
        check_int(self.d, "d", 1)
        for site, norm in self.norms.items():
            _check_site(site, "site")
            if isinstance(norm, bool) or not isinstance(norm, (int, float)) or not math.isfinite(norm):
                raise InvalidInput(
                    f"the direction at {site.hook_name} has a non-finite norm {norm!r}", "vector"
                )
        check_int(self.size_bytes, "size_bytes")
        check_float(self.created, "created")
        check_json(self.meta, "vector", _MAX_META_BYTES)  # e.g. GGUF metadata: vector.controlvector.x

    @property
    def sites(self) -> list[Site]:
        return sorted(self.norms)

    def to_json(self) -> dict:
        out = {
            "id": self.id,
            "object": "vector",
            "model": self.model,
            "d": self.d,
            "sites": [
                {
                    "site": s.hook_name,
                    "layer": s.layer,
                    "hook": s.hook,
                    "norm": self.norms[s],
                    "projection_sample_size": self.projection_sample_sizes.get(s),
                }
                for s in self.sites
            ],  # fmt: skip
            "source": self.source,
            "sha256": self.blob_sha256,
            "size_bytes": self.size_bytes,
            "created": int(self.created),
            "meta": self.meta,
        }
        if len(self.norms) == 1:
            (site,) = self.norms
            out.update(site=site.hook_name, layer=site.layer, hook=site.hook, norm=self.norms[site],
                       projection_sample_size=self.projection_sample_sizes.get(site))  # fmt: skip
        return out


@dataclass(frozen=True)
class VariantRecord:
    id: str
    spec: dict  # {"steering": [...], "feature_logit_bias": [...]} as given
    created: float

    def __post_init__(self) -> None:
        check_text(self.id, "id", _MAX_NAME)
        check_json(self.spec, "", _MAX_SPEC_BYTES)  # paths as in the body: steering[0].strength
        check_float(self.created, "created")

    def to_json(self) -> dict:
        return {"id": self.id, "object": "variant", **self.spec, "created": int(self.created)}


@dataclass(frozen=True)
class FeatureInfo:
    """What is known about one feature; None = unknown (and, in an update, = keep the stored value).

    `active_sample` (resample ablation): a uniform random sample, without replacement, of up to
    ACTIVE_SAMPLE_SIZE (256) of the feature's NONZERO activations over the stats corpus, sorted
    ascending (float32 values: registry/samples.py). With `density` it defines the distribution a
    resample draws from: (1 - density) * delta_0 + density * Uniform(active_sample).
    NOTE: why nonzero values only: features are zero-inflated (a feature off 95% of the time would
    leave ~13 nonzero values in a 256-value reservoir of all tokens), so the mass at zero comes exactly
    from `density` over the whole corpus and every slot holds an active value. Why a reservoir rather
    than quantiles: it is an exact sample of the empirical distribution, built in one streaming pass,
    and two reservoirs merge (interp/reservoir.py). `()`: computed, and the feature never fired.
    """

    index: int
    label: str | None = None
    explanation: str | None = None
    max_activation: float | None = None
    density: float | None = None
    mean_activation: float | None = None  # over every token of a corpus, zeros included
    active_sample: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_int(self.index, "index")
        for name in ("label", "explanation"):
            if getattr(self, name) is not None:
                check_text(getattr(self, name), name)
        for name in ("max_activation", "density", "mean_activation"):
            if getattr(self, name) is not None:
                check_float(getattr(self, name), name)
        if self.active_sample is not None:  # normalised: float32-exact, sorted (frozen: set directly)
            object.__setattr__(
                self, "active_sample", check_sample(self.active_sample, "active_sample", positive=True)
            )

    def to_json(self, sae_id: str, sample: bool = False) -> dict:
        """`sample`: include the values of `active_sample` (single-feature reads; lists carry its size)."""
        out = {
            "sae": sae_id,
            "index": self.index,
            "label": self.label,
            "explanation": self.explanation,
            "max_activation": self.max_activation,
            "density": self.density,
            "mean_activation": self.mean_activation,
            "active_sample_size": None if self.active_sample is None else len(self.active_sample),
        }
        if sample:
            out["active_sample"] = None if self.active_sample is None else list(self.active_sample)
        return out


@dataclass(frozen=True)
class FeatureHit:
    sae: str
    index: int
    label: str | None
    explanation: str | None
    score: float

    def to_json(self) -> dict:
        return {
            "sae": self.sae,
            "index": self.index,
            "label": self.label,
            "explanation": self.explanation,
            "score": self.score,
        }
