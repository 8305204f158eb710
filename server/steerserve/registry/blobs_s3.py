"""S3-compatible blob store: objects `<prefix>/<sha256>.safetensors` in a bucket, plus a local read cache.

Writing, in the registry's order (`registry.py`):
1. `seal`: the local temp file is hashed, fsynced and uploaded to its content address (multipart above
   `part_bytes`, streamed from the file), with no lock held: this is the slow part. S3 makes an object
   visible whole or not at all (a PUT, or a completed multipart upload).
2. `publish`, under the registry's write lock: HEAD checks that the object is still there with the right
   size and digest (a delete, or another replica's recovery, may have removed it since `seal`: both run
   under the write lock), uploading it again if not; then the temp file moves into the local cache.
   The row is committed after that. A crash before the commit leaves at most an object no row names,
   which the next `recover()` removes; it also aborts multipart uploads abandoned for a day.

Reading: `local_path(sha)` gives the cached file, or downloads the object into a temp file, checks
that its sha256 is the one in its name (a corrupt or replaced object is refused and never cached) and
renames it into the cache. safetensors then maps the local file, as with the local store. The cache
holds at most `cache_bytes`; least recently used files go first.

Configuration: the endpoint from `endpoint_url`, else boto3's own (AWS_ENDPOINT_URL_S3 /
AWS_ENDPOINT_URL, else AWS); region and credentials from the standard AWS chain (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE, AWS_REGION, instance roles). Nothing here logs
a credential. Errors say what to change: a missing bucket, refused credentials, an unreachable endpoint.
"""

from __future__ import annotations

import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from steerserve.registry.blobs import (
    BlobStoreError,
    CorruptBlob,
    LocalBlobStore,
    TempFile,
    check_sha,
    foreign_store,
)

logger = logging.getLogger(__name__)

_KEY_SHA = re.compile(r"^([0-9a-f]{64})\.safetensors$")
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
           "ExpiredToken", "InvalidClientTokenId", "AuthorizationHeaderMalformed"}  # fmt: skip
_MISSING = {"404", "NoSuchKey", "NotFound"}


class S3BlobStore:
    """Blobs in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, ...), behind `blobs.BlobStore`."""

    def __init__(
        self,
        url: str,
        cache_dir: Path,
        endpoint_url: str | None = None,
        cache_bytes: int = 16 << 30,
        part_bytes: int = 64 << 20,
        stale_upload_age_s: float = 24 * 3600,
    ):
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config as BotoConfig
        except ImportError:
            raise BlobStoreError(
                f"blob_url {url} needs boto3: pip install 'steerserve[s3]' (or boto3)"
            ) from None
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"blob_url must be s3://BUCKET[/PREFIX], got {url!r}")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.cache = LocalBlobStore(Path(cache_dir))
        self.temp_dir = self.cache.temp_dir
        self.cache_bytes = cache_bytes
        self.stale_upload_age_s = stale_upload_age_s
        self._transfer = TransferConfig(
            multipart_threshold=part_bytes, multipart_chunksize=part_bytes, max_concurrency=4
        )
        # NOTE: path-style requests: S3-compatible servers on a plain host:port have no per-bucket DNS names.
        config = BotoConfig(
            connect_timeout=10,
            read_timeout=120,
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path"},
        )
        self._s3 = _session(boto3).client("s3", endpoint_url=endpoint_url, config=config)
        self.endpoint = _without_userinfo(self._s3.meta.endpoint_url)
        with self._errors("open the bucket"):
            self._s3.head_bucket(Bucket=self.bucket)

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self.endpoint}"

    def _key(self, sha: str) -> str:
        name = f"{check_sha(sha)}.safetensors"
        return f"{self.prefix}/{name}" if self.prefix else name

    @property
    def _list_prefix(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    @contextmanager
    def _errors(self, action: str):
        """botocore / boto3 exceptions -> BlobStoreError saying what to change."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        try:
            yield
        except (NoCredentialsError, PartialCredentialsError):
            raise BlobStoreError(
                f"cannot {action} {self.location}: no usable AWS credentials; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            ) from None
        except (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError) as exc:
            raise BlobStoreError(
                f"cannot {action} {self.location}: the S3 endpoint is unreachable ({type(exc).__name__}); "
                "check --blob-endpoint-url (or AWS_ENDPOINT_URL_S3) and that the server is up"
            ) from None
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchBucket",) or (code in _MISSING and action == "open the bucket"):
                raise BlobStoreError(
                    f"cannot {action} {self.location}: bucket {self.bucket!r} does not exist; create it "
                    f"(aws s3 mb s3://{self.bucket}) or fix --blob-url"
                ) from None
            if code in _DENIED:
                raise BlobStoreError(
                    f"cannot {action} {self.location}: S3 refused the credentials ({code}); check "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE and the bucket's policy"
                ) from None
            raise
        except S3UploadFailedError as exc:
            raise BlobStoreError(f"cannot {action} {self.location}: {exc}") from None

    def _is_missing(self, exc: Exception) -> bool:
        from botocore.exceptions import ClientError

        return isinstance(exc, ClientError) and str(exc.response["Error"].get("Code")) in _MISSING

    def _stored(self, sha: str, size: int) -> bool:
        """The object is there, of `size` bytes, recorded with this digest when it was uploaded."""
        try:
            with self._errors("check a blob in"):
                head = self._s3.head_object(Bucket=self.bucket, Key=self._key(sha))
        except Exception as exc:
            if self._is_missing(exc):
                return False
            raise
        return head["ContentLength"] == size and head.get("Metadata", {}).get("sha256") == sha

    def _upload(self, temp: Path, sha: str) -> None:
        with self._errors("upload a blob to"):
            self._s3.upload_file(
                str(temp), self.bucket, self._key(sha), ExtraArgs={"Metadata": {"sha256": sha}},
                Config=self._transfer,
            )  # fmt: skip

    # ---- the BlobStore interface --------------------------------------------------------------

    def claim(self, registry_id: str) -> None:
        key = f"{self._list_prefix}REGISTRY_ID"
        try:
            with self._errors("read the owner of"):
                owner = self._s3.get_object(Bucket=self.bucket, Key=key)["Body"].read().decode().strip()
        except Exception as exc:
            if not self._is_missing(exc):
                raise
            with self._errors("write the owner of"):
                self._s3.put_object(Bucket=self.bucket, Key=key, Body=registry_id.encode())
            return
        if owner != registry_id:
            raise foreign_store(self.location, owner, registry_id)

    def new_temp(self) -> TempFile:
        return self.cache.new_temp()

    def seal(self, temp: Path) -> tuple[str, int]:
        """Hash and fsync the temp file, then upload it unless the same content is already stored."""
        sha, size = self.cache.seal(temp)
        if not self._stored(sha, size):
            self._upload(temp, sha)
        return sha, size

    def publish(self, temp: Path, sha: str) -> None:
        """Under the write lock: make sure the object is (still) there, then cache the local copy."""
        if not self._stored(sha, temp.stat().st_size):
            self._upload(temp, sha)
        self.cache.publish(temp, sha)
        self._trim_cache(keep=sha)

    def local_path(self, sha: str) -> Path:
        path = self.cache.path(sha)
        if path.is_file():
            os.utime(path)  # most recently used
            return path
        with self.cache.new_temp() as temp:
            try:
                with self._errors("download a blob from"):
                    self._s3.download_file(self.bucket, self._key(sha), str(temp.path), Config=self._transfer)
            except Exception as exc:
                if self._is_missing(exc):
                    raise FileNotFoundError(f"blob {sha} is not in {self.location}") from None
                raise
            got, _ = self.cache.seal(temp.path)
            if got != sha:
                raise CorruptBlob(
                    f"blob {sha} in {self.location} is corrupt: its content hashes to {got}; restore the "
                    "object from a backup, or delete the item that uses it and upload it again"
                )
            self.cache.publish(temp.path, sha)
        self._trim_cache(keep=sha)
        return path

    def exists(self, sha: str) -> bool:
        try:
            with self._errors("check a blob in"):
                self._s3.head_object(Bucket=self.bucket, Key=self._key(sha))
        except Exception as exc:
            if self._is_missing(exc):
                return False
            raise
        return True

    def delete(self, sha: str) -> None:
        with self._errors("delete a blob from"):
            self._s3.delete_object(Bucket=self.bucket, Key=self._key(sha))
        self.cache.delete(sha)

    def list(self) -> list[str]:
        shas = []
        with self._errors("list the blobs in"):
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._list_prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    m = _KEY_SHA.match(obj["Key"][len(self._list_prefix) :])
                    if m:
                        shas.append(m.group(1))
        return shas

    def clean_stray_temp(self) -> list[str]:
        """Local temp files of dead writers, and multipart uploads of ours abandoned `stale_upload_age_s` ago."""
        removed = self.cache.clean_stray_temp()
        cutoff = time.time() - self.stale_upload_age_s
        try:
            with self._errors("abort the unfinished uploads in"):
                pages = self._s3.get_paginator("list_multipart_uploads").paginate(
                    Bucket=self.bucket, Prefix=self._list_prefix
                )
                for page in pages:
                    for up in page.get("Uploads", []):
                        if up["Initiated"].timestamp() <= cutoff:
                            self._s3.abort_multipart_upload(
                                Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
                            )
                            removed.append(f"s3://{self.bucket}/{up['Key']} (unfinished upload)")
        except BlobStoreError as exc:  # NOTE: a policy may allow objects but not this; nothing depends on it
            logger.warning("%s; a bucket lifecycle rule (AbortIncompleteMultipartUpload) does the same", exc)
        return removed

    def _trim_cache(self, keep: str) -> None:
        """Remove least recently used cache files until the cache fits `cache_bytes` (never `keep`)."""
        files = []
        for path in self.cache.root.glob("??/*.safetensors"):
            try:
                st = path.stat()
            except FileNotFoundError:  # removed by another thread meanwhile
                continue
            files.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.cache_bytes:
                break
            if path.stem != keep:
                path.unlink(missing_ok=True)
                total -= size


_loader: list = []  # botocore's parsed service descriptions, shared by every store of this process


def _session(boto3):
    """A fresh session (credentials resolved from the environment now) sharing parsed API models."""
    import botocore.session

    core = botocore.session.Session()
    if _loader:
        core.register_component("data_loader", _loader[0])  # NOTE: saves ~0.2-0.6 s of JSON parsing
    else:
        _loader.append(core.get_component("data_loader"))
    return boto3.session.Session(botocore_session=core)


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl()
