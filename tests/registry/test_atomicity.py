"""Registry atomicity (issue 18, section 4): a write either answers 2xx and is stored, or answers a 4xx in
the OpenAI shape naming the parameter and stores nothing.

For every write route (SAE upload in each format, vector upload in each format, variant create,
PUT features, deletes) a table of bodies that parse but must be refused: NaN, infinity, integers
beyond int64, lone surrogates, deep nesting and oversized values in fields that are stored as they
come (cfg passthrough, GGUF metadata, unchecked variant fields), vectors whose norm overflows
float32, lying npz headers. After each, the registry lists exactly what it listed before (SAEs,
features, vectors, variants) and the blob store holds the same files. Real servers (SQLite,
PostgreSQL, SQLite + S3), real HTTP. Positive controls show each table entry fails for its stated
reason only.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zipfile

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save

from tests.registry.app_process import ThreadServer, make_app
from tests.registry.helpers import D_IN, D_SAE, rand_state, saelens_cfg

CFG6 = saelens_cfg("jumprelu", 6)
CFG5 = saelens_cfg("jumprelu", 5)
WEIGHTS = save(rand_state("jumprelu"))
VEC = np.linspace(-1, 1, D_IN, dtype=np.float32)
DEEP = "[" * 40 + "]" * 40  # deeper than any registry document (storable.MAX_DEPTH = 32)


# ---- bodies -----------------------------------------------------------------------------------------


def cfg_text(cfg: dict, **raw: str) -> str:
    """cfg.json text with `raw` JSON spliced in as values (NaN, 1e999, "\\ud800": what json.dumps won't write)."""
    text = json.dumps({**cfg, **{k: f"@{k}@" for k in raw}})
    for key, value in raw.items():
        text = text.replace(f'"@{key}@"', value)
    return text


def npz_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: v.numpy() for k, v in state.items()})
    return buf.getvalue()


def npz_lying_header() -> bytes:
    """A real npz whose W_enc member's npy header claims [100000, 100000] (40 GB) over 4 KB of data."""
    good = zipfile.ZipFile(io.BytesIO(npz_bytes(rand_state("jumprelu"))))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for info in good.infolist():
            data = good.read(info)
            if info.filename == "W_enc.npy":
                data = data.replace(f"({D_IN}, {D_SAE})".encode(), b"(100000, 100000)", 1)
            zf.writestr(info.filename, data)
    return out.getvalue()


def npz_with_object_array() -> bytes:
    state = {k: v.numpy() for k, v in rand_state("jumprelu").items()}
    buf = io.BytesIO()
    np.savez(buf, **state, extra=np.array([{"a": 1}], dtype=object))
    return buf.getvalue()


def sparsify_files(cfg_extra: str = "") -> tuple[str, bytes]:
    g = torch.Generator().manual_seed(3)
    state = {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g),
        "encoder.bias": torch.randn(D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
    }
    cfg = {"expansion_factor": 4, "normalize_decoder": True, "num_latents": D_SAE, "k": 8, "d_in": D_IN}
    text = json.dumps(cfg)
    if cfg_extra:
        text = text[:-1] + ", " + cfg_extra + "}"
    return text, save(state)


def gguf_kv(key: str, vtype: int, packed: bytes) -> bytes:
    """A control-vector GGUF (direction.1) whose one metadata entry is (key, GGUF type, raw value)."""
    b = key.encode()
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", len(b)) + b)
    out += struct.pack("<I", vtype) + packed
    name = b"direction.1"
    out += struct.pack("<Q", len(name)) + name + struct.pack("<IQIQ", 1, D_IN, 0, 0)
    out += b"\0" * (-len(out) % 32)
    return bytes(out) + VEC.tobytes()


def raw_json(text: str) -> dict:
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


# ---- one request per case: (method, url, httpx kwargs) ------------------------------------------------


def sae(cfg: str | dict | None = CFG6, weights: bytes = WEIGHTS, name="sae_weights.safetensors", **fields):
    files = {"weights": (name, weights)}
    if cfg is not None:
        files["cfg"] = ("cfg.json", cfg if isinstance(cfg, str) else json.dumps(cfg))
    return ("POST", "/v1/saes", {"files": files, "data": {"id": "new", **fields}})


def vector_json(text: str):
    return ("POST", "/v1/vectors", raw_json(text))


def vector_file(name: str, data: bytes, **fields):
    return ("POST", "/v1/vectors", {"files": {"vector": (name, data)}, "data": {"id": "newv", **fields}})


def variant(text: str):
    return ("POST", "/v1/variants", raw_json(text))


def features(text: str):
    return ("PUT", "/v1/saes/base/features", {"content": text.encode()})


BIG = [3e38] * D_IN  # each entry a finite float32; the norm (~1.2e39) is not
GOOD_FEATURE = '{"index": 5, "label": "new label"}'
STEER = '"steering": [{"vector": "vbase", "mode": "add", "strength": 1.0'

# name -> (request, expected param); every one must be a 4xx and store nothing
CASES = {
    # SAELens (v6 and v5 cfg) + safetensors
    "cfg passthrough NaN": (sae(cfg_text(CFG6, dataset_path="NaN")), "cfg.dataset_path"),
    "cfg passthrough overflowing number": (sae(cfg_text(CFG6, dataset_path="1e999")), "cfg.dataset_path"),
    "cfg passthrough lone surrogate": (sae(cfg_text(CFG6, neuronpedia_id='"\\ud800"')), "cfg.neuronpedia_id"),
    "cfg model_name lone surrogate (v5)": (sae(cfg_text(CFG5, model_name='"x\\udfff"')), "cfg.model_name"),
    "cfg passthrough beyond int64": (sae(cfg_text(CFG6, dataset_path=str(2**70))), "cfg.dataset_path"),
    "cfg passthrough 100 KB string": (sae({**CFG6, "dataset_path": "d" * 100_000}), "cfg"),
    "cfg deeply nested unused field": (sae(cfg_text(CFG6, extra=DEEP)), "cfg"),
    "cfg d_sae beyond int64": (sae(cfg_text(CFG6, d_sae=str(2**64))), "cfg.d_sae"),
    "cfg hook at a layer beyond int64": (
        sae({**CFG6, "metadata": {**CFG6["metadata"], "hook_name": f"blocks.{2**64}.hook_resid_post"}}),
        "cfg.hook_name",
    ),
    "cfg topk k beyond d_sae": (sae(saelens_cfg("topk", 6, k=2**40), save(rand_state("topk"))), "k"),
    "form layer '²'": (sae(layer="²"), "layer"),
    "form layer beyond int64": (sae(layer="9" * 25), "layer"),
    "form id too long": (sae(id="a" * 200), "id"),
    # npz (Gemma Scope layout), with and without a cfg
    "npz header claims 40 GB": (sae(CFG6, npz_lying_header(), "params.npz"), "weights"),
    "npz object array": (sae(CFG6, npz_with_object_array(), "params.npz"), "weights"),
    "npz without cfg, layer '²'": (sae(None, npz_bytes(rand_state("jumprelu")), "params.npz", layer="²"), "layer"),
    "npz without cfg, lying header": (sae(None, npz_lying_header(), "params.npz", layer="2"), "weights"),
    # sparsify
    "sparsify cfg NaN": (sae(*sparsify_files('"lr": NaN'), name="sae.safetensors", layer="1"), "cfg.lr"),
    "sparsify cfg lone surrogate": (
        sae(*sparsify_files('"note": "\\ud800"'), name="sae.safetensors", layer="1"),
        "cfg.note",
    ),
    # vectors: JSON (list, base64), safetensors, GGUF, JSON file
    "vector norm overflows float32": (vector_json(json.dumps({"id": "newv", "layer": 1, "vector": BIG})), "vector"),
    "vector base64 norm overflows": (
        vector_json(json.dumps({"id": "newv", "layer": 1, "vector": base64.b64encode(
            np.array(BIG, np.float32).tobytes()).decode()})),
        "vector",
    ),  # fmt: skip
    "vector NaN literal": (vector_json('{"id": "newv", "layer": 1, "vector": [NaN' + ", 1.0" * 15 + "]}"), "vector[0]"),
    "vector layer beyond int64": (vector_json(json.dumps({"id": "newv", "layer": 2**64, "vector": VEC.tolist()})), "layer"),
    "vector layer '²'": (vector_json(json.dumps({"id": "newv", "layer": "²", "vector": VEC.tolist()})), "layer"),
    "vector deep unused field": (vector_json(f'{{"id": "newv", "layer": 1, "x": {DEEP}, "vector": {VEC.tolist()}}}'), "body"),
    "vector safetensors norm overflows": (
        vector_file("v.safetensors", save({"v": torch.tensor(BIG)}), layer="1"),
        "vector",
    ),
    "gguf metadata f32 NaN": (vector_file("cv.gguf", gguf_kv("controlvector.scale", 6, struct.pack("<f", float("nan")))),
                              "vector.controlvector.scale"),
    "gguf metadata f64 inf": (vector_file("cv.gguf", gguf_kv("controlvector.x", 12, struct.pack("<d", float("inf")))),
                              "vector.controlvector.x"),
    "gguf metadata u64 beyond int64": (vector_file("cv.gguf", gguf_kv("controlvector.n", 10, struct.pack("<Q", 2**64 - 1))),
                                       "vector.controlvector.n"),
    "vector JSON file NaN": (vector_file("v.json", b'{"layer": 1, "vector": [NaN]}'), "vector.vector[0]"),
    "vector form layer '²'": (vector_file("v.safetensors", save({"v": torch.from_numpy(VEC)}), layer="²"), "layer"),
    # variants: unchecked fields are stored as given, so they are checked as JSON
    "variant NaN in an unchecked field": (variant('{"id": "neww", ' + STEER + ', "note": NaN}]}'), "steering[0].note"),
    "variant 1e999 in an unchecked field": (variant('{"id": "neww", ' + STEER + '}], "x": 1e999}'), "x"),
    "variant lone surrogate": (variant('{"id": "neww", ' + STEER + ', "note": "\\ud800"}]}'), "steering[0].note"),
    "variant index beyond int64": (
        variant('{"id": "neww", "steering": [{"feature": {"sae": "base", "index": 99999999999999999999}, '
                '"mode": "add", "strength": 1}]}'),
        "steering[0].feature.index",
    ),  # fmt: skip
    "variant deep unused field": (variant('{"id": "neww", ' + STEER + "}], " + f'"x": {DEEP}}}'), "body"),
    "variant 2 MB unchecked field": (variant('{"id": "neww", ' + STEER + "}], " + f'"x": "{"y" * (2 << 20)}"}}'), None),
    "variant 5000-digit integer": (variant('{"id": "neww", ' + STEER + "}], " + f'"x": {"9" * 5000}}}'), "body"),
    # feature annotations: the whole PUT or nothing
    "features index '²'": (features('[' + GOOD_FEATURE + ', {"index": "²", "label": "x"}]'), "features[1].index"),
    "features index beyond int64": (features('[' + GOOD_FEATURE + f', {{"index": {2**64}}}]'), "features[1].index"),
    "features index beyond d_sae": (features('[' + GOOD_FEATURE + f', {{"index": {D_SAE}}}]'), "features[1].index"),
    "features explanations an int": (features('[' + GOOD_FEATURE + ', {"index": 1, "explanations": 5}]'),
                                     "features[1].explanations"),
    "features explanations an object": (features('[' + GOOD_FEATURE + ', {"index": 1, "explanations": {"a": 1}}]'),
                                        "features[1].explanations"),
    "features explanations numbers": (features('[' + GOOD_FEATURE + ', {"index": 1, "explanations": [5]}]'),
                                      None),
    "features label lone surrogate": (features('[' + GOOD_FEATURE + ', {"index": 1, "label": "\\udc00"}]'),
                                      "features[1].label"),
    "features max_activation 1e999": (features('[' + GOOD_FEATURE + ', {"index": 1, "max_activation": 1e999}]'),
                                      "features[1].max_activation"),
    "features density NaN string": (features('[' + GOOD_FEATURE + ', {"index": 1, "density": "NaN"}]'),
                                    "features[1].density"),
    "features JSONL, line 2 bad": (features(GOOD_FEATURE + '\n{"index": 1, "label": NaN}'), "features[1].label"),
    "features deeply nested": (features(DEEP), "features"),
    # deletes of what does not exist
    "delete unknown SAE": (("DELETE", "/v1/saes/" + "9" * 30, {}), "id"),
    "delete unknown vector": (("DELETE", "/v1/vectors/%C2%B2", {}), "id"),
    "delete unknown variant": (("DELETE", "/v1/variants/" + "x" * 300, {}), "id"),
}  # fmt: skip

# the same routes with valid bodies: each table entry fails for its stated reason only
CONTROLS = [
    sae(cfg_text(CFG6, dataset_path='"ok"')),
    sae(CFG6, npz_bytes(rand_state("jumprelu")), "params.npz", id="new-npz"),
    sae(None, npz_bytes(rand_state("jumprelu")), "params.npz", layer="2", id="new-gs"),
    sae(*sparsify_files('"lr": 0.001'), name="sae.safetensors", layer="1", id="new-sp"),
    vector_json(json.dumps({"id": "newv", "layer": 1, "vector": [1e18] * D_IN})),
    vector_file("cv.gguf", gguf_kv("controlvector.scale", 6, struct.pack("<f", 0.5)), id="newg"),
    variant('{"id": "neww", ' + STEER + ', "note": "fine"}]}'),
    features("[" + GOOD_FEATURE + ', {"index": 1, "explanations": [{"description": "ok"}]}]'),
]


# ---- the test ---------------------------------------------------------------------------------------


def seed(c: httpx.Client) -> None:
    method, url, kwargs = sae(id="base")
    assert c.request(method, url, **kwargs).status_code == 201
    r = c.put("/v1/saes/base/features", json=[{"index": 1, "label": "cold", "max_activation": 2.0},
                                              {"index": 5, "label": "old label"}])  # fmt: skip
    assert r.status_code == 200, r.text
    assert c.post("/v1/vectors", json={"id": "vbase", "layer": 1, "vector": VEC.tolist()}).status_code == 201
    r = c.post("/v1/variants", content=('{"id": "wbase", ' + STEER + "}]}").encode())
    assert r.status_code == 201, r.text


def snapshot(c: httpx.Client, server: ThreadServer) -> dict:
    reg = server.app.state.registry
    out = {path: c.get(path).json() for path in ("/v1/saes", "/v1/vectors", "/v1/variants", "/v1/saes/base")}
    out["features"] = [c.get(f"/v1/saes/base/features/{i}").json() for i in (0, 1, 5)]
    out["blobs"] = sorted(reg.blobs.list())
    out["temp"] = sorted(p.name for p in reg.blobs.temp_dir.iterdir())
    out["uploads"] = sorted(p.name for p in reg.uploads_dir.iterdir()) if reg.uploads_dir.exists() else []
    return out


@pytest.fixture
def server(data_dir, registry_config):
    with ThreadServer(make_app(data_dir, registry_config, max_upload_mb=8)) as s:
        yield s


def test_refused_writes_store_nothing(server):
    failures = []
    # one connection per request: on the code before the fix a 500 reset the kept-alive connection
    with httpx.Client(base_url=server.url, timeout=60, headers={"Connection": "close"}) as c:
        seed(c)
        before = snapshot(c, server)
        for name, ((method, url, kwargs), param) in CASES.items():
            try:
                r = c.request(method, url, **kwargs)
            except httpx.TransportError as exc:  # a 500 closes the connection: reported, not fatal
                r = httpx.Response(599, text=f"connection failed: {exc!r}")
            problems = []
            if not 400 <= r.status_code < 500:
                problems.append(f"status {r.status_code}")
            try:
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"}
                if param is not None and err["param"] != param:
                    problems.append(f"param {err['param']!r}, expected {param!r}")
            except Exception:  # reported below with the body
                problems.append("not the OpenAI error shape")
            after = snapshot(c, server)
            if after != before:
                changed = [k for k in before if before[k] != after[k]]
                problems.append(f"the registry changed: {changed}")
                before = after
            if problems:
                failures.append(f"{name}: {'; '.join(problems)} -- {r.text[:300]}")
        assert not failures, "\n".join(failures)

        # positive controls: the valid twins of the table's bodies are stored
        for method, url, kwargs in CONTROLS:
            r = c.request(method, url, **kwargs)
            assert r.status_code in (200, 201), (url, r.text)
        assert c.get("/v1/saes/base/features/5").json()["label"] == "new label"
        assert {s["id"] for s in c.get("/v1/saes").json()["data"]} == {
            "base",
            "new",
            "new-npz",
            "new-gs",
            "new-sp",
        }
        assert c.get("/v1/vectors/newg").json()["meta"]["controlvector.scale"] == 0.5
