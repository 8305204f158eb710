"""Registry HTTP routes through a real uvicorn server on a loopback port (app_process.ThreadServer).

Bad input gets the right status, the OpenAI error shape, and leaves nothing stored (no row, no blob,
no spooled upload)."""

from __future__ import annotations

import base64
import json
import pickle
import socket

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save

from steerserve.config import RegistryConfig
from steerserve.types.sites import Site
from tests.registry.app_process import ThreadServer, make_app
from tests.registry.helpers import D_IN, rand_state, saelens_cfg, write_gguf

CFG = saelens_cfg("jumprelu", 6)
GOOD = save(rand_state("jumprelu"))


@pytest.fixture
def server(data_dir, registry_config):
    with ThreadServer(make_app(data_dir, registry_config)) as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture
def local_server(data_dir):
    """SQLite only: for input checks, which do not depend on the database."""
    with ThreadServer(make_app(data_dir)) as s:
        yield s


@pytest.fixture
def local_client(local_server):
    with httpx.Client(base_url=local_server.url, timeout=30) as c:
        yield c


def upload(client, cfg=CFG, weights=GOOD, sae_id=None, filename="sae_weights.safetensors", **kw):
    files = {
        "cfg": ("cfg.json", cfg if isinstance(cfg, bytes) else json.dumps(cfg)),
        "weights": (filename, weights),
    }
    return client.post("/v1/saes", files=files, data={"id": sae_id} if sae_id else {}, **kw)


def error(resp: httpx.Response, status: int, param: str | None = None, match: str = "") -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and match.lower() in err["message"].lower(), err
    if param is not None:
        assert err["param"] == param, err
    return err


def nothing_stored(server) -> None:
    reg = server.app.state.registry
    assert reg.list_saes() == [] and reg.list_vectors() == [] and reg.list_variants() == []
    assert reg.blobs.list() == [] and list(reg.blobs.temp_dir.iterdir()) == []
    assert not reg.uploads_dir.exists() or list(reg.uploads_dir.iterdir()) == []


def test_sae_routes(client, server):
    resp = upload(client, sae_id="res2")
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["id"] == "res2" and body["site"] == "blocks.2.hook_resid_post" and body["model"] == "toy"
    assert body["d_in"] == D_IN and body["architecture"] == "jumprelu"
    assert client.get("/v1/saes").json()["data"][0]["id"] == "res2"
    assert client.get("/v1/saes/res2").json()["features_annotated"] == 0
    error(upload(client, sae_id="res2"), 409, "id")
    error(client.get("/v1/saes/nope"), 404, match="no SAE")
    npz = server.app.state.registry.data_dir.parent / "params.npz"
    np.savez(npz, **{k: v.numpy() for k, v in rand_state("jumprelu").items()})
    cfg = saelens_cfg("jumprelu", 6, apply_b_dec_to_input=False)
    assert (
        upload(client, cfg=cfg, weights=npz.read_bytes(), filename="params.npz", sae_id="gs").status_code
        == 201
    )
    assert client.delete("/v1/saes/res2").json() == {"id": "res2", "object": "sae", "deleted": True}
    assert client.delete("/v1/saes/gs").status_code == 200
    error(client.get("/v1/saes/res2"), 404)
    nothing_stored(server)


def _nan_weights() -> bytes:
    sd = rand_state("jumprelu")
    sd["W_dec"][3, 4] = float("nan")
    return save(sd)


BAD_UPLOADS = {
    "pickle renamed .safetensors": (
        {"weights": pickle.dumps(rand_state("jumprelu"))},
        400,
        "not a safetensors",
    ),
    "torch zip checkpoint": ({"weights": b"PK\x03\x04" + b"\0" * 64}, 400, "npz"),
    "truncated safetensors": ({"weights": GOOD[:-64]}, 400, "truncated"),
    "NaN weights": ({"weights": _nan_weights()}, 400, "non-finite"),
    "wrong shapes": ({"cfg": saelens_cfg("jumprelu", 6, d_sae=65)}, 400, "shape"),
    "d_in of another model": (
        {"cfg": saelens_cfg("standard", 6, d_in=8), "weights": save(rand_state("standard", d_in=8))},
        400,
        "d_model",
    ),
    "site not in the model": (
        {"cfg": saelens_cfg("jumprelu", 6, hook="blocks.9.hook_resid_post")},
        400,
        "layers",
    ),
    "unsupported hook": ({"cfg": saelens_cfg("jumprelu", 6, hook="blocks.1.mlp.hook_post")}, 400, "hook"),
    "../ in the id": ({"sae_id": "../escape"}, 400, "id"),
    "cfg not JSON": ({"cfg": b"{nope"}, 400, "json"),
    "over the size limit": ({"weights": b"\0" * (3 << 19)}, 413, "limit"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_sae_uploads(local_client, local_server, case):
    kwargs, status, match = BAD_UPLOADS[case]
    error(upload(local_client, **kwargs), status, match=match)
    nothing_stored(local_server)


def test_streamed_upload_over_the_limit_and_malformed_bodies(local_client, local_server):
    client, server = local_client, local_server
    boundary = "b0undary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="cfg"; filename="cfg.json"\r\n\r\n'
            f"{json.dumps(CFG)}\r\n--{boundary}\r\n"
            'Content-Disposition: form-data; name="weights"; filename="w.safetensors"\r\n\r\n').encode()  # fmt: skip

    def chunks():  # no Content-Length: chunked transfer, the limit is found while streaming
        yield head
        for _ in range(24):
            yield b"\1" * (64 << 10)

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    error(client.post("/v1/saes", content=chunks(), headers=headers), 413, "body")
    error(client.post("/v1/saes", content=head, headers=headers), 400, match="closing boundary")
    error(client.post("/v1/saes", json={"cfg": CFG}), 400, match="multipart")
    error(client.post("/v1/saes", files={"cfg": ("cfg.json", json.dumps(CFG))}), 400, "weights")
    error(client.post("/v1/vectors", json={"id": "big", "layer": 1, "vector": [0.5] * 300_000}), 413)
    nothing_stored(server)


def test_vector_routes(client, server, tmp_path):
    vec = np.linspace(-1, 1, D_IN, dtype=np.float32)
    r = client.post("/v1/vectors", json={"id": "v1", "layer": 1, "vector": vec.tolist()})
    assert r.status_code == 201 and r.json()["site"] == "blocks.1.hook_resid_post", r.text
    b64 = base64.b64encode(vec.tobytes()).decode()
    r = client.post("/v1/vectors", json={"id": "v2", "site": "blocks.0.hook_resid_pre", "vector": b64})
    assert r.status_code == 201 and r.json()["hook"] == "resid_pre"
    gguf = write_gguf(tmp_path / "cv.gguf", {f"direction.{i}": vec * i for i in (1, 2, 3)}).read_bytes()
    r = client.post("/v1/vectors", files={"vector": ("cv.gguf", gguf)}, data={"id": "cv"})
    assert r.status_code == 201 and [s["layer"] for s in r.json()["sites"]] == [1, 2, 3], r.text
    st = save({"v": torch.from_numpy(vec)})
    r = client.post("/v1/vectors", files={"vector": ("v.safetensors", st)}, data={"id": "v3", "layer": "2"})
    assert r.status_code == 201 and r.json()["layer"] == 2
    assert [v["id"] for v in client.get("/v1/vectors").json()["data"]] == ["cv", "v1", "v2", "v3"]
    assert client.get("/v1/vectors/cv").json()["d"] == D_IN
    error(client.post("/v1/vectors", json={"id": "v1", "layer": 1, "vector": vec.tolist()}), 409, "id")
    error(client.post("/v1/vectors", json={"id": "s", "layer": 1, "vector": [1.0, 2.0]}), 400, "d_in")
    error(client.post("/v1/vectors", json={"id": "f", "layer": 9, "vector": vec.tolist()}), 400, "site")
    error(client.post("/v1/vectors", json={"id": "b", "layer": 1, "site": 1, "vector": vec.tolist()}), 400)
    error(client.post("/v1/vectors", json={"id": "../x", "layer": 1, "vector": vec.tolist()}), 400, "id")
    error(client.post("/v1/vectors", content=b"{oops", headers={"content-type": "application/json"}), 400)
    bad_magic = b"GGUX" + gguf[4:]
    error(
        client.post("/v1/vectors", files={"vector": ("cv.gguf", bad_magic)}, data={"id": "m"}),
        400,
        match="magic",
    )
    for vid in ("cv", "v1", "v2", "v3"):
        assert client.delete(f"/v1/vectors/{vid}").status_code == 200
    error(client.get("/v1/vectors/v1"), 404)
    error(client.delete("/v1/vectors/v1"), 404)
    nothing_stored(server)


def test_feature_routes(client):
    assert upload(client, sae_id="s").status_code == 201
    r = client.put("/v1/saes/s/features", json=[{"index": 2, "label": "cold", "max_activation": 3.5}])
    assert r.json() == {"sae": "s", "object": "features", "updated": 1}
    export = [{"modelId": "toy", "layer": "2-res", "index": "5", "description": "cold weather and snow"},
              {"modelId": "toy", "layer": "2-res", "index": "9", "description": "heat"}]  # fmt: skip
    jsonl = "\n".join(json.dumps(e) for e in export)
    assert client.put("/v1/saes/s/features", content=jsonl).json()["updated"] == 2
    f = client.get("/v1/saes/s/features/2").json()
    assert (f["label"], f["max_activation"], f["index"], f["sae"]) == (
        "cold",
        3.5,
        2,
        "s",
    ) and "top_logits" not in f
    assert client.get("/v1/saes/s/features/7").json()["label"] is None
    hits = client.get("/v1/features/search", params={"q": "cold", "sae": "s"}).json()["data"]
    assert [(h["index"], h["label"]) for h in hits] == [(2, "cold"), (5, "cold weather and snow")]
    assert hits[0]["score"] > hits[1]["score"]
    error(client.get("/v1/saes/s/features/64"), 404, "index")
    error(client.get("/v1/saes/zz/features/1"), 404)
    error(client.put("/v1/saes/s/features", json=[{"index": 64, "label": "x"}]), 400, "features[0].index")
    error(client.put("/v1/saes/zz/features", json=[{"index": 1}]), 404)
    error(client.get("/v1/features/search", params={"q": "cold", "limit": 0}), 400, "limit")
    error(client.get("/v1/features/search"), 400, "q")
    error(client.get("/v1/saes/s/features/abc"), 400, "index")


def test_variant_routes(client, server):
    spec = {"id": "wintry", "steering": [{"feature": {"sae": "s", "index": 2}, "mode": "clamp", "value": 4.0,
            "positions": "generated"}], "feature_logit_bias": [{"feature": {"sae": "s", "index": 2}, "strength": 1.5}]}  # fmt: skip
    r = client.post("/v1/variants", json=spec)
    assert r.status_code == 201 and r.json()["steering"] == spec["steering"]
    assert client.get("/v1/variants/wintry").json()["feature_logit_bias"] == spec["feature_logit_bias"]
    assert [v["id"] for v in client.get("/v1/variants").json()["data"]] == ["wintry"]
    error(client.post("/v1/variants", json=spec), 409, "id")
    bad = {"id": "x", "steering": [{"feature": {"sae": "s", "index": 2}, "mode": "explode"}]}
    error(client.post("/v1/variants", json=bad), 400, "steering[0].mode")
    error(client.post("/v1/variants", json={"id": "y", "steering": [{"vector": "v", "mode": "add", "strength": "x"}]}),
          400, "steering[0].strength")  # fmt: skip
    error(client.post("/v1/variants", json={"id": "z"}), 400)
    assert client.delete("/v1/variants/wintry").status_code == 200
    error(client.get("/v1/variants/wintry"), 404)
    nothing_stored(server)


def test_auth(data_dir):
    app = make_app(data_dir, api_keys=("user-key",), admin_keys=("admin-key",))
    spec = {"id": "v", "steering": [{"vector": "x", "mode": "project_out"}]}
    with ThreadServer(app) as s, httpx.Client(base_url=s.url) as c:
        error(c.post("/v1/variants", json=spec), 401)
        error(c.post("/v1/variants", json=spec, headers={"Authorization": "Bearer user-key"}), 403)
        error(c.post("/v1/variants", json=spec, headers={"Authorization": "Bearer wrong"}), 401)
        error(upload(c, headers={"Authorization": "Bearer user-key"}), 403)
        assert (
            c.post("/v1/variants", json=spec, headers={"Authorization": "Bearer admin-key"}).status_code
            == 201
        )
        error(c.get("/v1/variants"), 401)
        assert c.get("/v1/variants", headers={"Authorization": "Bearer user-key"}).status_code == 200
        error(c.delete("/v1/variants/v", headers={"Authorization": "Bearer user-key"}), 403)


def test_uploads_wait_for_the_model(data_dir):
    app = make_app(data_dir)
    del app.state.model_info  # as in the real app before its lifespan has loaded the model
    with ThreadServer(app) as s, httpx.Client(base_url=s.url) as c:
        resp = upload(c)
        error(resp, 503, match="loading")
        assert resp.headers["retry-after"] == "5"
        error(c.post("/v1/vectors", json={"id": "v", "layer": 1, "vector": [1.0] * D_IN}), 503)
        assert c.get("/v1/saes").json()["data"] == []


def test_a_2gb_upload_is_refused_at_the_default_limit_without_being_read(data_dir):
    """The default max_upload_mb (2048) and a client announcing 2 GiB + 32 MiB: 413 after a few MB sent,
    nothing spooled. (The streamed, undeclared case is in test_streamed_upload_over_the_limit...)"""
    limit_mb = RegistryConfig().max_upload_mb
    with ThreadServer(make_app(data_dir, max_upload_mb=limit_mb)) as s:
        declared = (limit_mb << 20) + (32 << 20)
        head = (f"POST /v1/saes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {declared}\r\n"
                "Content-Type: multipart/form-data; boundary=xyz\r\n\r\n").encode()  # fmt: skip
        with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
            sock.sendall(head + b"--xyz\r\n" + b"\0" * (4 << 20))
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        status, _, body = reply.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 413"), reply[:300]
        assert b"upload limit of 2147483648 bytes" in body
        nothing_stored(s)


def test_upload_vector_stats(local_client, local_server):
    """`PUT /v1/vectors/{id}/stats`: the projection samples a vector's `project_out` with `"to": "resample"`
    draws from; bad input is a 400 naming the field and stores nothing."""
    client = local_client
    reg = local_server.app.state.registry
    vec = np.random.default_rng(0).standard_normal(D_IN).tolist()
    assert client.post("/v1/vectors", json={"id": "one", "layer": 1, "vector": vec}).status_code == 201
    r = client.put("/v1/vectors/one/stats", json={"projection_sample": [2.5, -1.0, 0.25]})
    assert r.status_code == 200, r.text
    assert r.json()["projection_sample_size"] == 3
    assert reg.get_vector_stats("one") == {Site(1, "resid_post"): (-1.0, 0.25, 2.5)}
    body = {"sites": [{"site": "blocks.1.hook_resid_post", "projection_sample": [0.5, 1.5]}]}
    assert client.put("/v1/vectors/one/stats", json=body).status_code == 200
    assert reg.get_vector_stats("one") == {Site(1, "resid_post"): (0.5, 1.5)}

    before = reg.get_vector_stats("one")
    error(
        client.put("/v1/vectors/one/stats", json={"projection_sample": [1.0, "x"]}), 400, "projection_sample"
    )
    error(client.put("/v1/vectors/one/stats", json={"projection_sample": []}), 400, "projection_sample")
    error(client.put("/v1/vectors/one/stats", json={"sites": []}), 400, "sites")
    bad_site = {"sites": [{"site": "blocks.0.hook_resid_pre", "projection_sample": [1.0]}]}
    error(client.put("/v1/vectors/one/stats", json=bad_site), 400, "site")
    nan = {"sites": [{"site": 1, "projection_sample": [1e39]}]}
    error(client.put("/v1/vectors/one/stats", json=nan), 400, "sites[0].projection_sample")
    error(client.put("/v1/vectors/nope/stats", json={"projection_sample": [1.0]}), 404)
    assert reg.get_vector_stats("one") == before  # nothing a refused call carried was stored
