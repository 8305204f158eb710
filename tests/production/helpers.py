"""Small clients for the production tests: an SAE upload, streamed calls read in a thread."""

from __future__ import annotations

import io
import json
import threading

import httpx
from safetensors.torch import save

from tests.e2e.conftest import D_MODEL, D_SAE, sae_state
from tests.registry.helpers import saelens_cfg

GREEDY = {"temperature": 0, "ignore_eos": True}


def upload_sae(url: str, sae_id: str, headers: dict | None = None) -> httpx.Response:
    cfg = saelens_cfg("standard", 6, hook="blocks.0.hook_resid_post", d_in=D_MODEL, d_sae=D_SAE)
    files = {
        "cfg": ("cfg.json", json.dumps(cfg), "application/json"),
        "weights": ("sae.safetensors", io.BytesIO(save(sae_state())), "application/octet-stream"),
    }
    return httpx.post(url + "/v1/saes", files=files, data={"id": sae_id}, headers=headers or {}, timeout=60)


class StreamedCall(threading.Thread):
    """POST a streamed completion in a thread: `.chunks` (parsed events), `.status`, `.started` (set at
    the first chunk), `.done` (saw [DONE])."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, {**body, "stream": True, "stream_options": {"include_usage": True}}
        self.chunks: list[dict] = []
        self.status: int | None = None
        self.started = threading.Event()
        self.done = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=self.body, timeout=120) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        self.chunks.append(json.loads(line[6:]))
                        self.started.set()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.started.set()

    @property
    def text(self) -> str:
        return "".join(c["choices"][0]["text"] for c in self.chunks if c.get("choices"))

    @property
    def finish_reason(self) -> str | None:
        reasons = [c["choices"][0]["finish_reason"] for c in self.chunks if c.get("choices")]
        return reasons[-1] if reasons else None

    @property
    def usage(self) -> dict | None:
        return next((c["usage"] for c in self.chunks if c.get("usage")), None)

    @property
    def errors(self) -> list[dict]:
        return [c["error"] for c in self.chunks if "error" in c]
