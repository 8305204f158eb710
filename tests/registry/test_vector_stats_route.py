"""`PUT /v1/vectors/{id}/stats`: uploading the projection samples a vector's `project_out` with
`"to": "resample"` draws from, through a real server; bad input is a 400 naming the field and stores
nothing."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from steerserve.types.sites import Site
from tests.registry.app_process import ThreadServer, make_app
from tests.registry.helpers import D_IN
from tests.registry.test_routes import error


@pytest.fixture
def local_server(data_dir):
    with ThreadServer(make_app(data_dir)) as s:
        yield s


@pytest.fixture
def client(local_server):
    with httpx.Client(base_url=local_server.url, timeout=30) as c:
        yield c


def test_upload_vector_stats(client, local_server):
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
