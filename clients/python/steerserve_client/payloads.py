"""Upload payloads: SAE folders/files/arrays -> multipart parts, vectors -> JSON floats or base64 float32.

numpy is optional: it is imported only when arrays are given. Arrays are anything `numpy.asarray`
takes (numpy arrays, lists, CPU torch tensors); they are written as safetensors by a small writer
here (8-byte header length, JSON header, raw little-endian data), so the client needs neither torch
nor the safetensors package. Multipart parts are built per attempt (`Upload.parts()`), so a retried
upload re-reads its files from the start.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

PathLike = str | os.PathLike

_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip
_SAE_WEIGHT_NAMES = ("sae_weights.safetensors", "sae.safetensors", "params.npz")


def _numpy():
    try:
        import numpy
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("arrays need numpy: pip install 'steerserve-client[numpy]'") from exc
    return numpy


def safetensors_bytes(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """`{name: array}` -> the bytes of a safetensors file (little-endian, C order, names sorted)."""
    np = _numpy()
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks, offset = [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[name]))
        code = _SAFETENSORS_DTYPES.get(arr.dtype.name)
        if code is None:
            raise TypeError(f"{name}: dtype {arr.dtype} cannot be written to safetensors by this client")
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # NOTE: the data start is 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)


def float32_base64(vector: Any) -> str:
    """A 1-d array of floats -> base64 of its little-endian float32 bytes (the compact JSON form)."""
    np = _numpy()
    arr = np.asarray(vector, dtype="<f4").reshape(-1)
    return base64.b64encode(arr.tobytes()).decode("ascii")


def float_list(vector: Any) -> list[float]:
    """Floats for the JSON form; plain sequences need no numpy."""
    if isinstance(vector, Sequence) and not isinstance(vector, (str, bytes)):
        return [float(v) for v in vector]
    np = _numpy()
    return [float(v) for v in np.asarray(vector, dtype="float64").reshape(-1)]


# A multipart part: (filename, opener) for a file, or a text value for a plain field.
Opener = Callable[[], IO[bytes]]


@dataclass
class Upload:
    """A multipart body described once and rendered per attempt: files are reopened every time."""

    files: dict[str, tuple[str, Opener, str]]  # field -> (filename, opener, content type)
    fields: dict[str, str]

    def parts(self) -> tuple[dict[str, tuple[str, IO[bytes], str]], list[IO[bytes]]]:
        """httpx `files=` for one attempt and the handles to close after it."""
        opened = {name: (fn, opener(), ctype) for name, (fn, opener, ctype) in self.files.items()}
        return opened, [f for _, f, _ in opened.values()]


def _file_part(source: PathLike | bytes | IO[bytes], default_name: str) -> tuple[str, Opener, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return default_name, lambda: io.BytesIO(data), "application/octet-stream"
    if hasattr(source, "read"):
        data = source.read()  # NOTE: read once so that a retry can send it again
        return (
            getattr(source, "name", None) or default_name,
            lambda: io.BytesIO(data),
            "application/octet-stream",
        )
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file")
    return path.name, lambda: open(path, "rb"), "application/octet-stream"


def _site_fields(layer: int | None, site: str | None) -> dict[str, str]:
    """Form fields naming a site: `layer` (resid_post of that layer) or `site` (a SAELens hook name)."""
    if layer is not None and site is not None:
        raise ValueError("give one of layer= or site=, not both")
    if layer is not None:
        return {"layer": str(int(layer))}
    if site is not None:
        if not isinstance(site, str):
            raise TypeError("site= must be a hook name such as 'blocks.3.hook_resid_pre' in an upload form")
        return {"site": site}
    return {}


def sae_upload(
    source: PathLike | None,
    cfg: PathLike | Mapping[str, Any] | None,
    weights: PathLike | bytes | IO[bytes] | Mapping[str, Any] | None,
    sae_id: str | None,
    layer: int | None,
    site: str | None,
) -> Upload:
    """The multipart body of `POST /v1/saes` from a folder, or a cfg plus weights (file, bytes or arrays)."""
    if source is not None:
        if cfg is not None or weights is not None:
            raise ValueError("give a folder, or cfg= and weights=, not both")
        folder = Path(source)
        if folder.is_file():
            weights, sibling = folder, folder.parent / "cfg.json"
            cfg = sibling if sibling.is_file() and folder.suffix != ".npz" else None
        elif folder.is_dir():
            found = [folder / n for n in _SAE_WEIGHT_NAMES if (folder / n).is_file()]
            if not found:
                raise FileNotFoundError(f"{folder}: none of {', '.join(_SAE_WEIGHT_NAMES)} in this folder")
            weights = found[0]
            cfg = folder / "cfg.json" if (folder / "cfg.json").is_file() else None
        else:
            raise FileNotFoundError(f"{folder} does not exist")
    if weights is None:
        raise ValueError("an SAE upload needs weights (a folder, a file, bytes or a {name: array} mapping)")
    files: dict[str, tuple[str, Opener, str]] = {}
    if isinstance(weights, Mapping):
        data = safetensors_bytes(weights)
        files["weights"] = ("sae_weights.safetensors", lambda: io.BytesIO(data), "application/octet-stream")
    else:
        files["weights"] = _file_part(weights, "sae_weights.safetensors")
    if isinstance(cfg, Mapping):
        text = json.dumps(dict(cfg)).encode()
        files["cfg"] = ("cfg.json", lambda: io.BytesIO(text), "application/json")
    elif cfg is not None:
        files["cfg"] = _file_part(cfg, "cfg.json")
    fields = _site_fields(layer, site)
    if sae_id is not None:
        fields["id"] = sae_id
    return Upload(files, fields)


def vector_file_upload(
    path: PathLike | bytes | IO[bytes],
    vector_id: str | None,
    layer: int | None,
    site: str | None,
    fmt: str | None,
    filename: str | None = None,
) -> Upload:
    """The multipart body of `POST /v1/vectors` from a safetensors / gguf / JSON file."""
    name, opener, ctype = _file_part(path, filename or "vector.safetensors")
    fields = _site_fields(layer, site)
    if vector_id is not None:
        fields["id"] = vector_id
    if fmt is not None:
        fields["format"] = fmt
    return Upload({"vector": (filename or name, opener, ctype)}, fields)


def vector_json(
    vector: Any, vector_id: str | None, layer: int | None, site: str | Mapping | None, encoding: str
) -> dict[str, Any]:
    """The JSON body of `POST /v1/vectors`: floats (`encoding="json"`) or base64 float32 (`"base64"`)."""
    if encoding not in ("json", "base64"):
        raise ValueError(f"encoding must be 'json' or 'base64', got {encoding!r}")
    if (layer is None) == (site is None):
        raise ValueError("a vector needs one site: give layer= or site= (a hook name or {'layer', 'hook'})")
    body: dict[str, Any] = {"layer": int(layer)} if layer is not None else {"site": site}
    if vector_id is not None:
        body["id"] = vector_id
    body["vector"] = float32_base64(vector) if encoding == "base64" else float_list(vector)
    return body


def features_body(features: Any) -> bytes:
    """`PUT /v1/saes/{id}/features`: a list of dicts, a Neuronpedia export (object), or a file path."""
    if isinstance(features, (str, os.PathLike)):
        if not Path(features).is_file():
            raise FileNotFoundError(f"{features} is not a file (give a list of feature dicts or a path)")
        return Path(features).read_bytes()
    if isinstance(features, (bytes, bytearray)):
        return bytes(features)
    if isinstance(features, Mapping):
        return json.dumps(dict(features)).encode()
    return json.dumps([dict(f) if isinstance(f, Mapping) else f for f in features]).encode()
