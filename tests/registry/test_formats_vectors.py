"""Steering-vector loaders (JSON, safetensors, llama.cpp / repeng GGUF) and feature annotations
(our list, Neuronpedia JSON and JSONL exports)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from steerserve.registry.errors import InvalidInput
from steerserve.registry.formats import load_vector
from steerserve.registry.formats.gguf import read_gguf
from steerserve.registry.formats.neuronpedia import parse_features
from steerserve.registry.formats.vectors import from_json
from steerserve.types.sites import Site
from tests.registry.helpers import write_gguf

VEC = np.linspace(-1.0, 1.0, 16, dtype=np.float32)


def test_json_list_and_base64_agree():
    a = from_json(VEC.tolist(), Site(2))
    b = from_json(base64.b64encode(VEC.astype("<f4").tobytes()).decode(), Site(2))
    torch.testing.assert_close(a.directions[Site(2)], torch.from_numpy(VEC))
    torch.testing.assert_close(b.directions[Site(2)], torch.from_numpy(VEC))
    assert a.d == 16 and abs(a.norms()[Site(2)] - float(np.linalg.norm(VEC))) < 1e-5


@pytest.mark.parametrize(
    "bad", [[], [1.0, float("nan")], [1.0, "x"], "not base64!", base64.b64encode(b"abc").decode()]
)
def test_json_vector_refusals(bad):
    with pytest.raises(InvalidInput):
        from_json(bad, Site(0))


def test_safetensors_single_and_named(tmp_path):
    path = tmp_path / "v.safetensors"
    save_file({"anything": torch.from_numpy(VEC)}, str(path))
    vec, meta = load_vector(path, "v.safetensors", None, Site(1, "resid_pre"))
    assert vec.sites == [Site(1, "resid_pre")] and meta["format"] == "safetensors"
    save_file({"direction.1": torch.ones(16), "blocks.3.hook_resid_pre": torch.zeros(16) + 2}, str(path))
    vec, _ = load_vector(path, "v.safetensors")
    assert vec.sites == [Site(1, "resid_post"), Site(3, "resid_pre")]
    only, _ = load_vector(path, "v.safetensors", site=Site(3, "resid_pre"))
    assert only.sites == [Site(3, "resid_pre")]
    save_file({"mystery": torch.ones(16), "other": torch.ones(16)}, str(path))
    with pytest.raises(InvalidInput, match="site"):
        load_vector(path, "v.safetensors")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gguf_control_vector(tmp_path, dtype):
    dirs = {f"direction.{layer}": (VEC * layer).astype(dtype) for layer in (1, 2, 5)}
    path = write_gguf(tmp_path / "cv.gguf", dirs)
    meta, tensors = read_gguf(path)
    assert meta["general.architecture"] == "controlvector" and meta["controlvector.layer_count"] == 3
    vec, hints = load_vector(path, "cv.gguf")
    assert vec.sites == [Site(1), Site(2), Site(5)] and hints["controlvector.model_hint"] == "llama"
    torch.testing.assert_close(
        vec.directions[Site(5)], torch.from_numpy((VEC * 5).astype(dtype).astype(np.float32))
    )
    one, _ = load_vector(path, "cv.gguf", site=Site(2))
    assert one.sites == [Site(2)]
    with pytest.raises(InvalidInput, match="no direction"):
        load_vector(path, "cv.gguf", site=Site(7))


def test_gguf_refusals(tmp_path):
    dirs = {"direction.1": VEC}
    with pytest.raises(InvalidInput, match="magic"):
        load_vector(write_gguf(tmp_path / "a.gguf", dirs, magic=b"GGUX"), "a.gguf")
    good = write_gguf(tmp_path / "b.gguf", dirs).read_bytes()
    (tmp_path / "c.gguf").write_bytes(good[:-40])
    with pytest.raises(InvalidInput, match="outside|truncated"):
        load_vector(tmp_path / "c.gguf", "c.gguf")
    with pytest.raises(InvalidInput, match="unexpected tensor"):
        load_vector(write_gguf(tmp_path / "d.gguf", {"token_embd.weight": VEC}), "d.gguf")
    with pytest.raises(InvalidInput, match="ggml type|F32"):
        raw = bytearray(good)
        at = raw.index(b"direction.1") + len("direction.1") + 4 + 8  # n_dims, dims[0], then the type
        raw[at : at + 4] = (8).to_bytes(4, "little")  # Q8_0
        (tmp_path / "e.gguf").write_bytes(bytes(raw))
        load_vector(tmp_path / "e.gguf", "e.gguf")


def test_format_detection_by_name_and_bytes(tmp_path):
    path = write_gguf(tmp_path / "noext", {"direction.0": VEC})
    vec, meta = load_vector(path, "upload.bin")
    assert meta["format"] == "gguf" and vec.sites == [Site(0)]
    path.write_bytes(b"NOPE" + path.read_bytes()[4:])
    with pytest.raises(InvalidInput, match="magic"):
        load_vector(path, "control.gguf")  # named .gguf: parsed as GGUF, and the magic is wrong


def test_features_our_list_and_neuronpedia_exports():
    ours = parse_features(
        [{"index": 3, "label": "cold", "max_activation": 4.0, "density": 0.01, "mean_activation": 0.03}]
    )
    assert ours[0].index == 3 and ours[0].label == "cold" and ours[0].max_activation == 4.0
    assert ours[0].mean_activation == 0.03 and parse_features([{"index": 3}])[0].mean_activation is None
    export = [  # /api/explanation/export: index as a string, one entry per explanation
        {"modelId": "gpt2-small", "layer": "6-res-jb", "index": "14", "description": " snow and ice",
         "explanationModelName": "gpt-4o-mini", "typeName": "oai_token-act-pair"},
        {"modelId": "gpt2-small", "layer": "6-res-jb", "index": "14", "description": "second opinion"},
        {"modelId": "gpt2-small", "layer": "6-res-jb", "index": 2, "description": "heat", "maxActApprox": 7.5,
         "frac_nonzero": 0.002},
    ]  # fmt: skip
    feats = parse_features(json.dumps(export).encode())
    assert [(f.index, f.label) for f in feats] == [(2, "heat"), (14, "snow and ice")]
    assert feats[0].max_activation == 7.5 and feats[0].density == 0.002
    jsonl = "\n".join(json.dumps(e) for e in export).encode()
    assert parse_features(jsonl) == feats
    assert parse_features({"explanations": export}) == feats


@pytest.mark.parametrize(
    "bad",
    [
        [{"index": -1}],
        [{"index": "x1"}],
        [{"index": 1, "density": 3}],
        [{"index": 1, "mean_activation": "a"}],
        "{not json",
        5,
    ],
)
def test_feature_refusals(bad):
    with pytest.raises(InvalidInput):
        parse_features(bad)
