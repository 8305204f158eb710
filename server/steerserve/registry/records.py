"""Registry records: frozen rows of the metadata store, with their JSON view for the API and the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field

from steerserve.sites import Site


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
                {"site": s.hook_name, "layer": s.layer, "hook": s.hook, "norm": self.norms[s]}
                for s in self.sites
            ],
            "source": self.source,
            "sha256": self.blob_sha256,
            "size_bytes": self.size_bytes,
            "created": int(self.created),
            "meta": self.meta,
        }
        if len(self.norms) == 1:
            (site,) = self.norms
            out.update(site=site.hook_name, layer=site.layer, hook=site.hook, norm=self.norms[site])
        return out


@dataclass(frozen=True)
class VariantRecord:
    id: str
    spec: dict  # {"steering": [...], "feature_logit_bias": [...]} as given
    created: float

    def to_json(self) -> dict:
        return {"id": self.id, "object": "variant", **self.spec, "created": int(self.created)}


@dataclass(frozen=True)
class FeatureInfo:
    """What is known about one feature; None = unknown (and, in an update, = keep the stored value)."""

    index: int
    label: str | None = None
    explanation: str | None = None
    max_activation: float | None = None
    density: float | None = None
    mean_activation: float | None = None  # over every token of a corpus, zeros included

    def to_json(self, sae_id: str) -> dict:
        return {
            "sae": sae_id,
            "index": self.index,
            "label": self.label,
            "explanation": self.explanation,
            "max_activation": self.max_activation,
            "density": self.density,
            "mean_activation": self.mean_activation,
        }


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
