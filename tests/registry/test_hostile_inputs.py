"""Hostile input on the registry routes (issue 18, section 3): each is a 4xx in the OpenAI shape naming
the parameter, never a 500, and the server stays up.

The classes: JSON nested past any real document (RecursionError before), text that passes
`str.isdigit()` but not `int()` ("²") in query and form fields, integers beyond int64 (SQLite
OverflowError before), npz members whose npy header claims a shape their data does not hold
(MemoryError before), malformed Neuronpedia `explanations`. Plus the npz reader's fidelity on what
numpy itself writes (Fortran order, big-endian), checked against numpy's own loader.
"""

from __future__ import annotations

import io
import json
import zipfile

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save

from tests.registry.app_process import ThreadServer, make_app
from tests.registry.helpers import D_IN, D_SAE, rand_state, saelens_cfg, write_gguf

CFG = saelens_cfg("jumprelu", 6, apply_b_dec_to_input=False)
DEEP = "[" * 100_000 + "]" * 100_000
VEC = np.linspace(-1, 1, D_IN, dtype=np.float32).tolist()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """SQLite registry server with SAE `s` (jumprelu, d_sae 64) and two labelled features."""
    with ThreadServer(make_app(tmp_path_factory.mktemp("data"), max_upload_mb=8)) as s:
        with httpx.Client(base_url=s.url) as c:
            files = {
                "cfg": ("cfg.json", json.dumps(CFG)),
                "weights": ("w.safetensors", save(rand_state("jumprelu"))),
            }
            assert c.post("/v1/saes", files=files, data={"id": "s"}).status_code == 201
            feats = [{"index": 2, "label": "cold"}, {"index": 3, "label": "snow"}]
            assert c.put("/v1/saes/s/features", json=feats).status_code == 200
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60, headers={"Connection": "close"}) as c:
        yield c


def refused(r: httpx.Response, param: str | None, status: int | None = None) -> None:
    assert 400 <= r.status_code < 500 and (status is None or r.status_code == status), r.text[:300]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["param"] == param, err


SEARCH = "/v1/features/search"
READS = {
    "feature index beyond int64": (f"/v1/saes/s/features/{2**70}", {}, "index", 404),
    "feature index of 5000 digits": ("/v1/saes/s/features/" + "9" * 5000, {}, "index", None),
    "feature index '²'": ("/v1/saes/s/features/²", {}, "index", 400),
    "feature index -1": ("/v1/saes/s/features/-1", {}, "index", 404),
    "search site '²'": (SEARCH, {"q": "cold", "site": "²"}, "site", 400),
    "search site '٣' (an Arabic-Indic digit int() reads)": (SEARCH, {"q": "cold", "site": "٣"}, "site", 400),
    "search site beyond int64": (SEARCH, {"q": "cold", "site": "9" * 25}, "site", 400),
    "search hook at a layer beyond int64": (
        SEARCH, {"q": "cold", "site": f"blocks.{2**70}.hook_resid_post"}, "site", 400),
    "search hook with a 5000-digit layer": (
        SEARCH, {"q": "cold", "site": "blocks." + "9" * 5000 + ".hook_resid_post"}, "site", 400),
    "search limit '²'": (SEARCH, {"q": "cold", "limit": "²"}, "limit", 400),
    "search limit beyond int64": (SEARCH, {"q": "cold", "limit": str(2**70)}, "limit", 400),
    "search q of 8 KB": (SEARCH, {"q": "cold " * 1640}, "q", 400),
    "search q of 17 distinct words": (SEARCH, {"q": " ".join(f"w{i}" for i in range(17))}, "q", 400),
}  # fmt: skip


@pytest.mark.parametrize("case", list(READS))
def test_hostile_reads(client, case):
    path, params, param, status = READS[case]
    refused(client.get(path, params=params), param, status)


def test_searches_that_are_fine(client):
    assert client.get(SEARCH, params={"q": "²"}).json()["data"] == []  # a word, matching nothing

    def found(params: dict) -> list[tuple[str, int]]:
        return [(h["sae"], h["index"]) for h in client.get(SEARCH, params=params).json()["data"]]

    assert found({"q": "cold cold COLD", "site": "blocks.2.hook_resid_post"}) == [
        ("s", 2)
    ]  # repeats count once
    assert found({"q": "cold", "site": "2"}) == [("s", 2)]
    assert client.get(SEARCH, params={"q": "cold", "sae": "9" * 40}).json()["data"] == []


def _sae(cfg: str | None = json.dumps(CFG), weights: bytes | None = None, name="w.safetensors", **fields):
    files = {"weights": (name, weights if weights is not None else save(rand_state("jumprelu")))}
    if cfg is not None:
        files["cfg"] = ("cfg.json", cfg)
    return {"files": files, "data": {"id": "x", **fields}}


WRITES = {
    "deep JSON vector body": ("POST", "/v1/vectors", {"content": DEEP, "headers": {"content-type": "application/json"}},
                              "body"),
    "deep JSON variant body": ("POST", "/v1/variants", {"content": DEEP}, "body"),
    "deep JSON features": ("PUT", "/v1/saes/s/features", {"content": DEEP}, "features"),
    "deep JSON features, JSON Lines": ("PUT", "/v1/saes/s/features", {"content": '{"index": 1}\n' + DEEP}, "features"),
    "deep JSON cfg file": ("POST", "/v1/saes", _sae(DEEP), "cfg"),
    "deep JSON cfg field": ("POST", "/v1/saes", {"files": {"weights": ("w.safetensors", save(rand_state("jumprelu")))},
                                                 "data": {"cfg": DEEP}}, "cfg"),
    "deep JSON vector file": ("POST", "/v1/vectors", {"files": {"vector": ("v.json", DEEP)}}, "vector"),
    "SAE form layer '²'": ("POST", "/v1/saes", _sae(layer="²"), "layer"),
    "SAE form site '²'": ("POST", "/v1/saes", _sae(site="²"), "site"),
    "vector form layer '²'": ("POST", "/v1/vectors", {"files": {"vector": ("v.safetensors", save({"v": torch.tensor(VEC)}))},
                                                      "data": {"layer": "²"}}, "layer"),
    "vector JSON layer '²'": ("POST", "/v1/vectors", {"json": {"layer": "²", "vector": VEC}}, "layer"),
    "vector JSON site beyond int64": ("POST", "/v1/vectors", {"json": {"site": {"layer": 2**70}, "vector": VEC}}, "site.layer"),
    "Neuronpedia featureIndex '²'": ("PUT", "/v1/saes/s/features", {"json": [{"featureIndex": "²"}]}, "features[0].index"),
    "Neuronpedia explanations not a list": ("PUT", "/v1/saes/s/features",
                                            {"json": [{"index": 1, "explanations": 7}]}, "features[0].explanations"),
    "Neuronpedia explanations of numbers": ("PUT", "/v1/saes/s/features",
                                            {"json": [{"index": 1, "explanations": [7]}]}, "features[0].explanations[0]"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(WRITES))
def test_hostile_writes(client, case):
    method, path, kwargs, param = WRITES[case]
    refused(client.request(method, path, **kwargs), param)


def test_layer_numbers_of_thousands_of_digits_in_file_names(client, tmp_path):
    """int() refuses more than 4300 digits with a ValueError: a layer in a tensor name, a GGUF direction
    name or an upload's file name must be a 400, not a 500."""
    many = "9" * 5000
    st = save({f"direction.{many}": torch.tensor(VEC)})
    refused(client.post("/v1/vectors", files={"vector": ("v.safetensors", st)}), "vector")
    gguf = write_gguf(tmp_path / "cv.gguf", {f"direction.{many}": np.asarray(VEC, np.float32)}).read_bytes()
    refused(client.post("/v1/vectors", files={"vector": ("cv.gguf", gguf)}), "vector")
    npz = _npz(STATE)  # the Gemma Scope layer from the file name: 18 digits at most are read as one
    refused(client.post("/v1/saes", **_sae(None, npz, f"layer_{many[:1000]}/params.npz")), "site")


# ---- npz headers ---------------------------------------------------------------------------------


def _npz(arrays: dict[str, np.ndarray], patch: tuple[bytes, bytes] | None = None) -> bytes:
    """np.savez's archive; `patch` rewrites the W_enc member's bytes (its npy header) once."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    if patch is None:
        return buf.getvalue()
    src, out = zipfile.ZipFile(buf), io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "W_enc.npy":
                assert patch[0] in data
                data = data.replace(*patch, 1)
            zf.writestr(info.filename, data)
    return out.getvalue()


STATE = {k: v.numpy() for k, v in rand_state("jumprelu").items()}
SHAPE = f"({D_IN}, {D_SAE})".encode()
NPZ_CASES = {
    "header claims 40 GB": _npz(STATE, (SHAPE, b"(100000, 100000)")),
    "header claims 1.2e19 elements": _npz(STATE, (SHAPE, b"(4294967296, 4294967296)")),
    "header claims fewer elements than its data": _npz(STATE, (SHAPE, f"({D_IN}, {D_SAE // 2})".encode())),
    "header claims an object array": _npz(STATE, (b"'<f4'", b"'|O'")),
    "header claims int32": _npz(STATE, (b"'<f4'", b"'<i4'")),
    "header is not a dict": _npz(STATE, (b"{'descr'", b"['descr'")),
    "member is not npy": _npz({**STATE, "W_enc": STATE["W_enc"]}, (b"\x93NUMPY", b"\x93NUMPX")),
}


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_npz_headers_that_lie(client, server, case):
    refused(client.post("/v1/saes", **_sae(json.dumps(CFG), NPZ_CASES[case], "params.npz")), "weights", 400)
    refused(client.post("/v1/saes", **_sae(None, NPZ_CASES[case], "params.npz", layer="2")), "weights", 400)
    assert [s["id"] for s in client.get("/v1/saes").json()["data"]] == ["s"]


def test_npz_fortran_order_and_big_endian_load_as_numpy_reads_them(client, server):
    """The npz reader is ours (sizes checked before inflating): it must read what numpy writes exactly as
    numpy does. W_enc in Fortran order and W_dec big-endian, as np.savez stores them."""
    arrays = dict(STATE)
    arrays["W_enc"] = np.asfortranarray(STATE["W_enc"])
    arrays["W_dec"] = STATE["W_dec"].astype(">f4")
    npz = _npz(arrays)
    with np.load(io.BytesIO(npz)) as ref:
        assert ref["W_enc"].flags.f_contiguous and ref["W_dec"].dtype == np.dtype(">f4")
        expected = {k: np.asarray(ref[k], dtype="<f4") for k in ref.files}
    r = client.post("/v1/saes", **_sae(json.dumps(CFG), npz, "params.npz", id="fortran"))
    assert r.status_code == 201, r.text
    _, weights = server.app.state.registry.load_sae("fortran")
    for name, want in expected.items():
        assert torch.equal(getattr(weights, name), torch.from_numpy(want)), name
    assert client.delete("/v1/saes/fortran").status_code == 200
