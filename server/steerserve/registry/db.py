"""SQL connections and transactions for the metadata store: SQLite (default, WAL) or PostgreSQL.

One statement dialect: SQL is written with `?` placeholders and rewritten to `%s` for psycopg; the
few statements that differ (full-text search, migrations) branch on `Database.dialect`.
Each thread gets its own connection. `write()` is the registry's write lock: `BEGIN IMMEDIATE` on
SQLite (one writer per database file, across processes), a transaction-scoped advisory lock on
PostgreSQL (one writer per registry, across replicas). Blob publication and deletion happen under it.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from steerserve.registry.errors import InvalidInput
from steerserve.registry.storable import INT64_MAX

_PG_LOCK_KEY = 0x5354_4552_5245_4731 & 0x7FFF_FFFF_FFFF_FFFF  # "STERREG1": one writer per registry


class Tx:
    """One transaction: execute statements, fetch rows as dicts."""

    def __init__(self, conn, dialect: str):
        self._conn, self.dialect = conn, dialect

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgresql" else sql

    def execute(self, sql: str, params: Sequence = ()):
        return self._conn.execute(self._sql(sql), _bound(params))

    def executemany(self, sql: str, rows: list[Sequence]) -> None:
        if rows:
            self._conn.cursor().executemany(self._sql(sql), [_bound(r) for r in rows])

    def all(self, sql: str, params: Sequence = ()) -> list[dict]:
        cur = self.execute(sql, params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def one(self, sql: str, params: Sequence = ()) -> dict | None:
        rows = self.all(sql, params)
        return rows[0] if rows else None


def _bound(params: Sequence) -> tuple:
    """The last guard before the driver (records and routes check with parameter names first): an
    integer beyond int64 (SQLite: OverflowError) or a lone surrogate (UnicodeEncodeError) is bad input."""
    for p in params:
        if isinstance(p, int) and not isinstance(p, bool) and not -INT64_MAX - 1 <= p <= INT64_MAX:
            raise InvalidInput("a number in the request is beyond the registry's 64-bit integers")
        if isinstance(p, str) and not p.isascii():
            try:
                p.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidInput(
                    "a text in the request holds a lone UTF-16 surrogate (not Unicode)"
                ) from None
    return tuple(params)


class Database:
    """Connections to one registry database, chosen by URL (None = SQLite in `data_dir`)."""

    def __init__(self, url: str | None, data_dir: Path):
        if url and url.startswith(("postgresql://", "postgres://")):
            self.dialect, self.url = "postgresql", url
        elif url and url.startswith("sqlite:///"):
            self.dialect, self.url = "sqlite", url[len("sqlite:///") - 1 :]
        elif url:
            raise ValueError(f"registry_url must be postgresql://... or sqlite:///path, got {url!r}")
        else:
            self.dialect, self.url = "sqlite", str(Path(data_dir) / "registry.db")
        self._local = threading.local()
        self._all: list = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def location(self) -> str:
        """Where the data lives, without credentials."""
        if self.dialect == "sqlite":
            return self.url
        return self.url.split("@")[-1]

    def _connect(self):
        if self.dialect == "sqlite":
            conn = sqlite3.connect(self.url, timeout=60, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=60000")
            return conn
        import psycopg  # NOTE: imported lazily: only PostgreSQL deployments need the driver

        return psycopg.connect(self.url, autocommit=True)

    def _conn(self) -> tuple:
        """This thread's (connection, in-use lock), connected on first use."""
        if self._closed:
            raise RuntimeError("the registry database is closed")
        held = getattr(self._local, "conn", None)
        if held is not None and self.dialect == "postgresql" and (held[0].closed or held[0].broken):
            held = None
        if held is None:
            held = (self._connect(), threading.RLock())  # re-entrant: PostgreSQL nests as savepoints
            self._local.conn = held
            with self._lock:
                self._all.append(held)
        return held

    @contextmanager
    def _tx(self, write: bool) -> Iterator[Tx]:
        conn, in_use = self._conn()
        # NOTE: close() takes this lock before closing: a connection closed mid-statement by another
        # thread is a use-after-free inside the sqlite3 module (a segfault, not an exception)
        with in_use:
            if self._closed:
                raise RuntimeError("the registry database is closed")
            if self.dialect == "postgresql":
                with conn.transaction():
                    if write:
                        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_LOCK_KEY,))
                    yield Tx(conn, self.dialect)
                return
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield Tx(conn, self.dialect)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def read(self):
        """A read transaction (a consistent snapshot)."""
        return self._tx(write=False)

    def write(self):
        """A write transaction holding the registry's write lock until it commits."""
        return self._tx(write=True)

    def migrate(self, migrations: list[tuple[int, dict[str, list[str]]]]) -> int:
        """Apply the migrations newer than the stored schema version; returns the version now."""
        latest = max(v for v, _ in migrations)
        with self.write() as tx:
            tx.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied REAL)"
            )
            row = tx.one("SELECT MAX(version) AS v FROM schema_version")
            current = (row or {}).get("v") or 0
            if current > latest:
                raise RuntimeError(
                    f"the registry at {self.location} has schema version {current}, newer than this "
                    f"steerserve knows ({latest}); upgrade steerserve"
                )
            for version, statements in migrations:
                if version <= current:
                    continue
                for sql in statements.get("all", []) + statements.get(self.dialect, []):
                    tx.execute(sql)
                tx.execute(
                    "INSERT INTO schema_version (version, applied) VALUES (?, ?)", (version, time.time())
                )
        return latest

    def close(self, wait_s: float = 60.0) -> None:
        """Close every thread's connection once its transaction ends; new transactions are refused.
        A connection still busy after `wait_s` is left open (leaked) rather than closed under its user."""
        self._closed = True
        with self._lock:
            held, self._all = self._all, []
        deadline = time.monotonic() + wait_s
        for conn, in_use in held:
            if not in_use.acquire(timeout=max(0.0, deadline - time.monotonic())):
                continue
            try:
                with contextlib.suppress(Exception):
                    conn.close()
            finally:
                in_use.release()
