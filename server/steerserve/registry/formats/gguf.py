"""A small GGUF reader for llama.cpp / repeng control vectors, parsing the file strictly as data.

Layout (GGUF v2/v3, little-endian): magic `GGUF`, u32 version, u64 tensor count, u64 metadata count;
metadata as (string key, u32 type, value); tensor infos as (string name, u32 n_dims, u64 dims[n_dims]
with dims[0] innermost, u32 ggml type, u64 offset); then, aligned to `general.alignment` (default
32), the data section the offsets point into. Only F32 and F16 tensors are accepted.

A control vector holds one tensor `direction.N` [n_embd] per layer N; it applies to the output of
decoder layer N, i.e. `resid_post` of layer N (steerserve's `"layer": N`).
"""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

import numpy as np
import torch

from steerserve.registry.errors import InvalidInput
from steerserve.types.sites import Site

MAGIC = b"GGUF"
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_TENSOR_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("<f2")}  # ggml F32, F16
_MAX_COUNT = 1 << 20
_DIRECTION = re.compile(r"^direction\.(\d{1,18})$")


class _Cursor:
    """Bounds-checked sequential reads over the file's bytes."""

    def __init__(self, data: bytes, name: str):
        self.data, self.pos, self.name = data, 0, name

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise InvalidInput(
                f"{self.name}: truncated GGUF file (wanted {n} bytes at {self.pos})", param=self.name
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, what: str) -> int:
        n = self.unpack("<Q")
        if n > _MAX_COUNT:
            raise InvalidInput(f"{self.name}: implausible GGUF {what} count {n}", param=self.name)
        return n

    def string(self) -> str:
        try:
            return self.take(self.count("string length")).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"{self.name}: GGUF string is not UTF-8", param=self.name) from None

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY and depth < 4:
            item_type, n = self.unpack("<I"), self.count("array")
            return [self.value(item_type, depth + 1) for _ in range(n)]
        raise InvalidInput(f"{self.name}: unknown GGUF metadata type {vtype}", param=self.name)


def read_gguf(path: Path, name: str = "file") -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a GGUF file; tensors as float32 in numpy order (dims reversed)."""
    cur = _Cursor(path.read_bytes(), name)
    magic = cur.data[:4]
    if magic != MAGIC:
        raise InvalidInput(f"{name} is not a GGUF file: magic {magic!r}, expected {MAGIC!r}", param=name)
    cur.take(4)
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise InvalidInput(f"{name}: GGUF version {version} is not supported (2 or 3)", param=name)
    n_tensors, n_kv = cur.count("tensor"), cur.count("metadata")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        tname, n_dims = cur.string(), cur.unpack("<I")
        if not 1 <= n_dims <= 4:
            raise InvalidInput(f"{name}: tensor {tname!r} has {n_dims} dims", param=name)
        dims = [cur.unpack("<Q") for _ in range(n_dims)]
        ggml_type, offset = cur.unpack("<I"), cur.unpack("<Q")
        if ggml_type not in _TENSOR_DTYPES:
            raise InvalidInput(
                f"{name}: tensor {tname!r} has ggml type {ggml_type}; only F32/F16", param=name
            )
        infos.append((tname, dims, _TENSOR_DTYPES[ggml_type], offset))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise InvalidInput(f"{name}: general.alignment must be a power of two, got {alignment!r}", param=name)
    data_start = -(-cur.pos // alignment) * alignment
    tensors, spans = {}, []
    for tname, dims, dtype, offset in infos:
        nbytes = math.prod(dims) * dtype.itemsize
        begin = data_start + offset
        if offset % alignment or begin + nbytes > len(cur.data):
            raise InvalidInput(
                f"{name}: tensor {tname!r} lies outside the data section (truncated?)", param=name
            )
        if tname in tensors:
            raise InvalidInput(f"{name}: tensor {tname!r} appears twice", param=name)
        spans.append((begin, begin + nbytes, tname))
        arr = np.frombuffer(cur.data, dtype=dtype, count=math.prod(dims), offset=begin)
        tensors[tname] = torch.from_numpy(arr.astype(np.float32).reshape(list(reversed(dims))))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise InvalidInput(f"{name}: tensors {a!r} and {b!r} overlap", param=name)
    return metadata, tensors


def control_vector(path: Path, name: str = "file") -> tuple[dict[Site, torch.Tensor], dict[str, object]]:
    """The `direction.N` tensors of a control-vector GGUF as {resid_post of layer N: [n_embd]}."""
    metadata, tensors = read_gguf(path, name)
    out: dict[Site, torch.Tensor] = {}
    for tname, t in tensors.items():
        m = _DIRECTION.match(tname)
        if not m:
            raise InvalidInput(
                f"{name}: unexpected tensor {tname!r} in a control vector (direction.N)", param=name
            )
        if sum(d != 1 for d in t.shape) > 1:
            raise InvalidInput(f"{name}: {tname} must be a vector, got shape {list(t.shape)}", param=name)
        out[Site(int(m.group(1)), "resid_post")] = t.reshape(-1)
    if not out:
        raise InvalidInput(f"{name}: the GGUF file holds no direction.N tensors", param=name)
    hints = {k: v for k, v in metadata.items() if k.startswith(("controlvector.", "general.architecture"))}
    return out, hints
