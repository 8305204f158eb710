"""Content-addressed blob store: safetensors files named by their sha256.

A blob is written to a temp file (`TempFile`: `<random>.part`, flocked by its writer), hashed and
fsynced (`seal`), and only then renamed to `blobs/<sha[:2]>/<sha>.safetensors` (`publish`) and its
directory fsynced; the registry commits the row that names it afterwards, holding its write lock from the rename to the
commit, so a crash never leaves a row pointing at a missing or partial file. Temp files whose writer
is gone (nobody holds their lock) are removed at the next start.

`S3BlobStore` is an interface stub only: it raises on construction (see its docstring).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
import time
from pathlib import Path

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


class LocalBlobStore:
    """Blobs as files under `<root>/blobs` (a local disk or a volume shared by replicas)."""

    def __init__(self, root: Path):
        self.root = Path(root) / "blobs"
        self.temp_dir = self.root / "tmp"
        self.temp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        if not _SHA.match(sha):
            raise ValueError(f"not a sha256 hex digest: {sha!r}")
        return self.root / sha[:2] / f"{sha}.safetensors"

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

    def clean_stray_temp(self) -> list[Path]:
        return clean_stray_temp(self.temp_dir)


class S3BlobStore:
    """NOT IMPLEMENTED: placeholder for an S3-compatible bucket behind the LocalBlobStore interface.

    Multi-replica deployments share blobs through a shared volume (the data directory) for now.
    """

    def __init__(self, url: str):
        raise NotImplementedError(
            f"S3-compatible blob storage ({url}) is not implemented; use a data directory on a shared volume"
        )
