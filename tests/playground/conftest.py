"""A real server for the playground tests, and a headless Chromium driven by Playwright.

The browser is Debian's `chromium` (`.ci/run` installs it); Playwright only drives it, it never
downloads one. Without either, the browser tests skip and say which is missing (under CI they fail).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest
from safetensors.torch import save

from tests.e2e.conftest import D_MODEL, D_SAE, sae_state
from tests.registry.helpers import saelens_cfg
from tests.server_process import ServerProcess

API_KEY = "playground-test-key"


@dataclass(frozen=True)
class Scenario:
    """What the browser tests need from a served model: how to start it, what to store in its
    registry, and which feature to find and steer with."""

    server_args: list[str]
    register: Callable[[str, dict], None]  # (server url, auth headers) -> SAEs, labels, vectors, variants
    model_name: str
    query: str  # typed into the feature search
    feature: str  # the name the page gives the hit to add: "label (sae #index)"
    strength: float  # an add strength that visibly changes the completion
    prompt: str


def register_random_sae(url: str, headers: dict) -> None:
    """A random SAE `sae0` at blocks.0.hook_resid_post with labelled features, a vector, a variant.

    Feature 4 ("cold") reads back what it writes (encoder column = decoder row / its squared norm), as a
    trained SAE's features roughly do: adding it raises its own activation by the strength."""
    cfg = saelens_cfg("standard", 6, hook="blocks.0.hook_resid_post", d_in=D_MODEL, d_sae=D_SAE)
    state = sae_state()
    state["W_enc"][:, 4] = state["W_dec"][4] / state["W_dec"][4].square().sum()
    files = {
        "cfg": ("cfg.json", json.dumps(cfg), "application/json"),
        "weights": ("sae_weights.safetensors", io.BytesIO(save(state)), "application/octet-stream"),
    }
    r = httpx.post(url + "/v1/saes", files=files, data={"id": "sae0"}, headers=headers)
    assert r.status_code == 201, r.text
    labels = [
        {"index": 4, "label": "cold", "max_activation": 3.0},
        {"index": 9, "label": "cold drinks", "max_activation": 2.0},
        {"index": 17, "label": "warm weather"},
        {"index": 30, "label": "animals"},
    ]
    r = httpx.put(url + "/v1/saes/sae0/features", json=labels, headers=headers)
    assert r.status_code == 200, r.text
    vec = [((i * 37) % 11 - 5) / 2.0 for i in range(D_MODEL)]
    r = httpx.post(url + "/v1/vectors", json={"id": "vec0", "layer": 1, "vector": vec}, headers=headers)
    assert r.status_code == 201, r.text
    variant = {
        "id": "chilly",
        "steering": [{"feature": {"sae": "sae0", "index": 4}, "mode": "add", "strength": 3.0}],
    }
    r = httpx.post(url + "/v1/variants", json=variant, headers=headers)
    assert r.status_code == 201, r.text


RANDOM_GPT2 = Scenario(
    server_args=["--model", "random:gpt2"],
    register=register_random_sae,
    model_name="random:gpt2",
    query="cold",
    feature="cold (sae0 #4)",
    strength=8.0,
    prompt="The weather today is",
)
SCENARIO = RANDOM_GPT2  # the one line to change to run the tests against the demo model


@pytest.fixture(scope="session")
def scenario() -> Scenario:
    return SCENARIO


@pytest.fixture(scope="session")
def playground_server(scenario, tmp_path_factory):
    """A real server with an API key, its registry filled by the scenario."""
    log = tmp_path_factory.mktemp("playground") / "server.log"
    args = [*scenario.server_args, "--api-key", API_KEY, "--threads", "1", "--kv-cache-memory-gb", "0.05"]
    proc = ServerProcess(args, str(log)).wait_healthy()
    proc.headers = {"Authorization": f"Bearer {API_KEY}"}
    try:
        scenario.register(proc.url, proc.headers)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def chromium():
    """A headless Chromium (the system one) under Playwright; skips when either is missing."""
    # NOTE: CI (CI=true) installs both, so there a missing one fails instead of silently skipping.
    missing = pytest.fail if os.environ.get("CI") else pytest.skip
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        missing("no system chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright package is missing (pip install -e '.[dev]')")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture()
def page(chromium, playground_server, screenshots, request):
    context = chromium.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(45_000)  # generous: CI and dev boxes may be busy
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    screenshots(page, f"last-{request.node.name}")  # how the page looked when the test ended
    context.close()
    assert not errors, f"uncaught JavaScript errors on the page: {errors}"


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory):
    """shot(page, name): a full-page PNG under $PLAYGROUND_SCREENSHOTS (or a pytest tmp dir)."""
    folder = os.environ.get("PLAYGROUND_SCREENSHOTS") or str(tmp_path_factory.mktemp("screenshots"))
    os.makedirs(folder, exist_ok=True)

    def shot(page, name: str) -> str:
        path = os.path.join(folder, f"{name}.png")
        page.screenshot(path=path, full_page=True)
        print(f"screenshot: {path}")
        return path

    return shot
