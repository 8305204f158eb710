"""Content-addressed blob store: safetensors files named by their sha256.

A blob is written to a temp file (name: `<host>-<pid>-<random>.part`), hashed and fsynced (`seal`),
and only then renamed to `blobs/<sha[:2]>/<sha>.safetensors` (`publish`) and its directory fsynced;
the registry commits the row that names it afterwards, holding its write lock from the rename to the
commit, so a crash never leaves a row pointing at a missing or partial file. Temp files whose writer
is gone (same host, dead pid; or older than a day from another host) are removed at the next start.

`S3BlobStore` is an interface stub only: it raises on construction (see its docstring).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import time
from pathlib import Path

_TEMP = re.compile(r"^(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{16}\.part$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_FOREIGN_TEMP_AGE_S = 24 * 3600


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def new_temp_path(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{_host()}-{os.getpid()}-{secrets.token_hex(8)}.part"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stray_temp(directory: Path) -> list[Path]:
    """Remove temp files whose writer is gone; returns what was removed."""
    removed = []
    if not directory.is_dir():
        return removed
    host = _host()
    for path in directory.iterdir():
        m = _TEMP.match(path.name)
        if not m:
            continue
        if m["host"] == host:
            stale = int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"]))
        else:
            stale = time.time() - path.stat().st_mtime > _FOREIGN_TEMP_AGE_S
        if stale:
            path.unlink(missing_ok=True)
            removed.append(path)
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

    def new_temp(self) -> Path:
        return new_temp_path(self.temp_dir)

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
