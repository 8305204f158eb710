"""Table operations of the metadata store: records in, records out, one function per operation.

Every function takes an open transaction (`db.Tx`); callers decide its extent and take the write
lock for writes (`Database.write()`), so check-then-insert is safe here.
"""

from __future__ import annotations

import json
import uuid

from steerserve.registry.db import Tx
from steerserve.registry.errors import Conflict
from steerserve.registry.records import FeatureHit, FeatureInfo, SAERecord, VariantRecord, VectorRecord
from steerserve.registry.samples import pack, unpack
from steerserve.registry.storable import dumps
from steerserve.types.sites import Site

_EXACT_LABEL_BONUS = 1000.0
# FeatureInfo's fields besides `index`, each a column of `features` of the same name
_FEATURE_FIELDS = ("label", "explanation", "max_activation", "density", "mean_activation", "active_sample")
_PACKED = {"active_sample"}  # float32 bytes in the database (samples.py), a tuple in the record
_SAE_COLUMNS = (
    "id, uid, model, layer, hook, d_in, d_sae, architecture, has_threshold, k, apply_b_dec_to_input, "
    "dtype, blob_sha256, size_bytes, meta, created"
)


# ---- SAEs -----------------------------------------------------------------------------------------


def _sae(row: dict) -> SAERecord:
    return SAERecord(
        id=row["id"],
        uid=row["uid"],
        model=row["model"],
        site=Site(row["layer"], row["hook"]),
        d_in=row["d_in"],
        d_sae=row["d_sae"],
        architecture=row["architecture"],
        has_threshold=bool(row["has_threshold"]),
        k=row["k"],
        apply_b_dec_to_input=bool(row["apply_b_dec_to_input"]),
        dtype=row["dtype"],
        blob_sha256=row["blob_sha256"],
        size_bytes=row["size_bytes"],
        created=row["created"],
        meta=json.loads(row["meta"]),
    )


def insert_sae(tx: Tx, r: SAERecord) -> None:
    if tx.one("SELECT id FROM saes WHERE id = ?", (r.id,)):
        raise Conflict(f"an SAE with id {r.id!r} already exists", param="id")
    tx.execute(
        f"INSERT INTO saes ({_SAE_COLUMNS}) VALUES ({', '.join('?' * 16)})",
        (r.id, r.uid, r.model, r.site.layer, r.site.hook, r.d_in, r.d_sae, r.architecture, int(r.has_threshold),
         r.k, int(r.apply_b_dec_to_input), r.dtype, r.blob_sha256, r.size_bytes,
         dumps(r.meta), r.created),
    )  # fmt: skip


def get_sae(tx: Tx, sae_id: str) -> SAERecord | None:
    row = tx.one(f"SELECT {_SAE_COLUMNS} FROM saes WHERE id = ?", (sae_id,))
    return _sae(row) if row else None


def list_saes(tx: Tx, model: str | None = None) -> list[SAERecord]:
    if model is None:
        return [_sae(r) for r in tx.all(f"SELECT {_SAE_COLUMNS} FROM saes ORDER BY id")]
    return [_sae(r) for r in tx.all(f"SELECT {_SAE_COLUMNS} FROM saes WHERE model = ? ORDER BY id", (model,))]


def delete_sae(tx: Tx, sae_id: str) -> SAERecord | None:
    """Remove the SAE, its features and the cache entries it owns; returns the removed row."""
    rec = get_sae(tx, sae_id)
    if rec is not None:
        tx.execute("DELETE FROM features WHERE sae_id = ?", (sae_id,))
        tx.execute("DELETE FROM blob_cache WHERE owner = ?", (f"sae:{sae_id}",))
        tx.execute("DELETE FROM saes WHERE id = ?", (sae_id,))
    return rec


# ---- features -------------------------------------------------------------------------------------


def upsert_features(tx: Tx, sae_id: str, infos: list[FeatureInfo]) -> None:
    """Insert or merge: a None field keeps what is stored."""
    merge = ", ".join(f"{c} = COALESCE(excluded.{c}, features.{c})" for c in _FEATURE_FIELDS)
    tx.executemany(
        f"INSERT INTO features (sae_id, idx, {', '.join(_FEATURE_FIELDS)}) "
        f"VALUES (?, ?, {', '.join('?' * len(_FEATURE_FIELDS))}) "
        f"ON CONFLICT (sae_id, idx) DO UPDATE SET {merge}",
        [(sae_id, f.index, *(_column(f, c) for c in _FEATURE_FIELDS)) for f in infos],
    )


def _column(info: FeatureInfo, name: str):
    value = getattr(info, name)
    return pack(value) if name in _PACKED else value


def get_feature(tx: Tx, sae_id: str, index: int) -> FeatureInfo | None:
    row = tx.one(
        f"SELECT idx, {', '.join(_FEATURE_FIELDS)} FROM features WHERE sae_id = ? AND idx = ?",
        (sae_id, index),
    )
    if row is None:
        return None
    return FeatureInfo(row["idx"], **{c: unpack(row[c]) if c in _PACKED else row[c] for c in _FEATURE_FIELDS})


def count_features(tx: Tx, sae_id: str) -> int:
    return tx.one("SELECT COUNT(*) AS n FROM features WHERE sae_id = ?", (sae_id,))["n"]


def search_features(
    tx: Tx, q: str, tokens: list[str], sae_id: str | None, limit: int, site: Site | None = None
) -> list[FeatureHit]:
    """Full-text match of every token (a prefix) on label and explanation (label weighted higher);
    an exact label match with `q` first. `tokens`: validate.search_terms(q)."""
    if not tokens:
        return []
    sae_filter = " AND f.sae_id = ?" if sae_id is not None else ""
    if site is not None:
        sae_filter += " AND f.sae_id IN (SELECT id FROM saes WHERE layer = ? AND hook = ?)"
    if tx.dialect == "sqlite":
        sql = (
            "SELECT f.sae_id, f.idx, f.label, f.explanation, "
            f"(CASE WHEN lower(f.label) = lower(?) THEN {_EXACT_LABEL_BONUS} ELSE 0.0 END) "
            "- bm25(features_fts, 10.0, 1.0) AS score "
            "FROM features_fts JOIN features f ON f.rowid = features_fts.rowid "
            f"WHERE features_fts MATCH ?{sae_filter} ORDER BY score DESC, f.sae_id, f.idx LIMIT ?"
        )
        match = " ".join(f'"{t}"*' for t in tokens)
    else:
        sql = (
            "SELECT f.sae_id, f.idx, f.label, f.explanation, "
            f"(CASE WHEN lower(f.label) = lower(?) THEN {_EXACT_LABEL_BONUS} ELSE 0.0 END) "
            "+ ts_rank(f.tsv, to_tsquery('simple', ?)) AS score FROM features f "
            f"WHERE f.tsv @@ to_tsquery('simple', ?){sae_filter} ORDER BY score DESC, f.sae_id, f.idx LIMIT ?"
        )
        match = " & ".join(f"{t}:*" for t in tokens)
    params: list = [q.strip(), match] + ([match] if tx.dialect == "postgresql" else [])
    params += ([sae_id] if sae_id is not None else []) + ([site.layer, site.hook] if site is not None else [])
    params += [limit]
    return [
        FeatureHit(r["sae_id"], r["idx"], r["label"], r["explanation"], float(r["score"]))
        for r in tx.all(sql, params)
    ]


# ---- vectors --------------------------------------------------------------------------------------

_VEC_COLUMNS = "id, uid, model, d, source, blob_sha256, size_bytes, meta, created"


def _vectors(tx: Tx, rows: list[dict]) -> list[VectorRecord]:
    norms: dict[str, dict[Site, float]] = {r["id"]: {} for r in rows}
    sizes: dict[str, dict[Site, int]] = {r["id"]: {} for r in rows}
    if rows:
        marks = ", ".join("?" * len(rows))
        ids = [r["id"] for r in rows]
        for s in tx.all(f"SELECT vector_id, layer, hook, norm FROM vector_sites WHERE vector_id IN ({marks})",
                        ids):  # fmt: skip
            norms[s["vector_id"]][Site(s["layer"], s["hook"])] = s["norm"]
        uids = {r["id"]: r["uid"] for r in rows}
        for s in tx.all(f"SELECT vector_id, vector_uid, layer, hook, length(sample) AS n FROM vector_stats "
                        f"WHERE vector_id IN ({marks})", ids):  # fmt: skip
            if s["vector_uid"] == uids[s["vector_id"]]:
                sizes[s["vector_id"]][Site(s["layer"], s["hook"])] = s["n"] // 4  # float32 bytes
    return [
        VectorRecord(r["id"], r["uid"], r["model"], r["d"], norms[r["id"]], r["source"], r["blob_sha256"],
                     r["size_bytes"], r["created"], json.loads(r["meta"]), sizes[r["id"]])
        for r in rows
    ]  # fmt: skip


def insert_vector(tx: Tx, r: VectorRecord) -> None:
    if tx.one("SELECT id FROM vectors WHERE id = ?", (r.id,)):
        raise Conflict(f"a vector with id {r.id!r} already exists", param="id")
    tx.execute(
        f"INSERT INTO vectors ({_VEC_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (r.id, r.uid, r.model, r.d, r.source, r.blob_sha256, r.size_bytes, dumps(r.meta),
         r.created),
    )  # fmt: skip
    tx.executemany(
        "INSERT INTO vector_sites (vector_id, layer, hook, norm) VALUES (?, ?, ?, ?)",
        [(r.id, s.layer, s.hook, n) for s, n in r.norms.items()],
    )


def get_vector(tx: Tx, vector_id: str) -> VectorRecord | None:
    rows = tx.all(f"SELECT {_VEC_COLUMNS} FROM vectors WHERE id = ?", (vector_id,))
    return _vectors(tx, rows)[0] if rows else None


def list_vectors(tx: Tx) -> list[VectorRecord]:
    return _vectors(tx, tx.all(f"SELECT {_VEC_COLUMNS} FROM vectors ORDER BY id"))


def delete_vector(tx: Tx, vector_id: str) -> VectorRecord | None:
    rec = get_vector(tx, vector_id)
    if rec is not None:
        tx.execute("DELETE FROM vector_sites WHERE vector_id = ?", (vector_id,))
        tx.execute("DELETE FROM vector_stats WHERE vector_id = ?", (vector_id,))
        tx.execute("DELETE FROM blob_cache WHERE owner = ?", (f"vector:{vector_id}",))
        tx.execute("DELETE FROM vectors WHERE id = ?", (vector_id,))
    return rec


def put_vector_stats(tx: Tx, rec: VectorRecord, samples: dict[Site, tuple[float, ...]]) -> None:
    """Replace the projection samples of the given sites of `rec` (other sites keep theirs)."""
    tx.executemany(
        "DELETE FROM vector_stats WHERE vector_id = ? AND layer = ? AND hook = ?",
        [(rec.id, site.layer, site.hook) for site in samples],
    )
    tx.executemany(
        "INSERT INTO vector_stats (vector_id, vector_uid, layer, hook, sample) VALUES (?, ?, ?, ?, ?)",
        [(rec.id, rec.uid, site.layer, site.hook, pack(sample)) for site, sample in samples.items()],
    )


def get_vector_stats(tx: Tx, rec: VectorRecord) -> dict[Site, tuple[float, ...]]:
    rows = tx.all(
        "SELECT layer, hook, sample FROM vector_stats WHERE vector_id = ? AND vector_uid = ?",
        (rec.id, rec.uid),
    )
    return {Site(r["layer"], r["hook"]): unpack(r["sample"]) for r in rows}


# ---- variants -------------------------------------------------------------------------------------


def insert_variant(tx: Tx, r: VariantRecord) -> None:
    if tx.one("SELECT id FROM variants WHERE id = ?", (r.id,)):
        raise Conflict(f"a variant with id {r.id!r} already exists", param="id")
    tx.execute(
        "INSERT INTO variants (id, spec, created) VALUES (?, ?, ?)",
        (r.id, dumps(r.spec, sort_keys=False), r.created),
    )


def get_variant(tx: Tx, variant_id: str) -> VariantRecord | None:
    row = tx.one("SELECT id, spec, created FROM variants WHERE id = ?", (variant_id,))
    return VariantRecord(row["id"], json.loads(row["spec"]), row["created"]) if row else None


def list_variants(tx: Tx) -> list[VariantRecord]:
    rows = tx.all("SELECT id, spec, created FROM variants ORDER BY id")
    return [VariantRecord(r["id"], json.loads(r["spec"]), r["created"]) for r in rows]


def delete_variant(tx: Tx, variant_id: str) -> bool:
    found = tx.one("SELECT id FROM variants WHERE id = ?", (variant_id,)) is not None
    tx.execute("DELETE FROM variants WHERE id = ?", (variant_id,))
    return found


# ---- blob cache and blob references ---------------------------------------------------------------


def put_cache(tx: Tx, key: str, owner: str | None, sha: str, size: int, created: float) -> str | None:
    """Upsert a cache entry; returns the sha it replaced, if any."""
    old = tx.one("SELECT blob_sha256 FROM blob_cache WHERE key = ?", (key,))
    tx.execute("DELETE FROM blob_cache WHERE key = ?", (key,))
    tx.execute(
        "INSERT INTO blob_cache (key, owner, blob_sha256, size_bytes, created) VALUES (?, ?, ?, ?, ?)",
        (key, owner, sha, size, created),
    )
    return old["blob_sha256"] if old else None


def get_cache(tx: Tx, key: str) -> str | None:
    row = tx.one("SELECT blob_sha256 FROM blob_cache WHERE key = ?", (key,))
    return row["blob_sha256"] if row else None


def cache_shas_of_owner(tx: Tx, owner: str) -> list[str]:
    return [r["blob_sha256"] for r in tx.all("SELECT blob_sha256 FROM blob_cache WHERE owner = ?", (owner,))]


def is_referenced(tx: Tx, sha: str) -> bool:
    return any(
        tx.one(f"SELECT 1 AS x FROM {table} WHERE blob_sha256 = ? LIMIT 1", (sha,))
        for table in ("saes", "vectors", "blob_cache")
    )


def referenced_shas(tx: Tx) -> set[str]:
    rows = tx.all(
        "SELECT blob_sha256 FROM saes UNION SELECT blob_sha256 FROM vectors UNION SELECT blob_sha256 FROM blob_cache"
    )
    return {r["blob_sha256"] for r in rows}


def registry_id(tx: Tx) -> str:
    """This registry's id, made on first use (call in a write transaction)."""
    row = tx.one("SELECT value FROM registry_info WHERE key = 'registry_id'")
    if row:
        return row["value"]
    new = uuid.uuid4().hex
    tx.execute("INSERT INTO registry_info (key, value) VALUES ('registry_id', ?)", (new,))
    return new
