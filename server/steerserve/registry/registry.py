"""Registry: the one facade over the metadata store (db + store) and the blob store (blobs).

Storing anything with a blob follows one order, so a crash at any point leaves no row pointing at
a missing or partial file:
1. write the blob to a temp file, hash it, fsync it (no lock held);
2. take the write lock; insert the rows (an id conflict stops here); rename the temp file to its
   content address and fsync the directory; commit.
(`blobs_s3.S3BlobStore` uploads in step 1 and checks the object is still there in step 2.) If step 2
fails, the blob is removed again unless a row already names it.
Deleting commits the row removal first, then removes blobs no row references any more, under the
write lock again. `recover()` (run at open) removes temp files of dead writers and unreferenced blobs.
All methods block (disk, database): call them from a thread pool in async code.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from steerserve.registry import store
from steerserve.registry.blobs import BlobStore, LocalBlobStore, clean_stray_temp, open_blob_store
from steerserve.registry.db import Database, Tx
from steerserve.registry.errors import Conflict, InvalidInput, NotFound
from steerserve.registry.formats.common import LoadedSAE
from steerserve.registry.records import FeatureHit, FeatureInfo, SAERecord, VariantRecord, VectorRecord
from steerserve.registry.sae import SAEWeights
from steerserve.registry.samples import check_site_samples
from steerserve.registry.schema import MIGRATIONS
from steerserve.registry.storable import check_int
from steerserve.registry.tensors import read_safetensors, write_safetensors
from steerserve.registry.validate import check_fits, check_id, check_raw_mlp_writer, search_terms
from steerserve.registry.vector import FORMAT as VECTOR_FORMAT
from steerserve.registry.vector import SteeringVector
from steerserve.types.model import ModelInfo
from steerserve.types.sites import Site

logger = logging.getLogger(__name__)

DeleteListener = Callable[[str, str], None]  # (kind "sae" | "vector", id)
_PENDING = "pending"  # id / content address of a record checked before its blob is written


class Registry:
    def __init__(self, data_dir: str | Path, url: str | None = None, blobs: BlobStore | None = None):
        """Metadata at `url` (None: SQLite in `data_dir`); blobs in `blobs` (None: files in `data_dir`)."""
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.uploads_dir = self.data_dir / "uploads"  # staging for streamed HTTP uploads
        self.blobs = blobs if blobs is not None else LocalBlobStore(self.data_dir / "blobs")
        self.db = Database(url, self.data_dir)
        self._listeners: list[DeleteListener] = []
        try:
            self.schema_version = self.db.migrate(MIGRATIONS)
            with self.db.write() as tx:
                self.registry_id = store.registry_id(tx)
            self.blobs.claim(self.registry_id)  # before recover(): it deletes blobs no row of ours names
            self.recover()
        except BaseException:
            self.db.close()
            raise

    @classmethod
    def from_config(cls, cfg) -> Registry:
        """From a `steerserve.config.RegistryConfig` (data_dir, registry_url, blob_url, ...)."""
        return cls(cfg.data_dir, cfg.registry_url, open_blob_store(cfg))

    def close(self) -> None:
        self.db.close()

    # ---- recovery -----------------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """Remove stray temp files (dead writers) and blobs no row references; returns the counts."""
        temps = self.blobs.clean_stray_temp() + clean_stray_temp(self.uploads_dir)
        with self.db.write() as tx:
            referenced = store.referenced_shas(tx)
            orphans = [sha for sha in self.blobs.list() if sha not in referenced]
            for sha in orphans:
                self.blobs.delete(sha)
        if temps or orphans:
            logger.info(
                "registry recovery: removed %d temp files, %d unreferenced blobs", len(temps), len(orphans)
            )
        return {"temp_files": len(temps), "orphan_blobs": len(orphans)}

    def dangling(self) -> list[str]:
        """`kind:id` of rows whose blob file is missing (empty unless files were removed by hand)."""
        with self.db.read() as tx:
            rows = [(f"sae:{r.id}", r.blob_sha256) for r in store.list_saes(tx)]
            rows += [(f"vector:{r.id}", r.blob_sha256) for r in store.list_vectors(tx)]
        stored = set(self.blobs.list())
        return [name for name, sha in rows if sha not in stored]

    # ---- blob plumbing ------------------------------------------------------------------------

    def _store(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str], insert: Callable) -> str:
        """Write a blob and commit the rows that name it, in the crash-safe order (module docstring).

        `insert(tx, sha, size)` inserts the rows; it may raise (e.g. Conflict) before anything is published.
        """
        with self.blobs.new_temp() as temp:
            write_safetensors(tensors, temp.path, metadata)
            sha, size = self.blobs.seal(temp.path)
            try:
                with self.db.write() as tx:
                    insert(tx, sha, size)
                    self.blobs.publish(temp.path, sha)
            except BaseException:
                with contextlib.suppress(Exception):  # best effort: recover() removes what is left
                    self._collect([sha])
                raise
        return sha

    def _collect(self, shas: list[str]) -> None:
        """Delete the blobs among `shas` that no row references (under the write lock)."""
        if not shas:
            return
        with self.db.write() as tx:
            for sha in set(shas):
                if not store.is_referenced(tx, sha):
                    self.blobs.delete(sha)

    def _read_blob(self, sha: str, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        try:
            path = self.blobs.local_path(sha)
        except FileNotFoundError:
            raise RuntimeError(f"the blob {sha} of {what} is missing from {self.blobs.location}") from None
        return read_safetensors(path, what)

    def add_delete_listener(self, listener: DeleteListener) -> None:
        """Called as listener(kind, id) after an SAE or vector is deleted (device caches evict)."""
        self._listeners.append(listener)

    def _deleted(self, kind: str, item_id: str) -> None:
        for listener in self._listeners:
            listener(kind, item_id)

    def _tx_get(self, getter: Callable[[Tx, str], object], item_id: str, what: str):
        with self.db.read() as tx:
            rec = getter(tx, item_id)
        if rec is None:
            raise NotFound(f"no {what} with id {item_id!r}", param="id")
        return rec

    # ---- SAEs ---------------------------------------------------------------------------------

    def add_sae(
        self,
        sae: LoadedSAE | SAEWeights,
        sae_id: str | None = None,
        model: str | None = None,
        fit: ModelInfo | None = None,
    ) -> SAERecord:
        """Store an SAE. `fit`: the served model, checked (site exists, d_in == d_model) and
        recorded as the SAE's model; else `model`, else the model named in the file."""
        loaded = sae if isinstance(sae, LoadedSAE) else LoadedSAE(sae)
        w = loaded.weights
        if sae_id is not None:
            check_id(sae_id)
        if fit is not None:
            check_fits(w.site, w.d_in, fit, "the SAE")
            check_raw_mlp_writer(loaded, fit)
        model_name = fit.name if fit is not None else (model or loaded.model_name or "unknown")
        meta = {**loaded.meta, **({"model_name": loaded.model_name} if loaded.model_name else {})}
        # NOTE: the record is built (and so checked: records.py) before the blob is written; the insert
        # only fills in the content address
        draft = SAERecord(
            id=sae_id or _PENDING, uid=uuid.uuid4().hex, model=model_name, site=w.site, d_in=w.d_in,
            d_sae=w.d_sae, architecture=w.architecture, has_threshold=w.threshold is not None, k=w.k,
            apply_b_dec_to_input=w.apply_b_dec_to_input, dtype=str(w.dtype).removeprefix("torch."),
            blob_sha256=_PENDING, size_bytes=0, created=time.time(), meta=meta,
        )  # fmt: skip
        holder: list[SAERecord] = []

        def insert(tx: Tx, sha: str, size: int) -> None:
            rec = replace(
                draft, id=sae_id or f"{w.site.hook_name}-{sha[:10]}", blob_sha256=sha, size_bytes=size
            )
            store.insert_sae(tx, rec)
            holder.append(rec)

        self._store(w.tensors(), w.blob_metadata(), insert)
        return holder[0]

    def get_sae(self, sae_id: str) -> SAERecord:
        return self._tx_get(store.get_sae, sae_id, "SAE")

    def list_saes(self, model: str | None = None) -> list[SAERecord]:
        with self.db.read() as tx:
            return store.list_saes(tx, model)

    def load_sae(self, sae_id: str) -> tuple[SAERecord, SAEWeights]:
        """The record and its weights (CPU, stored dtype)."""
        rec = self.get_sae(sae_id)
        try:
            tensors, metadata = self._read_blob(rec.blob_sha256, f"SAE {sae_id}")
        except RuntimeError:
            self.get_sae(sae_id)  # deleted meanwhile -> NotFound; else the blob is truly missing
            raise
        return rec, SAEWeights.from_blob(tensors, metadata)

    def delete_sae(self, sae_id: str) -> SAERecord:
        with self.db.write() as tx:
            owned = store.cache_shas_of_owner(tx, f"sae:{sae_id}")
            rec = store.delete_sae(tx, sae_id)
        if rec is None:
            raise NotFound(f"no SAE with id {sae_id!r}", param="id")
        self._collect([rec.blob_sha256, *owned])
        self._deleted("sae", sae_id)
        return rec

    # ---- features -----------------------------------------------------------------------------

    def put_features(self, sae_id: str, infos: list[FeatureInfo]) -> int:
        """Merge annotations into the SAE's features (None keeps the stored value); returns the count."""
        with self.db.write() as tx:
            rec = store.get_sae(tx, sae_id)
            if rec is None:
                raise NotFound(f"no SAE with id {sae_id!r}", param="id")
            for i, info in enumerate(infos):
                if not 0 <= info.index < rec.d_sae:
                    raise InvalidInput(
                        f"features[{i}].index {info.index} is out of range: SAE {sae_id!r} has features "
                        f"0..{rec.d_sae - 1}",
                        param=f"features[{i}].index",
                    )
            store.upsert_features(tx, sae_id, infos)
        return len(infos)

    def get_feature(self, sae_id: str, index: int) -> FeatureInfo:
        """A feature's annotations (all None when none were uploaded); 404 outside 0..d_sae-1."""
        with self.db.read() as tx:
            rec = store.get_sae(tx, sae_id)
            # NOTE: the range check comes first: an index beyond int64 must never reach the database
            info = store.get_feature(tx, sae_id, index) if rec and 0 <= index < rec.d_sae else None
        if rec is None:
            raise NotFound(f"no SAE with id {sae_id!r}", param="sae")
        if not 0 <= index < rec.d_sae:
            raise NotFound(f"SAE {sae_id!r} has features 0..{rec.d_sae - 1}, not {index}", param="index")
        return info or FeatureInfo(index)

    def count_features(self, sae_id: str) -> int:
        with self.db.read() as tx:
            return store.count_features(tx, sae_id)

    def search_features(
        self, q: str, sae_id: str | None = None, limit: int = 20, site: Site | None = None
    ) -> list[FeatureHit]:
        """Features whose label/explanation match `q`, best first (an exact label match first of all);
        only SAE `sae_id` and / or SAEs at `site` when given. `q` is bounded (validate.search_terms)."""
        terms = search_terms(q)
        check_int(limit, "limit", 1)
        if site is not None:
            check_int(site.layer, "site")
        with self.db.read() as tx:
            return store.search_features(tx, q, terms, sae_id, limit, site)

    # ---- vectors ------------------------------------------------------------------------------

    def add_vector(
        self,
        vector: SteeringVector,
        vector_id: str | None = None,
        model: str | None = None,
        fit: ModelInfo | None = None,
        source: str = "upload",
        meta: dict | None = None,
    ) -> VectorRecord:
        if vector_id is not None:
            check_id(vector_id)
        if source not in ("upload", "contrast"):
            raise ValueError(f"source must be upload or contrast, got {source!r}")
        if fit is not None:
            for site in vector.sites:
                check_fits(site, vector.d, fit, "the vector")
        draft = VectorRecord(
            id=vector_id or _PENDING, uid=uuid.uuid4().hex,
            model=fit.name if fit is not None else (model or "unknown"), d=vector.d, norms=vector.norms(),
            source=source, blob_sha256=_PENDING, size_bytes=0, created=time.time(), meta=meta or {},
        )  # fmt: skip
        holder: list[VectorRecord] = []

        def insert(tx: Tx, sha: str, size: int) -> None:
            rec = replace(draft, id=vector_id or f"vec-{sha[:12]}", blob_sha256=sha, size_bytes=size)
            store.insert_vector(tx, rec)
            holder.append(rec)

        self._store(vector.blob_tensors(), {"format": VECTOR_FORMAT}, insert)
        return holder[0]

    def get_vector(self, vector_id: str) -> VectorRecord:
        return self._tx_get(store.get_vector, vector_id, "vector")

    def list_vectors(self) -> list[VectorRecord]:
        with self.db.read() as tx:
            return store.list_vectors(tx)

    def load_vector(self, vector_id: str) -> tuple[VectorRecord, SteeringVector]:
        rec = self.get_vector(vector_id)
        try:
            tensors, metadata = self._read_blob(rec.blob_sha256, f"vector {vector_id}")
        except RuntimeError:
            self.get_vector(vector_id)
            raise
        return rec, SteeringVector.from_blob(tensors, metadata)

    def delete_vector(self, vector_id: str) -> VectorRecord:
        with self.db.write() as tx:
            owned = store.cache_shas_of_owner(tx, f"vector:{vector_id}")
            rec = store.delete_vector(tx, vector_id)
        if rec is None:
            raise NotFound(f"no vector with id {vector_id!r}", param="id")
        self._collect([rec.blob_sha256, *owned])
        self._deleted("vector", vector_id)
        return rec

    def put_vector_stats(
        self, vector_id: str, samples: dict[Site, tuple[float, ...]], uid: str | None = None
    ) -> None:
        """Store, per site of the vector, a sample of its projections h . u (u = v / |v|) over a corpus:
        up to 256 values (all tokens: zeros are not special here), uniform without replacement, stored
        sorted as float32 (registry/samples.py). Replaces the given sites' samples, keeps the others';
        all or nothing. The stats belong to the stored vector: deleting or replacing it drops them; `uid`:
        the vector they were computed for (a 409 if it was replaced meanwhile)."""
        checked = check_site_samples(samples)
        with self.db.write() as tx:
            rec = store.get_vector(tx, vector_id)
            if rec is None:
                raise NotFound(f"no vector with id {vector_id!r}", param="id")
            if uid is not None and rec.uid != uid:
                raise Conflict(f"vector {vector_id!r} was replaced while its stats were computed", "id")
            if stray := [site.hook_name for site in checked if site not in rec.norms]:
                raise InvalidInput(
                    f"vector {vector_id!r} does not act at {', '.join(stray)}; its sites: "
                    f"{', '.join(s.hook_name for s in rec.sites)}",
                    param="site",
                )
            store.put_vector_stats(tx, rec, checked)

    def get_vector_stats(self, vector_id: str) -> dict[Site, tuple[float, ...]]:
        """Per site, the stored projection sample (sorted); {} when none was computed. 404: no vector."""
        with self.db.read() as tx:
            rec = store.get_vector(tx, vector_id)
            stats = store.get_vector_stats(tx, rec) if rec is not None else None
        if stats is None:
            raise NotFound(f"no vector with id {vector_id!r}", param="id")
        return stats

    # ---- variants -----------------------------------------------------------------------------

    def add_variant(self, variant_id: str, spec: dict) -> VariantRecord:
        rec = VariantRecord(check_id(variant_id), spec, time.time())
        with self.db.write() as tx:
            store.insert_variant(tx, rec)
        return rec

    def get_variant(self, variant_id: str) -> VariantRecord:
        return self._tx_get(store.get_variant, variant_id, "variant")

    def list_variants(self) -> list[VariantRecord]:
        with self.db.read() as tx:
            return store.list_variants(tx)

    def delete_variant(self, variant_id: str) -> None:
        with self.db.write() as tx:
            found = store.delete_variant(tx, variant_id)
        if not found:
            raise NotFound(f"no variant with id {variant_id!r}", param="id")

    # ---- derived-tensor cache -----------------------------------------------------------------

    def put_cached(self, key: str, tensors: dict[str, torch.Tensor], owner: str | None = None) -> str:
        """Store tensors under `key` (replacing any), dropped with `owner` ("sae:<id>" / "vector:<id>")."""
        replaced: list[str] = []

        def insert(tx: Tx, sha: str, size: int) -> None:
            old = store.put_cache(tx, key, owner, sha, size, time.time())
            if old and old != sha:
                replaced.append(old)

        sha = self._store(tensors, {"format": "steerserve.cache.v1"}, insert)
        self._collect(replaced)
        return sha

    def get_cached(self, key: str) -> dict[str, torch.Tensor] | None:
        with self.db.read() as tx:
            sha = store.get_cache(tx, key)
        if sha is None:
            return None
        try:
            return read_safetensors(self.blobs.local_path(sha), f"cache {key}")[0]
        except FileNotFoundError:  # replaced or dropped meanwhile
            return None
