"""A registry-only app for the HTTP tests: our router + the OpenAI error handlers + app.state
(a Registry, the ModelInfo of a made-up model, a Config), served by a real uvicorn server on a free
loopback port, in a thread (`ThreadServer`) or as its own process (`python app_process.py DIR PORT`).
"""

from __future__ import annotations

import dataclasses
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from steerserve.api.errors import install_error_handlers
from steerserve.api.routes_registry import router
from steerserve.config import Config, RegistryConfig, ServerConfig
from steerserve.registry import Registry
from steerserve.types.model import ModelInfo

MODEL = ModelInfo(name="toy", architecture="gpt2", d_model=16, n_layers=4, vocab_size=100, max_model_len=64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_app(
    data_dir: Path,
    registry_config: RegistryConfig | None = None,
    max_upload_mb: int = 1,
    api_keys: tuple[str, ...] = (),
    admin_keys: tuple[str, ...] = (),
) -> FastAPI:
    """`registry_config` None: SQLite and blobs in `data_dir`."""
    cfg = registry_config or RegistryConfig(data_dir=str(data_dir), registry_url=None, blob_url=None)
    cfg = dataclasses.replace(cfg, max_upload_mb=max_upload_mb)
    app = FastAPI()
    app.include_router(router)
    install_error_handlers(app)
    app.state.registry = Registry.from_config(cfg)
    app.state.model_info = MODEL
    app.state.config = Config(registry=cfg, server=ServerConfig(api_keys=api_keys, admin_keys=admin_keys))
    return app


class ThreadServer:
    """uvicorn serving `app` on 127.0.0.1:<free port> from a background thread."""

    def __init__(self, app: FastAPI):
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.app.state.registry.close()


if __name__ == "__main__":
    uvicorn.run(make_app(Path(sys.argv[1])), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
