"""Safe tensor-file I/O: nothing is ever unpickled.

- safetensors: the 8-byte length and the JSON header are parsed and checked first (known dtypes,
  shapes, byte sizes, offsets that tile the data section exactly with no gap or overlap, data
  section as long as the file); only then are tensors read, through the `safetensors` library.
  A pickle or zip checkpoint renamed `.safetensors`, a truncated file or a lying header is rejected.
- npz (Gemma Scope `params.npz`): the zip directory and each member's npy header are read and checked
  first (float dtypes, declared sizes that match the headers' shapes, a total under the caller's bound,
  no zip-bomb compression ratio); only then is each array inflated, exactly its declared bytes.
- Every tensor read here is floating point (F16/BF16/F32/F64) and finite, or the file is rejected.
"""

from __future__ import annotations

import json
import math
import zipfile
import zlib
from dataclasses import dataclass
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
_NPZ_MAX_MEMBERS = 64
_NPY_HEADER_MAX = 10000  # numpy's own default bound on an npy header
_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
# NOTE: float weights barely compress (~1.1:1, ~2:1 for bf16 values kept as float32); a bigger ratio,
# past a small allowance, is a zip bomb. It also bounds an npz without a cfg (Gemma Scope) to 8x its upload.
_NPZ_MAX_RATIO = 8
_NPZ_RATIO_SLACK = 1 << 20
_READ_CHUNK = 4 << 20
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


@dataclass(frozen=True)
class NpyMember:
    """One array of an npz archive, as its zip entry and npy header declare it (nothing inflated)."""

    key: str
    info: zipfile.ZipInfo
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran: bool
    data_offset: int  # bytes of npy magic and header before the array data

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> NpyMember:
    key = info.filename.removesuffix(".npy")
    where = f"{name}: npz member {info.filename!r}"
    with zf.open(info) as f:  # inflates only the header (a few hundred bytes)
        version = np.lib.format.read_magic(f)
        read_header = _NPY_HEADER_READERS.get(version)
        if read_header is None:
            raise InvalidInput(f"{where} has npy format version {version}; expected 1.0 or 2.0", param=name)
        shape, fortran, dtype = read_header(f, max_header_size=_NPY_HEADER_MAX)
        offset = f.tell()
    if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        raise InvalidInput(f"{where} has dtype {dtype}; expected float16/32/64", param=name)
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidInput(f"{where} has an invalid shape {shape!r}", param=name)
    member = NpyMember(key, info, dtype, tuple(shape), bool(fortran), offset)
    if info.file_size != offset + member.nbytes:  # a header claiming more (or less) than the data holds
        raise InvalidInput(
            f"{where}: its npy header describes a {list(shape)} {dtype} array of {member.nbytes} bytes, but "
            f"the archive holds {info.file_size - offset} bytes of data for it",
            param=name,
        )
    return member


def npz_members(zf: zipfile.ZipFile, name: str = "file", max_bytes: int | None = None) -> list[NpyMember]:
    """The arrays of an npz archive from its zip directory and npy headers, checked before any array
    data is inflated: float arrays only, sizes consistent, in total at most `max_bytes` (TooLarge),
    and no more compressed than weights can be (a zip bomb is refused from its declared sizes)."""
    infos = zf.infolist()
    if len(infos) > _NPZ_MAX_MEMBERS:
        raise InvalidInput(
            f"{name}: {len(infos)} members in the npz archive; at most {_NPZ_MAX_MEMBERS}", name
        )
    total = sum(i.file_size for i in infos)
    if max_bytes is not None and total > max_bytes:
        raise TooLarge(
            f"{name}: the npz archive unpacks to {total} bytes, over the limit of {max_bytes}", name
        )
    packed = sum(i.compress_size for i in infos)
    if total > _NPZ_MAX_RATIO * packed + _NPZ_RATIO_SLACK:
        raise InvalidInput(
            f"{name}: the npz archive declares {total} bytes packed into {packed} (over {_NPZ_MAX_RATIO}:1); "
            "weights do not compress that well, so it is refused unpacked (zip bomb)",
            param=name,
        )
    members, seen = [], set()
    for info in infos:
        if not info.filename.endswith(".npy") or info.filename in seen:
            raise InvalidInput(
                f"{name}: unexpected or repeated member {info.filename!r} in the npz archive", name
            )
        if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise InvalidInput(
                f"{name}: npz member {info.filename!r} is encrypted or not stored/deflated", name
            )
        seen.add(info.filename)
        members.append(_npy_header(zf, info, name))
    return members


def _read_member(zf: zipfile.ZipFile, m: NpyMember) -> np.ndarray:
    """The member's array, inflating exactly the bytes its checked header declares (never more)."""
    arr = np.empty(m.shape[::-1] if m.fortran else m.shape, dtype=m.dtype)
    view = memoryview(arr.reshape(-1).view(np.uint8))
    with zf.open(m.info) as f:
        f.read(m.data_offset)
        got = 0
        while got < m.nbytes:
            n = f.readinto(view[got : got + _READ_CHUNK])  # chunked: no second full-size copy
            if not n:
                raise EOFError(f"member {m.info.filename!r} ends after {got} of {m.nbytes} bytes")
            got += n
        if f.read(1):  # also makes zipfile check the CRC
            raise ValueError(f"member {m.info.filename!r} holds more data than its header declares")
    arr = arr.T if m.fortran else arr
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))


def sae_max_bytes(d_in: int, d_sae: int) -> int:
    """The most the arrays of an SAE of these dimensions can take in an npz: two matrices and at most
    eight vectors (biases, threshold, gates, scaling factor), float64 at worst, plus npy headers."""
    return 8 * (2 * d_in * d_sae + 8 * (d_in + d_sae)) + _NPZ_MAX_MEMBERS * _NPY_HEADER_MAX


def npz_unpacked_bytes(path: Path) -> int | None:
    """What a zip archive's directory says its members unpack to (nothing inflated); None: not a zip."""
    try:
        with zipfile.ZipFile(path) as zf:
            return sum(i.file_size for i in zf.infolist())
    except (zipfile.BadZipFile, OSError):
        return None


def read_npz(path: Path, name: str = "file", max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Arrays of a `.npz` archive, float and finite only; nothing unpickled. Sizes are checked from the
    zip directory and npy headers first (`npz_members`), then each array is inflated into its buffer."""
    out: dict[str, torch.Tensor] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for member in npz_members(zf, name, max_bytes):
                out[member.key] = torch.from_numpy(_read_member(zf, member))
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError) as exc:
        raise InvalidInput(f"{name} is not a valid npz archive: {exc}", param=name) from None
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
