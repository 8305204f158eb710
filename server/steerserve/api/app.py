"""The FastAPI application: state, routers, error handlers, lifespan (engine start and stop)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from steerserve.api import routes_contrast, routes_generate, routes_interp, routes_openai, routes_registry
from steerserve.api.auth import require_api_key
from steerserve.api.errors import APIError, document_errors, error_body, install_error_handlers
from steerserve.api.executors import REGISTRY_POOL, run_in
from steerserve.api.jsonsafe import SafeJSONResponse
from steerserve.api.limits import RequestLimits
from steerserve.api.routes_playground import install_playground
from steerserve.api.services import Services
from steerserve.config import Config
from steerserve.cpu_threads import serialize_this_thread
from steerserve.engine.admission import Admission
from steerserve.engine.engine import AsyncEngine
from steerserve.gc_heap import GCPauses, freeze_startup_heap, thaw_heap
from steerserve.registry import NotFound
from steerserve.registry.records import VariantRecord
from steerserve.types.model import ModelInfo

logger = logging.getLogger(__name__)
service = APIRouter()


@service.get("/health")
async def health(request: Request):
    engine: AsyncEngine | None = getattr(request.app.state, "engine", None)
    if engine is None:
        return JSONResponse(error_body(503, "the model is loading"), status_code=503)
    if engine.dead is not None:
        return JSONResponse(
            error_body(503, f"the engine is dead: {engine.dead}", code="engine_dead"), status_code=503
        )
    if engine.draining:
        body = error_body(503, "the server is shutting down", code="shutting_down")
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    return {"status": "ok"}


@service.get("/metrics")
async def metrics(request: Request):
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _base_model_card(info: ModelInfo) -> dict:
    return {
        "id": info.name,
        "object": "model",
        "created": 0,
        "owned_by": "steerserve",
        "max_model_len": info.max_model_len,
    }


def _variant_card(info: ModelInfo, variant: VariantRecord) -> dict:
    return {
        "id": f"{info.name}:{variant.id}",
        "object": "model",
        "created": int(variant.created),
        "owned_by": "steerserve",
        "parent": info.name,
    }


@service.get("/v1/models", dependencies=[Depends(require_api_key)])
async def models(request: Request):
    info = request.app.state.model_info
    variants = await run_in(REGISTRY_POOL, request.app.state.registry.list_variants)
    return {"object": "list", "data": [_base_model_card(info), *(_variant_card(info, v) for v in variants)]}


@service.get("/v1/models/{model_id:path}", dependencies=[Depends(require_api_key)])
async def retrieve_model(model_id: str, request: Request):
    """One entry of the list (`client.models.retrieve`): the served model or `<model>:<variant>`."""
    info = request.app.state.model_info
    if model_id == info.name:
        return _base_model_card(info)
    prefix = info.name + ":"
    if model_id.startswith(prefix):
        try:
            variant = await run_in(
                REGISTRY_POOL, request.app.state.registry.get_variant, model_id[len(prefix) :]
            )
        except NotFound:
            pass
        else:
            return _variant_card(info, variant)
    raise APIError(404, f"model {model_id!r} does not exist: see GET /v1/models", "model", "model_not_found")


def create_app(config: Config, start: Callable[[], Services]) -> FastAPI:
    """The app; `start()` (the composition root's) loads the model and builds the engine at start-up."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        services = start()
        # NOTE: the model was loaded on this thread; its OpenMP workers would slow every step of the
        # engine thread's (cpu_threads.py)
        serialize_this_thread()
        app.state.registry = services.registry
        app.state.readout = services.readout
        app.state.grammars = services.grammars
        adm = config.admission
        per_call = adm.max_queued_per_call or config.scheduler.max_num_seqs
        engine = AsyncEngine(
            services.core,
            Admission(adm.max_queued_requests, adm.max_queued_tokens, adm.retry_after_s, per_call),
        )
        app.state.model_info = services.info
        app.state.tokenizer = services.tokenizer
        app.state.metrics = services.metrics
        engine.start()
        app.state.engine = engine
        # NOTE: last, once everything start-up builds exists: collections then skip it (gc_heap.py)
        freeze_startup_heap()
        services.metrics.gc_pauses = pauses = GCPauses().install()
        try:
            yield
        finally:
            pauses.remove()
            engine.shutdown()
            services.close()
            thaw_heap()

    app = FastAPI(
        title="steerserve", version="0.1.0", lifespan=lifespan, default_response_class=SafeJSONResponse
    )
    app.state.config = config
    app.state.engine = None
    install_error_handlers(app)
    document_errors(app)
    adm = config.admission
    app.add_middleware(
        RequestLimits,
        max_body_bytes=int(adm.max_body_mb * (1 << 20)),
        max_header_bytes=int(adm.max_header_kb * 1024),
    )
    app.include_router(service)
    app.include_router(routes_openai.router)
    app.include_router(routes_generate.router)
    app.include_router(routes_registry.router)
    app.include_router(routes_interp.router)
    app.include_router(routes_contrast.router)
    install_playground(app)
    return app
