"""Tensor parallelism end to end (issue 24): `steerserve serve -tp 2` (two real processes, gloo, the
ranks started by the server itself) answers exactly what `-tp 1` answers, token for token, unsteered and
under every steering mode at resid_pre and resid_post, feature logit bias, `when` gates and `stop_when`;
`/v1/inspect` agrees; and a rank killed mid-generation ends the requests in flight with an error, turns
/health 503 and stops the server with nothing left running."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import save

from tests.registry.helpers import rand_state, saelens_cfg
from tests.server_process import ServerProcess

D_MODEL, D_SAE = 64, 48  # runner/model_loader.py's tiny llama-like configs
PROMPTS = ["The weather today is", "Once upon a time there", "1, 2, 3, 4,"]
COMMON = ["--dtype", "float32", "--threads", "1", "--kv-cache-memory-gb", "0.02", "--max-num-seqs", "16"]


def start(tmp_path_factory, arch: str, tp: int) -> ServerProcess:
    log = tmp_path_factory.mktemp(f"tp{tp}-{arch}") / "server.log"
    return ServerProcess(["--model", f"random:{arch}", "-tp", str(tp), *COMMON], str(log)).wait_healthy()


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma2"])
def pair(request, tmp_path_factory):
    """(TP=1 server, TP=2 server) on the same random weights, each with the same SAEs and vectors."""
    one = start(tmp_path_factory, request.param, 1)
    two = start(tmp_path_factory, request.param, 2)
    ranks = children(two.proc.pid)
    try:
        assert len(ranks) == 1  # rank 1, started by the server
        assert "tensor-parallel rank 0 of 2 joined" in two.log_tail(20000)
        for server in (one, two):
            register(server)
        yield one, two
    finally:
        one.stop()
        two.stop()
    assert two.proc.returncode == 0 and not any(alive(pid) for pid in ranks)  # SIGTERM: both ranks end


def register(server: ServerProcess) -> None:
    for sae_id, hook, seed in (
        ("post0", "blocks.0.hook_resid_post", 3),
        ("pre1", "blocks.1.hook_resid_pre", 4),
    ):
        cfg = saelens_cfg("standard", 6, hook=hook, d_in=D_MODEL, d_sae=D_SAE)
        cfg["d_in"], cfg["d_sae"] = D_MODEL, D_SAE
        state = rand_state("standard", D_MODEL, D_SAE, seed=seed)
        state["W_dec"] = state["W_dec"] * 8  # strong enough to change this tiny model's text
        files = {
            "cfg": ("cfg.json", json.dumps(cfg), "application/json"),
            "weights": ("sae_weights.safetensors", io.BytesIO(save(state)), "application/octet-stream"),
        }
        r = httpx.post(server.url + "/v1/saes", files=files, data={"id": sae_id}, timeout=60)
        assert r.status_code == 201, r.text
    for vec_id, where, k in (
        ("vpost0", {"layer": 0}, 37),
        ("vpre1", {"site": "blocks.1.hook_resid_pre"}, 53),
    ):
        vec = [((i * k) % 13 - 6) / 2.0 for i in range(D_MODEL)]
        r = httpx.post(server.url + "/v1/vectors", json={"id": vec_id, "vector": vec, **where}, timeout=60)
        assert r.status_code == 201, r.text


def generate(server: ServerProcess, prompt: str, **extra) -> dict:
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True, **extra}
    r = httpx.post(server.url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def feature(sae: str, index: int) -> dict:
    return {"sae": sae, "index": index}


def every_mode() -> dict[str, list[dict]]:
    """Each feature mode at both SAEs' sites and each vector mode at both vectors' sites, plus positions
    and a `when` gate."""
    cases: dict[str, list[dict]] = {}
    for sae, index in (("post0", 3), ("pre1", 5)):
        f = feature(sae, index)
        cases[f"feature_add_{sae}"] = [{"feature": f, "mode": "add", "strength": 6.0}]
        cases[f"feature_clamp_{sae}"] = [{"feature": f, "mode": "clamp", "value": 8.0}]
        cases[f"feature_scale_{sae}"] = [{"feature": f, "mode": "scale", "factor": 4.0}]
        cases[f"feature_ablate_{sae}"] = [{"feature": feature(sae, 2), "mode": "ablate"}]
    for vec in ("vpost0", "vpre1"):
        cases[f"vector_add_{vec}"] = [{"vector": vec, "mode": "add", "strength": 3.0}]
        cases[f"project_out_{vec}"] = [{"vector": vec, "mode": "project_out"}]
        cases[f"vector_clamp_{vec}"] = [{"vector": vec, "mode": "clamp", "min": -0.5, "max": 0.5}]
    cases["vector_add_generated"] = [
        {"vector": "vpre1", "mode": "add", "strength": 3.0, "positions": "generated"}
    ]
    cases["gated_add"] = [
        {"vector": "vpre1", "mode": "add", "strength": 4.0,
         "when": {"feature": feature("post0", 3), "above": 0.05}}
    ]  # fmt: skip
    return cases


STEERING = every_mode()


def test_tp2_equals_tp1_unsteered_and_under_every_steering_mode(pair):
    one, two = pair
    changed = 0
    for prompt in PROMPTS[:2]:
        plain = generate(one, prompt)
        assert generate(two, prompt)["token_ids"] == plain["token_ids"], prompt
        for name, steering in STEERING.items():
            a, b = generate(one, prompt, steering=steering), generate(two, prompt, steering=steering)
            assert b["token_ids"] == a["token_ids"], (prompt, name)
            changed += a["token_ids"] != plain["token_ids"]
        bias = {"feature_logit_bias": [{"feature": feature("post0", 3), "strength": 4.0}]}
        a, b = generate(one, prompt, **bias), generate(two, prompt, **bias)
        assert b["token_ids"] == a["token_ids"], (prompt, "feature_logit_bias")
        changed += a["token_ids"] != plain["token_ids"]
    assert changed >= len(STEERING), "the steering barely changed the text: a weak test"


def test_tp2_stop_when_and_inspect_equal_tp1(pair):
    one, two = pair
    plain = generate(one, PROMPTS[0])
    text = PROMPTS[0] + plain["text"]
    ins = [
        httpx.post(s.url + "/v1/inspect", json={"text": text, "sae": "post0", "top_k": 5}, timeout=60).json()
        for s in (one, two)
    ]
    assert [t["token_id"] for t in ins[0]["tokens"]] == [t["token_id"] for t in ins[1]["tokens"]]
    for t1, t2 in zip(ins[0]["tokens"], ins[1]["tokens"], strict=True):
        assert [f["index"] for f in t1["features"]] == [f["index"] for f in t2["features"]]
        for f1, f2 in zip(t1["features"], t2["features"], strict=True):
            assert f2["activation"] == pytest.approx(f1["activation"], rel=1e-4, abs=1e-4)
    # stop_when on the feature strongest in the generated part, at half its peak: stops mid-way
    n_prompt = len(ins[0]["tokens"]) - len(plain["token_ids"])
    gen = ins[0]["tokens"][n_prompt:]
    best = max((f for t in gen for f in t["features"]), key=lambda f: f["activation"])
    stop = [{"feature": feature("post0", best["index"]), "above": best["activation"] / 2}]
    a, b = generate(one, PROMPTS[0], stop_when=stop), generate(two, PROMPTS[0], stop_when=stop)
    assert a["finish_reason"] == "feature_stop"
    assert (b["finish_reason"], b["token_ids"]) == (a["finish_reason"], a["token_ids"])


def children(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (from /proc/*/stat: no kernel option needed)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def assert_dies_unhealthy(server: ServerProcess, within: float) -> None:
    """The server answers /health 503 at least once, then exits non-zero, within `within` seconds."""
    saw_503 = False
    deadline = time.monotonic() + within
    while server.proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            saw_503 |= httpx.get(server.url + "/health", timeout=1).status_code == 503
        time.sleep(0.05)
    assert server.proc.poll() not in (None, 0), server.log_tail()
    assert saw_503, server.log_tail()


def test_killing_a_rank_fails_requests_in_flight_and_stops_the_server(tmp_path_factory):
    server = start(tmp_path_factory, "llama", 2)
    try:
        (rank1,) = children(server.proc.pid)
        body = {"prompt": "Hello", "max_tokens": 900, "temperature": 0, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", server.url + "/generate", json=body, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]")
                if len(events) == 5:
                    os.kill(rank1, signal.SIGKILL)
        assert "error" in events[-1] or "error" in events[-2], events[-3:]
        assert not any(isinstance(e, dict) and e.get("finish_reason") == "length" for e in events)
        assert_dies_unhealthy(server, within=30)
        assert "tensor-parallel rank 1 exited" in server.log_tail(1 << 20) or "ranks lost" in server.log_tail(
            1 << 20
        )
        assert not alive(rank1) and children(server.proc.pid) == []
    finally:
        server.stop()


def test_tp2_batched_requests_equal_tp1_alone(pair):
    """Twelve mixed requests at once (one batch on the TP=2 server, some steered, some not) get the
    tokens each gets alone on TP=1."""
    from concurrent.futures import ThreadPoolExecutor

    one, two = pair
    names = sorted(STEERING)[:9]
    cases = [(PROMPTS[i % 3], STEERING[names[i]] if i < len(names) else None) for i in range(12)]

    def run(server, case):
        prompt, steering = case
        return generate(server, prompt, **({"steering": steering} if steering else {}))["token_ids"]

    alone = [run(one, case) for case in cases]
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(lambda c: run(two, c), cases))
    assert together == alone


def test_two_torchrun_nodes_serve_what_tp1_serves(tmp_path):
    """The multi-machine launch: two torchrun agents (as on two nodes, here on loopback; static
    rendezvous at rank 0's address) each start one rank; rank 0 serves HTTP. A normal stop (SIGTERM to
    rank 0's agent) ends both ranks."""
    import subprocess
    import sys

    from tests.server_process import free_port

    port, master = free_port(), free_port()
    serve = ["-m", "steerserve.cli", "serve", "--model", "random:llama", "-tp", "2", *COMMON,
             "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(tmp_path / "data")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    agents, logs = [], []
    for node in (1, 0):
        logs.append(open(tmp_path / f"node{node}.log", "w"))  # noqa: SIM115 -- closed below
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(master), *serve]  # fmt: skip
        agents.append(subprocess.Popen(cmd, stdout=logs[-1], stderr=subprocess.STDOUT, env=env))
    one = ServerProcess(["--model", "random:llama", *COMMON], str(tmp_path / "tp1.log")).wait_healthy()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            assert all(a.poll() is None for a in agents), (tmp_path / "node0.log").read_text()[-3000:]
            time.sleep(0.2)
        for prompt in PROMPTS:
            body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            got = httpx.post(url + "/generate", json=body, timeout=60).json()["token_ids"]
            assert got == generate(one, prompt)["token_ids"]
        ranks = [c for a in agents for c in children(a.pid)]
        assert len(ranks) == 2
        agents[1].send_signal(signal.SIGTERM)  # rank 0's agent: it passes SIGTERM on, rank 0 drains
        for a in agents:
            a.wait(60)
        assert not any(alive(pid) for pid in ranks)
    finally:
        one.stop()
        for a in agents:
            if a.poll() is None:
                a.kill()
                a.wait()
        for f in logs:
            f.close()


def test_a_hung_rank_stops_the_server_after_the_timeout(tmp_path_factory):
    """Rank 1 frozen (SIGSTOP): the next step's collective waits --distributed-timeout-s, then the
    request fails, /health is 503 and the server exits non-zero; the frozen rank is killed, not left."""
    log = tmp_path_factory.mktemp("tp-hang") / "server.log"
    server = ServerProcess(
        ["--model", "random:llama", "-tp", "2", "--distributed-timeout-s", "4", *COMMON], str(log)
    ).wait_healthy()
    try:
        (rank1,) = children(server.proc.pid)
        time.sleep(3)  # idle longer than half the timeout: the heartbeats keep rank 1 waiting, not failing
        assert generate(server, "Hello")["finish_reason"] == "length"
        os.kill(rank1, signal.SIGSTOP)
        t0 = time.monotonic()
        r = httpx.post(server.url + "/generate", json={"prompt": "Hello", "max_tokens": 8}, timeout=60)
        assert r.status_code >= 500 and "error" in r.json(), r.text
        assert time.monotonic() - t0 >= 3.5  # it waited for the timeout, no sooner
        assert_dies_unhealthy(server, within=60)
        assert not alive(rank1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rank1, signal.SIGCONT)
        server.stop()
