"""Content-addressed blob stores: safetensors files named by their sha256.

Two stores with one interface (`BlobStore`): `LocalBlobStore`, files under the data directory (or a
volume shared by replicas), and `S3BlobStore` (`blobs_s3.py`), objects in an S3-compatible bucket
with a local read cache. `open_blob_store` picks one from the registry config.

A local blob is written to a temp file (`TempFile`: `<random>.part`, flocked by its writer), hashed and
fsynced (`seal`), and only then renamed to `blobs/<sha[:2]>/<sha>.safetensors` (`publish`) and its
directory fsynced; the registry commits the row that names it afterwards, holding its write lock from the rename to the
commit, so a crash never leaves a row pointing at a missing or partial file. Temp files whose writer
is gone (nobody holds their lock) are removed at the next start.

"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
import time
from pathlib import Path
from typing import Protocol

_SHA = re.compile(r"^[0-9a-f]{64}$")
_UNLOCKABLE_TEMP_AGE_S = 24 * 3600


class TempFile:
    """A temp file its writer holds an exclusive flock on for its whole life.

    NOTE: liveness by lock, not by pid: a container restarted as PID 1 would take a dead writer's
    pid for its own. The file is created as `.new` and locked before it is renamed to `.part`, so
    cleanup never sees an unlocked `.part` of a live writer. The lock follows the inode through
    `publish`'s rename; `close()` removes a file that was not published and drops the lock.
    """

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        name = secrets.token_hex(16)
        fresh = directory / f"{name}.new"
        self._fd: int | None = os.open(fresh, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.path = directory / f"{name}.part"
        os.rename(fresh, self.path)

    def close(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> TempFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def clean_stray_temp(directory: Path) -> list[Path]:
    """Remove temp files no live writer holds locked; returns what was removed."""
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for path in directory.glob("*.part"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            stale = True
        except BlockingIOError:
            stale = False  # a live writer holds it
        except OSError:  # no lock support on this file system: fall back to age
            stale = time.time() - os.fstat(fd).st_mtime > _UNLOCKABLE_TEMP_AGE_S
        try:
            if stale:
                path.unlink(missing_ok=True)
                removed.append(path)
        finally:
            os.close(fd)
    return removed


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStoreError(RuntimeError):
    """The blob store cannot be used as configured or reached; the message says what to change."""


class CorruptBlob(RuntimeError):
    """A stored blob's content does not hash to the sha256 in its name."""


def foreign_store(location: str, owner: str, registry_id: str) -> BlobStoreError:
    """One blob store per registry: another's orphan sweep would delete blobs this registry names."""
    return BlobStoreError(
        f"the blobs in {location} belong to registry {owner}, not to this one ({registry_id}); give this "
        "registry a blob location of its own, or open the registry that owns them (--registry-url / --data-dir)"
    )


def check_sha(sha: str) -> str:
    if not _SHA.match(sha):
        raise ValueError(f"not a sha256 hex digest: {sha!r}")
    return sha


class BlobStore(Protocol):
    """What the registry needs of a blob store. Writing follows `registry.py`'s order: `new_temp`,
    write, `seal` (no lock held), then `publish` under the registry's write lock before the commit.
    `delete` and orphan removal also run under the write lock, so a published blob stays until commit."""

    temp_dir: Path

    @property
    def location(self) -> str:
        """Where the blobs live, for messages (no credentials)."""

    def claim(self, registry_id: str) -> None:
        """Mark the store as this registry's; BlobStoreError when another registry's blobs are there."""

    def new_temp(self) -> TempFile: ...
    def seal(self, temp: Path) -> tuple[str, int]: ...
    def publish(self, temp: Path, sha: str) -> None: ...
    def local_path(self, sha: str) -> Path:
        """A local file holding the blob's bytes (to read, never to write); FileNotFoundError if absent."""

    def exists(self, sha: str) -> bool: ...
    def delete(self, sha: str) -> None: ...
    def list(self) -> list[str]: ...
    def clean_stray_temp(self) -> list[str]: ...


class LocalBlobStore:
    """Blobs as files `<root>/<sha[:2]>/<sha>.safetensors` (a local disk or a volume shared by replicas)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.temp_dir = self.root / "tmp"
        self.temp_dir.mkdir(parents=True, exist_ok=True)

    @property
    def location(self) -> str:
        return str(self.root)

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / f"{check_sha(sha)}.safetensors"

    def local_path(self, sha: str) -> Path:
        path = self.path(sha)
        if not path.is_file():
            raise FileNotFoundError(f"blob {sha} is not in {self.root}")
        return path

    def claim(self, registry_id: str) -> None:
        marker = self.root / "REGISTRY_ID"
        if marker.is_file():
            owner = marker.read_text().strip()
            if owner != registry_id:
                raise foreign_store(self.location, owner, registry_id)
            return
        with self.new_temp() as temp:
            temp.path.write_text(registry_id)
            os.replace(temp.path, marker)

    def new_temp(self) -> TempFile:
        return TempFile(self.temp_dir)

    def seal(self, temp: Path) -> tuple[str, int]:
        """Hash and fsync a fully written temp file: (sha256, size in bytes)."""
        digest, size = hashlib.sha256(), 0
        with open(temp, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
            os.fsync(f.fileno())
        return digest.hexdigest(), size

    def publish(self, temp: Path, sha: str) -> None:
        """Move a sealed temp file to its final name (call with the registry's write lock held)."""
        final = self.path(sha)
        if final.exists():  # same content already stored: complete by construction
            temp.unlink(missing_ok=True)
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, final)
        fsync_dir(final.parent)

    def exists(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def delete(self, sha: str) -> None:
        self.path(sha).unlink(missing_ok=True)

    def list(self) -> list[str]:
        return [p.stem for p in self.root.glob("??/*.safetensors") if _SHA.match(p.stem)]

    def clean_stray_temp(self) -> list[str]:
        return [str(p) for p in clean_stray_temp(self.temp_dir)]


def open_blob_store(cfg) -> BlobStore:
    """The blob store a `steerserve.config.RegistryConfig` names: `blob_url` s3://... or files in data_dir."""
    data_dir = Path(cfg.data_dir)
    if not cfg.blob_url:
        return LocalBlobStore(data_dir / "blobs")
    if not cfg.blob_url.startswith("s3://"):
        raise ValueError(
            f"blob_url must be s3://BUCKET[/PREFIX] (or unset for files in data_dir), got {cfg.blob_url!r}"
        )
    from steerserve.registry.blobs_s3 import S3BlobStore  # NOTE: lazily: boto3 is the optional `s3` extra

    return S3BlobStore(
        cfg.blob_url, data_dir / "blob-cache", cfg.blob_endpoint_url, cache_bytes=cfg.blob_cache_mb << 20
    )
