"""The registry schema as numbered migrations, one list for both databases plus per-dialect parts.

A migration is never edited once released: a change is a new, higher version. `Database.migrate`
applies the missing ones in order inside the write lock and refuses a database newer than this code.
Column types are chosen to mean the same in SQLite and PostgreSQL (booleans are 0/1 integers,
JSON is TEXT, times are unix seconds in DOUBLE PRECISION).
"""

from __future__ import annotations

_CORE = [
    """CREATE TABLE saes (
        id TEXT PRIMARY KEY,
        uid TEXT NOT NULL,
        model TEXT NOT NULL,
        layer INTEGER NOT NULL,
        hook TEXT NOT NULL,
        d_in INTEGER NOT NULL,
        d_sae INTEGER NOT NULL,
        architecture TEXT NOT NULL,
        has_threshold INTEGER NOT NULL,
        k INTEGER,
        apply_b_dec_to_input INTEGER NOT NULL,
        dtype TEXT NOT NULL,
        blob_sha256 TEXT NOT NULL,
        size_bytes BIGINT NOT NULL,
        meta TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE features (
        sae_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        label TEXT,
        explanation TEXT,
        max_activation DOUBLE PRECISION,
        density DOUBLE PRECISION,
        PRIMARY KEY (sae_id, idx)
    )""",
    """CREATE TABLE vectors (
        id TEXT PRIMARY KEY,
        uid TEXT NOT NULL,
        model TEXT NOT NULL,
        d INTEGER NOT NULL,
        source TEXT NOT NULL,
        blob_sha256 TEXT NOT NULL,
        size_bytes BIGINT NOT NULL,
        meta TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE vector_sites (
        vector_id TEXT NOT NULL,
        layer INTEGER NOT NULL,
        hook TEXT NOT NULL,
        norm DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (vector_id, layer, hook)
    )""",
    """CREATE TABLE variants (
        id TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL
    )""",
    # Derived tensors cached by later stages (e.g. a feature's logit effects), dropped with their owner.
    """CREATE TABLE blob_cache (
        key TEXT PRIMARY KEY,
        owner TEXT,
        blob_sha256 TEXT NOT NULL,
        size_bytes BIGINT NOT NULL,
        created DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX saes_blob ON saes (blob_sha256)",
    "CREATE INDEX vectors_blob ON vectors (blob_sha256)",
    "CREATE INDEX blob_cache_blob ON blob_cache (blob_sha256)",
    "CREATE INDEX blob_cache_owner ON blob_cache (owner)",
]

_SQLITE_SEARCH = [
    """CREATE VIRTUAL TABLE features_fts USING fts5(
        label, explanation, content='features', content_rowid='rowid', tokenize='unicode61'
    )""",
    """CREATE TRIGGER features_fts_insert AFTER INSERT ON features BEGIN
        INSERT INTO features_fts (rowid, label, explanation) VALUES (new.rowid, new.label, new.explanation);
    END""",
    """CREATE TRIGGER features_fts_delete AFTER DELETE ON features BEGIN
        INSERT INTO features_fts (features_fts, rowid, label, explanation)
        VALUES ('delete', old.rowid, old.label, old.explanation);
    END""",
    """CREATE TRIGGER features_fts_update AFTER UPDATE ON features BEGIN
        INSERT INTO features_fts (features_fts, rowid, label, explanation)
        VALUES ('delete', old.rowid, old.label, old.explanation);
        INSERT INTO features_fts (rowid, label, explanation) VALUES (new.rowid, new.label, new.explanation);
    END""",
]

_POSTGRES_SEARCH = [
    """ALTER TABLE features ADD COLUMN tsv tsvector GENERATED ALWAYS AS (
        setweight(to_tsvector('simple', coalesce(label, '')), 'A')
        || setweight(to_tsvector('simple', coalesce(explanation, '')), 'B')
    ) STORED""",
    "CREATE INDEX features_tsv ON features USING GIN (tsv)",
]


def _samples(blob: str) -> list[str]:
    return [
        f"ALTER TABLE features ADD COLUMN active_sample {blob}",
        f"""CREATE TABLE vector_stats (
            vector_id TEXT NOT NULL,
            vector_uid TEXT NOT NULL,
            layer INTEGER NOT NULL,
            hook TEXT NOT NULL,
            sample {blob} NOT NULL,
            PRIMARY KEY (vector_id, layer, hook)
        )""",
    ]


MIGRATIONS: list[tuple[int, dict[str, list[str]]]] = [
    (1, {"all": _CORE}),
    (2, {"sqlite": _SQLITE_SEARCH, "postgresql": _POSTGRES_SEARCH}),
    # registry_id: which registry a blob store belongs to (`Registry._claim_blobs`)
    (3, {"all": ["CREATE TABLE registry_info (key TEXT PRIMARY KEY, value TEXT NOT NULL)"]}),
    # a feature's mean activation over a corpus (zeros counted), for `ablate` with "to": "mean"
    (4, {"all": ["ALTER TABLE features ADD COLUMN mean_activation DOUBLE PRECISION"]}),
    # resample ablation (registry/samples.py): samples as float32 little-endian bytes; a feature's
    # nonzero activations, and per vector site its projections, keyed by the vector's uid so that a
    # replaced vector never reads its predecessor's stats (delete_vector also removes them)
    (5, {"sqlite": _samples("BLOB"), "postgresql": _samples("BYTEA")}),
]
