"""The S3 blob store against a real S3-compatible HTTP server (moto's, on loopback): what the shared
registry suite cannot see. Objects are inspected with boto3 directly, not through the store under test.
(The whole registry suite also runs on S3: the `s3` case of the `registry_config` fixture; a server
restart with --blob-url is in test_restart.py.)"""

from __future__ import annotations

import hashlib
import json

import boto3
import httpx
import pytest

from steerserve.cli import main as steerserve_main
from steerserve.config import RegistryConfig
from steerserve.registry import Registry, SAEWeights
from steerserve.registry.blobs import BlobStoreError, CorruptBlob
from steerserve.registry.blobs_s3 import S3BlobStore
from steerserve.registry.errors import Conflict
from steerserve.types.sites import Site
from tests.registry.conftest import _free_port
from tests.registry.helpers import rand_state, saelens_cfg, write_saelens

pytestmark = pytest.mark.s3
PREFIX = "team/blobs"


def sae(seed: int = 0, d_in: int = 16, d_sae: int = 64) -> SAEWeights:
    state = rand_state("relu", d_in=d_in, d_sae=d_sae, seed=seed)
    return SAEWeights(**state, architecture="relu", site=Site(1))


@pytest.fixture
def s3(s3_server):
    return boto3.client("s3", endpoint_url=s3_server)


@pytest.fixture
def cfg(tmp_path, s3_server, s3_bucket) -> RegistryConfig:
    return RegistryConfig(
        data_dir=str(tmp_path / "data"),
        registry_url=None,
        blob_url=f"s3://{s3_bucket}/{PREFIX}",
        blob_endpoint_url=s3_server,
    )


def keys(s3, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))


def blob_keys(s3, bucket: str) -> list[str]:
    return [k for k in keys(s3, bucket) if k.endswith(".safetensors")]


def test_objects_are_content_addressed_shared_and_deleted(cfg, s3, s3_bucket):
    reg = Registry.from_config(cfg)
    try:
        a = reg.add_sae(sae(), sae_id="a")
        b = reg.add_sae(sae(), sae_id="b")  # same content: one object
        key = f"{PREFIX}/{a.blob_sha256}.safetensors"
        assert a.blob_sha256 == b.blob_sha256 and blob_keys(s3, s3_bucket) == [key]
        obj = s3.get_object(Bucket=s3_bucket, Key=key)
        body = obj["Body"].read()
        assert hashlib.sha256(body).hexdigest() == a.blob_sha256 and len(body) == a.size_bytes
        assert obj["Metadata"]["sha256"] == a.blob_sha256
        cached = reg.blobs.cache.path(a.blob_sha256)
        assert cached.read_bytes() == body  # the writer's copy went into the read cache
        reg.delete_sae("a")
        assert blob_keys(s3, s3_bucket) == [key]  # b still names it
        reg.delete_sae("b")
        assert blob_keys(s3, s3_bucket) == [] and not cached.exists()
    finally:
        reg.close()


def test_publish_uploads_again_what_vanished_after_sealing_and_a_failed_insert_leaves_no_object(
    cfg, s3, s3_bucket
):
    reg = Registry.from_config(cfg)
    try:
        store = reg.blobs
        with store.new_temp() as temp:
            temp.path.write_bytes(b"sealed, then swept by another replica's recovery")
            sha, size = store.seal(temp.path)
            s3.delete_object(Bucket=s3_bucket, Key=f"{PREFIX}/{sha}.safetensors")
            store.publish(temp.path, sha)  # under the write lock in the registry: checks, uploads again
        assert s3.head_object(Bucket=s3_bucket, Key=f"{PREFIX}/{sha}.safetensors")["ContentLength"] == size
        store.delete(sha)
        reg.add_sae(sae(), sae_id="taken")
        with pytest.raises(Conflict):
            reg.add_sae(sae(seed=1), sae_id="taken")  # uploaded while sealing, then the insert failed
        assert blob_keys(s3, s3_bucket) == [f"{PREFIX}/{reg.get_sae('taken').blob_sha256}.safetensors"]
    finally:
        reg.close()


def test_large_blob_goes_up_in_parts_and_comes_back_verified(cfg, s3, s3_bucket, tmp_path):
    store = S3BlobStore(cfg.blob_url, tmp_path / "cache", cfg.blob_endpoint_url, part_bytes=5 << 20)
    reg = Registry(cfg.data_dir, None, store)
    try:
        big = sae(d_in=256, d_sae=6144)  # W_enc + W_dec: 12.6 MB, three 5 MiB parts
        rec = reg.add_sae(big, sae_id="big")
        head = s3.head_object(Bucket=s3_bucket, Key=f"{PREFIX}/{rec.blob_sha256}.safetensors")
        assert head["ETag"].strip('"').endswith("-3") and head["ContentLength"] == rec.size_bytes
        store.cache.path(rec.blob_sha256).unlink()  # a cold cache: the read downloads
        _, got = reg.load_sae("big")
        assert got.W_dec.equal(big.W_dec) and got.W_enc.equal(big.W_enc)
        assert store.cache.path(rec.blob_sha256).stat().st_size == rec.size_bytes
    finally:
        reg.close()


def test_interrupted_put_leaves_no_visible_object_and_is_aborted_at_start(cfg, s3, s3_bucket):
    """What a writer killed in the middle of a multipart upload leaves: parts, no object, no row."""
    reg = Registry.from_config(cfg)
    reg.add_sae(sae(), sae_id="kept")
    reg.close()
    sha = "ab" * 32
    key = f"{PREFIX}/{sha}.safetensors"
    upload = s3.create_multipart_upload(Bucket=s3_bucket, Key=key)["UploadId"]
    s3.upload_part(Bucket=s3_bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"\0" * (5 << 20))
    store = S3BlobStore(
        cfg.blob_url, cfg.data_dir + "/blob-cache", cfg.blob_endpoint_url, stale_upload_age_s=0
    )
    assert not store.exists(sha) and sha not in store.list() and key not in keys(s3, s3_bucket)
    reg = Registry(cfg.data_dir, None, store)  # a restart: recovery aborts the abandoned upload
    try:
        assert [r.id for r in reg.list_saes()] == ["kept"] and reg.dangling() == []
        assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    finally:
        reg.close()


def test_corrupted_object_is_refused_on_read_and_never_cached(cfg, s3, s3_bucket):
    reg = Registry.from_config(cfg)
    try:
        rec = reg.add_sae(sae(), sae_id="s")
        key = f"{PREFIX}/{rec.blob_sha256}.safetensors"
        good = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        rotten = bytearray(good)
        rotten[-5] ^= 0x40  # one flipped bit in the tensor data; size and metadata unchanged
        s3.put_object(Bucket=s3_bucket, Key=key, Body=bytes(rotten), Metadata={"sha256": rec.blob_sha256})
        cached = reg.blobs.cache.path(rec.blob_sha256)
        cached.unlink()
        with pytest.raises(CorruptBlob, match="corrupt.*restore the object"):
            reg.load_sae("s")
        assert not cached.exists() and list(reg.blobs.temp_dir.iterdir()) == []
        s3.put_object(Bucket=s3_bucket, Key=key, Body=good, Metadata={"sha256": rec.blob_sha256})
        assert reg.load_sae("s")[1].W_dec.equal(sae().W_dec)
    finally:
        reg.close()


def test_a_blob_prefix_belongs_to_one_registry(cfg, s3, s3_bucket, tmp_path):
    """Another registry (its own SQLite) on the same prefix would sweep these blobs as orphans: refused."""
    first = Registry.from_config(cfg)
    first.add_sae(sae(), sae_id="s")
    first.close()
    other = RegistryConfig(**{**cfg.__dict__, "data_dir": str(tmp_path / "other")})
    with pytest.raises(BlobStoreError, match="belong to registry"):
        Registry.from_config(other)
    assert len(blob_keys(s3, s3_bucket)) == 1
    elsewhere = Registry.from_config(
        RegistryConfig(**{**other.__dict__, "blob_url": cfg.blob_url + "-other"})
    )
    elsewhere.close()
    again = Registry.from_config(cfg)
    try:
        assert again.load_sae("s")[1].d_sae == 64
    finally:
        again.close()


def test_errors_say_what_to_do(cfg, s3_server, monkeypatch, capsys):
    missing = RegistryConfig(**{**cfg.__dict__, "blob_url": "s3://no-such-bucket/x"})
    with pytest.raises(BlobStoreError, match=r"'no-such-bucket' does not exist; create it"):
        Registry.from_config(missing)
    dead = RegistryConfig(**{**cfg.__dict__, "blob_endpoint_url": f"http://127.0.0.1:{_free_port()}"})
    with pytest.raises(BlobStoreError, match="unreachable.*--blob-endpoint-url"):
        Registry.from_config(dead)
    httpx.post(f"{s3_server}/moto-api/reset-auth", content=b"0").raise_for_status()  # moto checks keys now
    try:
        with pytest.raises(BlobStoreError, match="refused the credentials") as refused:
            Registry.from_config(cfg)
    finally:
        httpx.post(f"{s3_server}/moto-api/reset-auth", content=b"inf").raise_for_status()
    assert "test-secret-key" not in str(refused.value)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(BlobStoreError, match="no usable AWS credentials; set AWS_ACCESS_KEY_ID"):
        Registry.from_config(cfg)
    # the operator's command line says the same, exit status 2
    argv = ["registry", "list", "--data-dir", cfg.data_dir, "--blob-url", "s3://no-such-bucket/x",
            "--blob-endpoint-url", s3_server]  # fmt: skip
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-key")
    assert steerserve_main(argv) == 2
    assert "does not exist; create it" in capsys.readouterr().err


def test_operator_commands_with_blob_url(cfg, s3, s3_bucket, tmp_path, capsys):
    """`steerserve registry import|list|rm --blob-url ...`: the same code path, blobs in the bucket."""
    write_saelens(tmp_path / "lens", saelens_cfg("standard", 6), rand_state("standard"))
    where = [
        "--data-dir",
        cfg.data_dir,
        "--blob-url",
        cfg.blob_url,
        "--blob-endpoint-url",
        cfg.blob_endpoint_url,
    ]
    assert steerserve_main(["registry", "import", str(tmp_path / "lens"), "--id", "lens", *where]) == 0
    sha = json.loads(capsys.readouterr().out)["sha256"]
    assert blob_keys(s3, s3_bucket) == [f"{PREFIX}/{sha}.safetensors"]
    assert steerserve_main(["registry", "list", "--json", *where]) == 0
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == ["lens"]
    assert steerserve_main(["registry", "rm", "sae", "lens", *where]) == 0
    assert blob_keys(s3, s3_bucket) == []


def test_a_vanished_bucket_is_a_503_in_the_openai_shape_and_stores_nothing(tmp_path, s3_server, s3_bucket):
    """The S3 store failing under a running server is an outage (503 + Retry-After), not a bug (500)."""
    from tests.registry.app_process import ThreadServer, make_app
    from tests.registry.test_routes import upload

    cfg = RegistryConfig(
        data_dir=str(tmp_path), blob_url=f"s3://{s3_bucket}/blobs", blob_endpoint_url=s3_server
    )
    with ThreadServer(make_app(tmp_path, cfg)) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        s3 = boto3.client("s3", endpoint_url=s3_server)
        for obj in s3.list_objects_v2(Bucket=s3_bucket).get("Contents", []):
            s3.delete_object(Bucket=s3_bucket, Key=obj["Key"])
        s3.delete_bucket(Bucket=s3_bucket)
        r = upload(c, sae_id="after-outage")
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "5"
        err = r.json()["error"]
        assert err["code"] == "blob_store_unavailable" and "does not exist" in err["message"]
        assert c.get("/v1/saes/after-outage").status_code == 404
