"""Resource exhaustion through the registry (issue 18, section 5), against a real server process at the
default upload limit (2 GiB), with wall time and the server's peak RSS measured around each request
(`/proc/PID/status` VmHWM, reset through `/proc/PID/clear_refs` before each case).

Before the fix: an npz zip bomb (1 MB inflating to 1 GiB) cost 20 s and 2.6 GB before its 400, an
8 KB search of repeated terms 10 s, and a 98 MB `PUT /features` ~1 GB of RSS. The bounds here are
generous (machines differ, other tests run beside); each is far below those numbers.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.torch import save

from tests.registry.app_process import free_port
from tests.registry.helpers import D_IN, rand_state, saelens_cfg

REPO = Path(__file__).resolve().parents[2]
D_SAE_BIG = 20_000  # features to search
BOMB_WIDTH = 16 << 20  # W_enc [16, 16M] float32: 1 GiB of zeros, ~1 MB deflated
_SERVE = (
    "import sys, uvicorn; from pathlib import Path; from tests.registry.app_process import make_app; "
    "uvicorn.run(make_app(Path(sys.argv[1]), max_upload_mb=2048), host='127.0.0.1', port=int(sys.argv[2]), "
    "log_level='warning')"
)
WORDS = [
    "cold",
    "snow",
    "ice",
    "winter",
    "frost",
    "heat",
    "summer",
    "sun",
    "rain",
    "storm",
    "wind",
    "cloud",
    "river",
    "mountain",
    "forest",
    "ocean",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A registry server process (default 2 GiB upload limit) holding an SAE with 20k labelled features."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE, str(tmp_path_factory.mktemp("data")), str(port)], cwd=REPO
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(url + "/v1/saes", timeout=1)
            break
        except httpx.TransportError:
            assert proc.poll() is None and time.monotonic() < deadline, "the registry server did not start"
            time.sleep(0.1)
    cfg = saelens_cfg("standard", 6, d_sae=D_SAE_BIG)
    files = {"cfg": ("cfg.json", json.dumps(cfg)),
             "weights": ("w.safetensors", save(rand_state("standard", d_sae=D_SAE_BIG)))}  # fmt: skip
    assert httpx.post(url + "/v1/saes", files=files, data={"id": "big"}, timeout=60).status_code == 201
    rng = np.random.default_rng(0)
    labels = [{"index": i, "label": " ".join(rng.choice(WORDS, 3)), "explanation": " ".join(rng.choice(WORDS, 8))}
              for i in range(D_SAE_BIG)]  # fmt: skip
    assert httpx.put(url + "/v1/saes/big/features", json=labels, timeout=120).status_code == 200
    yield url, proc.pid
    proc.terminate()
    proc.wait(timeout=30)


def _status(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        rows = dict(line.split(":", 1) for line in f)
    return {k: int(rows[k].split()[0]) << 10 for k in ("VmHWM", "VmRSS")}


def measure(pid: int, fn):
    """(fn(), seconds, the server's peak RSS growth in bytes while fn ran)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status(pid)["VmRSS"]
    start = time.monotonic()
    out = fn()
    seconds, peak = time.monotonic() - start, _status(pid)["VmHWM"] - before
    print(
        f"{getattr(out, 'status_code', '')} {seconds:.2f} s, peak RSS +{peak / 2**20:.0f} MiB"
    )  # -s shows it
    return out, seconds, peak


# ---- npz zip bombs ---------------------------------------------------------------------------------


def _npy_header(shape: tuple[int, ...]) -> bytes:
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"
    text += " " * (-(len(text) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode()


def _deflate_zeros(prefix: bytes, zero_mib: int) -> bytes:
    """Raw deflate of `prefix` + zero_mib MiB of zeros, in ~1 KB per MiB (one full-flushed block, repeated)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(1 << 20)
    c.compress(zeros), c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)  # identical for every further MiB
    return head + block * (zero_mib - 1) + c.flush(zlib.Z_FINISH)


def _zip(entries: list[tuple[str, bytes, int, int]]) -> bytes:
    """A zip archive from (name, raw deflate data, crc32, declared size) entries, headers as declared."""
    out, central = bytearray(), bytearray()
    for name, data, crc, size in entries:
        fields = struct.pack("<HHHHHIII", 20, 0, 8, 0, 0, crc, len(data), size)
        central += (
            struct.pack("<IH", 0x02014B50, 20)
            + fields
            + struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, 0, len(out))
        )
        central += name.encode()
        out += (
            struct.pack("<I", 0x04034B50) + fields + struct.pack("<HH", len(name), 0) + name.encode() + data
        )
    n = len(entries)
    return bytes(out + central + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(central), len(out), 0))


def zip_bomb() -> bytes:
    """params.npz whose W_enc.npy honestly declares [16, 16M] float32 (1 GiB), in ~1 MB."""
    header = _npy_header((D_IN, BOMB_WIDTH))
    crc = zlib.crc32(header)
    zeros = bytes(1 << 20)
    for _ in range(BOMB_WIDTH * 4 >> 20):
        crc = zlib.crc32(zeros, crc)
    return _zip(
        [("W_enc.npy", _deflate_zeros(header, BOMB_WIDTH * 4 >> 20), crc, len(header) + BOMB_WIDTH * 4)]
    )


def lying_bomb() -> bytes:
    """A valid Gemma Scope npz, except W_enc's deflate stream goes on for 1 GiB past the size its zip
    headers declare (and its CRC covers): a reader that trusts the stream over the headers inflates it all."""
    state = {k: v.numpy() for k, v in rand_state("jumprelu").items()}
    entries = []
    for name, arr in state.items():
        data = _npy_header(arr.shape) + arr.astype("<f4").tobytes()
        if name == "W_enc":
            c = zlib.compressobj(9, zlib.DEFLATED, -15)
            packed = c.compress(data) + c.flush(zlib.Z_FULL_FLUSH) + _deflate_zeros(b"", 1024)
        else:
            c = zlib.compressobj(9, zlib.DEFLATED, -15)
            packed = c.compress(data) + c.flush()
        entries.append((f"{name}.npy", packed, zlib.crc32(data), len(data)))
    return _zip(entries)


def upload(url: str, npz: bytes, cfg: dict | None, sae_id: str, **fields) -> httpx.Response:
    files = {"weights": ("params.npz", npz)}
    if cfg is not None:
        files["cfg"] = ("cfg.json", json.dumps(cfg))
    return httpx.post(url + "/v1/saes", files=files, data={"id": sae_id, **fields}, timeout=120)


@pytest.mark.parametrize("with_cfg", [True, False], ids=["cfg", "gemmascope-no-cfg"])
def test_npz_zip_bomb_is_refused_from_its_declared_sizes(server, with_cfg):
    url, pid = server
    bomb = zip_bomb()
    assert len(bomb) < 2 << 20
    cfg = saelens_cfg("jumprelu", 6, apply_b_dec_to_input=False) if with_cfg else None
    r, seconds, peak = measure(pid, lambda: upload(url, bomb, cfg, "bomb", layer="" if with_cfg else "2"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "weights", r.text
    assert seconds < 5 and peak < 100 << 20, (seconds, peak)  # before: 20 s, 2.6 GB
    assert httpx.get(url + "/v1/saes/bomb").status_code == 404


def test_npz_inflation_stops_at_the_declared_bytes(server):
    url, pid = server
    cfg = saelens_cfg("jumprelu", 6, apply_b_dec_to_input=False)
    r, seconds, peak = measure(pid, lambda: upload(url, lying_bomb(), cfg, "capped"))
    # what the headers declare is a valid SAE; the 1 GiB after it is never inflated
    assert r.status_code == 201 and r.json()["d_sae"] == 64, r.text
    assert seconds < 10 and peak < 100 << 20, (seconds, peak)
    assert httpx.delete(url + "/v1/saes/capped").status_code == 200


# ---- feature search ----------------------------------------------------------------------------------


def test_search_is_bounded(server):
    url, pid = server
    search = lambda q: httpx.get(url + "/v1/features/search", params={"q": q, "sae": "big"}, timeout=60)  # noqa: E731
    r, seconds, _ = measure(pid, lambda: search("cold " * 1640))  # the 8 KB URL
    assert r.status_code == 400 and r.json()["error"]["param"] == "q" and seconds < 2, (r.text, seconds)
    r = search(" ".join(WORDS) + " extra")  # 17 distinct words
    assert r.status_code == 400 and r.json()["error"]["param"] == "q", r.text
    # the largest query allowed: 512 characters, every word repeated (they count once)
    q = (" ".join(w[:4] for w in WORDS) + " ") * 6
    q = q[:512]
    r, seconds, peak = measure(pid, lambda: search(q))
    assert r.status_code == 200 and seconds < 3 and peak < 64 << 20, (r.text[:200], seconds, peak)
    # repeats do not change the answer
    once = search("cold snow")
    assert once.status_code == 200 and once.json()["data"]
    assert search("cold snow cold snow SNOW cold").json()["data"] == once.json()["data"]


# ---- PUT /features body limit ----------------------------------------------------------------------


def _put_raw(port: int, total: int, chunked: bool) -> tuple[bytes, bool]:
    """PUT /v1/saes/big/features with a `total`-byte body (declared, or chunked); the reply's head."""
    head = "PUT /v1/saes/big/features HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {total}\r\n\r\n"
    piece = b"[" + b'{"index": 1, "label": "x"},' * 37_000  # ~1 MB of valid-looking JSON
    reply = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head.encode())

        def send() -> None:
            sent = 0
            try:
                while sent < total:
                    data = piece[: total - sent]
                    sock.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                    sent += len(data)
            except OSError:  # the server answered and closed: the rest is not wanted
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            while b"\r\n\r\n" not in reply:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except OSError:
            pass
    return bytes(reply), sender.is_alive()


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
def test_put_features_has_its_own_body_limit(server, chunked):
    url, pid = server
    port = int(url.rsplit(":", 1)[1])
    before = httpx.get(url + "/v1/saes/big/features/1").json()
    (reply, _), seconds, peak = measure(pid, lambda: _put_raw(port, 98 << 20, chunked))
    assert reply.startswith(b"HTTP/1.1 413"), reply[:300]
    # declared: refused unread; chunked: read to the 32 MiB limit (+8 MiB drained), never the whole 98 MB
    assert seconds < 20 and peak < (64 << 20 if not chunked else 256 << 20), (seconds, peak)
    assert httpx.get(url + "/v1/saes/big/features/1").json() == before
    small = [{"index": 1, "label": before["label"]}]  # a normal PUT still works
    assert httpx.put(url + "/v1/saes/big/features", json=small).status_code == 200
