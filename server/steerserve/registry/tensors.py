"""Safe tensor-file I/O: nothing is ever unpickled.

- safetensors: the 8-byte length and the JSON header are parsed and checked first (known dtypes,
  shapes, byte sizes, offsets that tile the data section exactly with no gap or overlap, data
  section as long as the file); only then are tensors read, through the `safetensors` library.
  A pickle or zip checkpoint renamed `.safetensors`, a truncated file or a lying header is rejected.
- npz (Gemma Scope `params.npz`): members listed from the zip directory and bounded in size before
  `np.load(..., allow_pickle=False)`, so object arrays are refused.
- Every tensor read here is floating point (F16/BF16/F32/F64) and finite, or the file is rejected.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from steerserve.registry.errors import InvalidInput, TooLarge

# safetensors dtype name -> bytes per element (every dtype the format defines that we may meet)
_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E5M2": 1, "F8_E4M3": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_MAX_HEADER = 64 * 1024 * 1024
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_HINT = "pickled checkpoints (.pt, .bin, .ckpt) are never loaded; convert them to safetensors"


def sniff(path: Path) -> str:
    """'npz' for a zip archive, 'safetensors' otherwise (the safetensors checks decide the rest)."""
    with open(path, "rb") as f:
        return "npz" if f.read(4) == _ZIP_MAGIC else "safetensors"


def read_safetensors_header(path: Path, name: str = "file") -> tuple[dict[str, dict], dict[str, str]]:
    """Parse and check a safetensors header without reading any tensor data.

    Returns ({tensor name: {"dtype", "shape", "data_offsets"}}, metadata).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidInput(f"{name} is not a safetensors file: only {len(head)} bytes", param=name)
        n = int.from_bytes(head, "little")
        if n < 2 or n > _MAX_HEADER or 8 + n > size:
            raise InvalidInput(
                f"{name} is not a safetensors file: its header length field ({n}) does not fit a file "
                f"of {size} bytes; {_PICKLE_HINT}",
                param=name,
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidInput(f"{name} is not a safetensors file: its header is not JSON", param=name) from None
    if not isinstance(header, dict):
        raise InvalidInput(f"{name}: safetensors header must be a JSON object", param=name)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidInput(f"{name}: safetensors __metadata__ must map strings to strings", param=name)
    spans = []
    for key, info in header.items():
        _check_entry(name, key, info)
        begin, end = info["data_offsets"]
        spans.append((begin, end, key))
    # NOTE: dense layout: the byte ranges must tile [0, data_size) exactly, in some order.
    expected, data_size = 0, size - 8 - n
    for begin, end, key in sorted(spans):
        if begin != expected:
            raise InvalidInput(
                f"{name}: tensor {key!r} starts at byte {begin}, expected {expected} (gap or overlap)",
                param=name,
            )
        expected = end
    if expected != data_size:
        raise InvalidInput(
            f"{name}: the header describes {expected} bytes of tensor data but the file holds "
            f"{data_size} (truncated or padded file)",
            param=name,
        )
    return header, metadata


def _check_entry(name: str, key: str, info: object) -> None:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise InvalidInput(f"{name}: malformed header entry for tensor {key!r}", param=name)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _ITEMSIZE:
        raise InvalidInput(f"{name}: tensor {key!r} has unknown dtype {dtype!r}", param=name)
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidInput(f"{name}: tensor {key!r} has an invalid shape {shape!r}", param=name)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise InvalidInput(f"{name}: tensor {key!r} has invalid data_offsets {offsets!r}", param=name)
    if offsets[1] - offsets[0] != math.prod(shape) * _ITEMSIZE[dtype]:
        raise InvalidInput(
            f"{name}: tensor {key!r} of shape {shape} and dtype {dtype} needs "
            f"{math.prod(shape) * _ITEMSIZE[dtype]} bytes but its offsets span {offsets[1] - offsets[0]}",
            param=name,
        )


def read_safetensors(path: Path, name: str = "file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Checked header first, then the tensors (float and finite only) and the metadata."""
    header, metadata = read_safetensors_header(path, name)
    for key, info in header.items():
        if info["dtype"] not in FLOAT_DTYPES:
            raise InvalidInput(
                f"{name}: tensor {key!r} has dtype {info['dtype']}; expected one of "
                f"{', '.join(FLOAT_DTYPES)}",
                param=name,
            )
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in header:
            out[key] = f.get_tensor(key)
    check_finite(out, name)
    return out, metadata


def read_npz(path: Path, name: str = "file", max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Arrays of a `.npz` archive, loaded with allow_pickle=False; float and finite only."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile:
        raise InvalidInput(f"{name} is not a valid npz (zip) archive", param=name) from None
    total = sum(i.file_size for i in infos)
    if max_bytes is not None and total > max_bytes:
        raise TooLarge(
            f"{name}: the npz archive unpacks to {total} bytes, over the limit of {max_bytes}", name
        )
    for info in infos:
        if not info.filename.endswith(".npy"):
            raise InvalidInput(f"{name}: unexpected member {info.filename!r} in the npz archive", param=name)
    out: dict[str, torch.Tensor] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                arr = npz[key]
                if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8):
                    raise InvalidInput(
                        f"{name}: array {key!r} has dtype {arr.dtype}; expected float16/32/64", param=name
                    )
                arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
                out[key] = torch.from_numpy(arr)
    except ValueError as exc:  # object arrays refuse to load without pickle; malformed headers too
        raise InvalidInput(f"{name}: cannot read the npz archive safely: {exc}", param=name) from None
    check_finite(out, name)
    return out


def read_tensor_file(path: Path, name: str = "file", max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """safetensors or npz, chosen by the file's first bytes."""
    if sniff(path) == "npz":
        return read_npz(path, name, max_bytes)
    return read_safetensors(path, name)[0]


def check_finite(tensors: dict[str, torch.Tensor], name: str) -> None:
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise InvalidInput(
                f"{name}: tensor {key!r} holds {bad} non-finite values (NaN or inf)", param=name
            )


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write `tensors` as safetensors, byte-for-byte deterministic (sorted names, sorted JSON keys), so
    equal content gets one content address. No fsync: the blob store does that."""
    names = {dtype: name for name, dtype in FLOAT_DTYPES.items()}
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    ordered, offset = [], 0
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        if t.dtype not in names:
            raise ValueError(f"cannot store tensor {key!r} of dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        header[key] = {
            "dtype": names[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        ordered.append(t)
        offset += nbytes
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for t in ordered:  # NOTE: little-endian hosts only, like the safetensors library itself
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
