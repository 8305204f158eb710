"""Registry routes: SAEs, their features, steering vectors and variants (API.md, "Registry").

Reads `request.app.state.registry` (steerserve.registry.Registry), `.model_info` (the served
model, for fit checks: an SAE or vector must sit at an existing site with d == d_model) and
`.config.registry.max_upload_mb`. Writes need the admin key, reads an API key. Uploads are streamed
to disk under the size limit (413 once passed, nothing stored); JSON bodies (vectors, variants,
feature annotations) have their own, much smaller limit, and are parsed strictly (`storable`).
Every blocking call (parsing, disk, database) runs on `executors.REGISTRY_POOL`, never on the pool
that steered generation compiles in; every error is an APIError in the OpenAI shape.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from steerserve.api.auth import require_admin_key, require_api_key
from steerserve.api.errors import APIError
from steerserve.api.executors import REGISTRY_POOL, run_in
from steerserve.registry import formats
from steerserve.registry.errors import Conflict, InvalidInput, NotFound, RegistryError, TooLarge
from steerserve.registry.formats.common import site_of
from steerserve.registry.formats.neuronpedia import parse_features
from steerserve.registry.formats.vectors import from_json as vector_from_json
from steerserve.registry.registry import Registry
from steerserve.registry.samples import parse_vector_stats
from steerserve.registry.storable import (
    INT64_MAX,
    check_int,
    is_uint,
    parse_json,
    parse_uint,
)
from steerserve.registry.tensors import npz_unpacked_bytes, sae_max_bytes, sniff
from steerserve.registry.uploads import Form, receive_body, receive_form
from steerserve.registry.validate import check_id
from steerserve.steering.variants import parse_variant
from steerserve.types.sites import Site

router = APIRouter()
_admin = [Depends(require_admin_key)]
_reader = [Depends(require_api_key)]
_STATUS = {InvalidInput: 400, NotFound: 404, Conflict: 409, TooLarge: 413}
_MAX_SEARCH_LIMIT = 200
# NOTE: JSON bodies are parsed whole (~10x their size in memory): far below the upload limit. Feature
# annotations merge, so a larger export goes in several PUTs.
MAX_JSON_BODY_BYTES = 32 << 20


def _to_api(exc: RegistryError) -> APIError:
    status = next((s for cls, s in _STATUS.items() if isinstance(exc, cls)), 400)
    return APIError(status, exc.message, param=exc.param)


async def _run(fn: Callable, *args, **kwargs):
    """Blocking registry work on the registry's own pool, registry errors as API errors."""
    try:
        return await run_in(REGISTRY_POOL, fn, *args, **kwargs)
    except RegistryError as exc:
        raise _to_api(exc) from None


def _registry(request: Request) -> Registry:
    return request.app.state.registry


def _model(request: Request):
    """The served model's ModelInfo; uploads are checked against it, so none are taken before it loads."""
    info = getattr(request.app.state, "model_info", None)
    if info is None:
        raise APIError(503, "the model is still loading; uploads are checked against it, retry shortly",
                       headers={"Retry-After": "5"})  # fmt: skip
    return info


def _limit(request: Request) -> int:
    return int(request.app.state.config.registry.max_upload_mb) * 1024 * 1024


def _length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    return int(value) if value and is_uint(value) and len(value.strip()) <= 18 else None


async def _form(request: Request) -> Form:
    try:
        return await receive_form(
            request.stream(), request.headers.get("content-type", ""), _length(request), _limit(request),
            _registry(request).uploads_dir,
        )  # fmt: skip
    except RegistryError as exc:
        raise _to_api(exc) from None


async def _body(request: Request) -> bytearray:
    """A JSON body, under its own limit (413 while reading, before it is all in memory)."""
    try:
        return await receive_body(
            request.stream(),
            _length(request),
            min(_limit(request), MAX_JSON_BODY_BYTES),
            "the JSON body limit",
        )
    except RegistryError as exc:
        raise _to_api(exc) from None


async def _json(request: Request) -> object:
    return await _run(parse_json, await _body(request), "body")


def _site(fields: dict, required: bool = False) -> Site | None:
    """`site` (hook name or {"layer", "hook"}) or `layer` (resid_post of that layer); form fields are text."""
    if "site" in fields and "layer" in fields:
        raise InvalidInput("give one of 'layer' or 'site', not both", param="site")
    param = "site" if "site" in fields else "layer"
    value = fields.get(param)
    if value is None or value == "":
        if required:
            raise InvalidInput("a site is required: give 'layer' or 'site'", param="layer")
        return None
    return _site_value(value, param)


def _site_value(value: object, param: str) -> Site:
    """A site from JSON or from text (form and query fields: ASCII digits are a layer number)."""
    if isinstance(value, str) and is_uint(value):
        value = parse_uint(value, param)
    site = site_of(value, param)
    check_int(site.layer, param, 0, INT64_MAX)
    return site


def _optional_id(value: object, param: str = "id") -> str | None:
    return None if value in (None, "") else check_id(value, param)


def _listing(items: list) -> dict:
    return {"object": "list", "data": [item.to_json() for item in items]}


def _deleted(kind: str, item_id: str) -> dict:
    return {"id": item_id, "object": kind, "deleted": True}


def _exists(getter: Callable, item_id: str) -> bool:
    try:
        getter(item_id)
    except NotFound:
        return False
    return True


# ---- SAEs -----------------------------------------------------------------------------------------


def _import_sae(registry: Registry, form: Form, model, max_bytes: int):
    """cfg + weights from the form -> stored SAE record (runs in the thread pool)."""
    sae_id = _optional_id(form.fields.get("id"))
    if sae_id is not None and _exists(registry.get_sae, sae_id):  # before the (slow) load; add_sae rechecks
        raise Conflict(f"an SAE with id {sae_id!r} already exists", param="id")
    weights = form.files.get("weights")
    if weights is None:
        raise InvalidInput("the multipart field 'weights' (safetensors or npz file) is required", "weights")
    cfg_file = form.files.get("cfg")
    cfg = formats.read_json_file(cfg_file.path, "cfg") if cfg_file is not None else None
    if cfg_file is None and "cfg" in form.fields:  # sent as a text field rather than a file
        cfg = parse_json(form.fields["cfg"], "cfg")
    max_bytes = min(max_bytes, _check_npz_size(weights.path, cfg, model))
    loaded = formats.load_sae(weights.path, cfg, _site(form.fields), weights.filename or "", max_bytes)
    return registry.add_sae(loaded, sae_id=sae_id, fit=model)


def _check_npz_size(path, cfg: object, model) -> int:
    """The most an npz of an SAE with the cfg's d_sae at the model's d_model can unpack to; an archive
    declaring more is refused from its zip directory, before anything is inflated (zip bombs), and the
    loader inflates no more than that (`tensors.read_npz`)."""
    d_sae = cfg.get("d_sae") if isinstance(cfg, dict) else None
    if isinstance(d_sae, bool) or not isinstance(d_sae, int) or not 0 < d_sae <= INT64_MAX:
        return INT64_MAX  # no cfg (Gemma Scope): the upload limit and the compression-ratio bound apply
    bound = sae_max_bytes(model.d_model, d_sae)
    declared = npz_unpacked_bytes(path) if sniff(path) == "npz" else None
    if declared is not None and declared > bound:
        raise InvalidInput(
            f"weights: the npz archive declares {declared} bytes of arrays, more than an SAE with "
            f"d_in={model.d_model} (the model's d_model) and d_sae={d_sae} (cfg) can hold ({bound}); "
            "refused without unpacking it",
            param="weights",
        )
    return bound


@router.post("/v1/saes", status_code=201, dependencies=_admin)
async def create_sae(request: Request) -> JSONResponse:
    model = _model(request)
    form = await _form(request)
    try:
        rec = await _run(_import_sae, _registry(request), form, model, 8 * _limit(request))
    finally:
        form.cleanup()
    return JSONResponse(rec.to_json(), status_code=201)


@router.get("/v1/saes", dependencies=_reader)
async def list_saes(request: Request, model: str | None = None) -> dict:
    return _listing(await _run(_registry(request).list_saes, model))


@router.get("/v1/saes/{sae_id}", dependencies=_reader)
async def get_sae(request: Request, sae_id: str) -> dict:
    registry = _registry(request)
    rec = await _run(registry.get_sae, sae_id)
    return {**rec.to_json(), "features_annotated": await _run(registry.count_features, sae_id)}


@router.delete("/v1/saes/{sae_id}", dependencies=_admin)
async def delete_sae(request: Request, sae_id: str) -> dict:
    await _run(_registry(request).delete_sae, sae_id)
    return _deleted("sae", sae_id)


# ---- features -------------------------------------------------------------------------------------


@router.put("/v1/saes/{sae_id}/features", dependencies=_admin)
async def put_features(request: Request, sae_id: str) -> dict:
    body, registry = await _body(request), _registry(request)
    # our list or a Neuronpedia export (JSON, JSON Lines, gzip), parsed strictly by parse_features
    count = await _run(lambda: registry.put_features(sae_id, parse_features(body)))
    return {"sae": sae_id, "object": "features", "updated": count}


@router.get("/v1/saes/{sae_id}/features/{index}", dependencies=_reader)
async def get_feature(request: Request, sae_id: str, index: int) -> dict:
    info = await _run(_registry(request).get_feature, sae_id, index)
    out = {"object": "feature", **info.to_json(sae_id, sample=True)}
    if getattr(request.app.state, "readout", None) is not None:  # needs the served model
        from steerserve.api.routes_interp import feature_top_logits

        out["top_logits"] = await feature_top_logits(request, sae_id, index)
    return out


@router.get("/v1/features/search", dependencies=_reader)
async def search_features(
    request: Request,
    q: str | None = None,
    sae: str | None = None,
    limit: int = 20,
    promotes: str | None = None,
    site: str | None = None,
) -> dict:
    if not 1 <= limit <= _MAX_SEARCH_LIMIT:
        raise APIError(400, f"limit must be in 1..{_MAX_SEARCH_LIMIT}, got {limit}", param="limit")
    if promotes is not None:  # search by effect: needs the served model
        from steerserve.api.routes_interp import search_by_promotion

        return await search_by_promotion(request, promotes, sae, limit)
    if q is None or not q.strip():
        raise APIError(400, "q must not be empty (or search by effect with promotes=TOKEN)", param="q")
    try:
        where = _site_value(site, "site") if site is not None else None
    except RegistryError as exc:
        raise _to_api(exc) from None
    return _listing(await _run(_registry(request).search_features, q, sae, limit, where))


# ---- vectors --------------------------------------------------------------------------------------


def _vector_from_json(body: object):
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object", param=None)
    if "vector" not in body:
        raise InvalidInput("'vector' (a list of floats or base64 of float32) is required", param="vector")
    return _optional_id(body.get("id")), vector_from_json(body["vector"], _site(body, required=True)), {}


def _vector_from_form(form: Form):
    upload = form.files.get("vector") or form.files.get("file")
    if upload is None:
        raise InvalidInput("the multipart field 'vector' (safetensors or gguf file) is required", "vector")
    vec, meta = formats.load_vector(
        upload.path, upload.filename, form.fields.get("format"), _site(form.fields)
    )
    return _optional_id(form.fields.get("id")), vec, meta


@router.post("/v1/vectors", status_code=201, dependencies=_admin)
async def create_vector(request: Request) -> JSONResponse:
    registry, model = _registry(request), _model(request)
    if request.headers.get("content-type", "").startswith("multipart/"):
        form = await _form(request)
        try:
            vector_id, vec, meta = await _run(_vector_from_form, form)
        finally:
            form.cleanup()
    else:
        vector_id, vec, meta = await _run(_vector_from_json, await _json(request))
    rec = await _run(registry.add_vector, vec, vector_id=vector_id, fit=model, meta=meta)
    return JSONResponse(rec.to_json(), status_code=201)


@router.get("/v1/vectors", dependencies=_reader)
async def list_vectors(request: Request) -> dict:
    return _listing(await _run(_registry(request).list_vectors))


@router.get("/v1/vectors/{vector_id}", dependencies=_reader)
async def get_vector(request: Request, vector_id: str) -> dict:
    return (await _run(_registry(request).get_vector, vector_id)).to_json()


@router.put("/v1/vectors/{vector_id}/stats", dependencies=_admin)
async def put_vector_stats(request: Request, vector_id: str) -> dict:
    """Upload the projection samples `project_out` with `"to": "resample"` draws from (what
    `steerserve registry stats` computes)."""
    registry, body = _registry(request), await _json(request)

    def put() -> dict:
        samples = parse_vector_stats(body)
        if None in samples:  # the one-site shortcut
            sites = registry.get_vector(vector_id).sites
            if len(sites) != 1:
                raise InvalidInput(
                    f'vector {vector_id!r} has {len(sites)} sites: give "sites"', param="sites"
                )
            samples = {sites[0]: samples[None]}
        registry.put_vector_stats(vector_id, samples)
        return registry.get_vector(vector_id).to_json()

    return await _run(put)


@router.delete("/v1/vectors/{vector_id}", dependencies=_admin)
async def delete_vector(request: Request, vector_id: str) -> dict:
    await _run(_registry(request).delete_vector, vector_id)
    return _deleted("vector", vector_id)


# ---- variants -------------------------------------------------------------------------------------


@router.post("/v1/variants", status_code=201, dependencies=_admin)
async def create_variant(request: Request) -> JSONResponse:
    body = await _json(request)
    registry = _registry(request)
    rec = await _run(lambda: registry.add_variant(*parse_variant(body)))
    return JSONResponse(rec.to_json(), status_code=201)


@router.get("/v1/variants", dependencies=_reader)
async def list_variants(request: Request) -> dict:
    return _listing(await _run(_registry(request).list_variants))


@router.get("/v1/variants/{variant_id}", dependencies=_reader)
async def get_variant(request: Request, variant_id: str) -> dict:
    return (await _run(_registry(request).get_variant, variant_id)).to_json()


@router.delete("/v1/variants/{variant_id}", dependencies=_admin)
async def delete_variant(request: Request, variant_id: str) -> dict:
    await _run(_registry(request).delete_variant, variant_id)
    return _deleted("variant", variant_id)
