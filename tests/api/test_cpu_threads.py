"""One OpenMP pool per server process (steerserve/cpu_threads.py): a thread that called
`serialize_this_thread` holds no OpenMP workers and computes on itself alone, other threads keep their
thread count; in the real app, the event loop's thread and the HTTP worker pools are serial and the
engine thread alone runs torch's thread count.

Both run in a subprocess: the checks count the process's threads and change per-thread OpenMP settings,
which must not leak into the test process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from steerserve.cpu_threads import openmp_runtime

pytestmark = pytest.mark.skipif(
    openmp_runtime() is None, reason="no OpenMP runtime with pause support loaded by torch here"
)


def _run(script: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "3"}  # NOTE: every new thread's default, torch's count aside
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


FUNCTION_SCRIPT = """
import json, os, threading
import torch
from steerserve.cpu_threads import serialize_this_thread

torch.set_num_threads(3)
x = torch.randn(1 << 22)
want = torch.exp(x)  # a parallel op on the main thread: its pool of 2 workers
tasks = lambda: len(os.listdir("/proc/self/task"))
seen = {}

def other():
    torch.exp(x)  # this thread's own pool: 2 more workers
    seen["with_pool"] = tasks()
    seen["did"] = serialize_this_thread()
    seen["after"] = tasks()
    seen["count_here"] = torch.get_num_threads()
    got = torch.exp(x)  # serial now: no new worker
    seen["after_op"] = tasks()
    seen["same"] = bool(torch.equal(got, want))

t = threading.Thread(target=other)
t.start()
t.join()
seen["count_main"] = torch.get_num_threads()
before = tasks()
torch.exp(x)  # the main thread's pool is still there: nothing new
seen["main_unchanged"] = tasks() == before
print(json.dumps(seen))
"""


def test_serialize_frees_the_threads_workers_and_leaves_others_alone():
    seen = _run(FUNCTION_SCRIPT)
    assert seen["did"] is True
    assert seen["with_pool"] - seen["after"] == 2  # its two workers are gone
    assert seen["after_op"] == seen["after"]
    assert seen["count_here"] == 1
    assert seen["same"] is True
    assert seen["count_main"] == 3
    assert seen["main_unchanged"] is True


APP_SCRIPT = """
import json, sys
import torch
from starlette.testclient import TestClient
from steerserve.api.executors import GENERATION_POOL, REGISTRY_POOL
from steerserve.cli import add_serve_arguments, config_from_args
from steerserve.compose import create_server_app
import argparse

p = argparse.ArgumentParser()
add_serve_arguments(p)
a = p.parse_args(["--model", sys.argv[1], "--kv-cache-memory-gb", "0.02", "--data-dir", sys.argv[2]])
torch.set_num_threads(3)
app = create_server_app(config_from_args(a))
with TestClient(app) as client:
    r = client.post("/v1/completions", json={"model": a.model, "prompt": "hello", "max_tokens": 3})
    assert r.status_code == 200, r.text
    seen = {
        "loop": client.portal.call(torch.get_num_threads),
        "engine": app.state.engine.run_job(torch.get_num_threads).result(timeout=60),
        "generation_pool": GENERATION_POOL.submit(torch.get_num_threads).result(),
        "registry_pool": REGISTRY_POOL.submit(torch.get_num_threads).result(),
    }
print(json.dumps(seen))
"""


def test_app_keeps_parallel_compute_on_the_engine_thread(tiny_model_dir, tmp_path):
    seen = _run(APP_SCRIPT, tiny_model_dir("gpt2"), str(tmp_path))
    assert seen == {"loop": 1, "engine": 3, "generation_pool": 1, "registry_pool": 1}
