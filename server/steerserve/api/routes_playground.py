"""The steering playground: a static page at `/` and its assets under `/playground/`.

The page holds no secrets and calls only the public API with the key the user types in, so it is
served without auth. Files ship as package data (no build step, nothing from a CDN).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static" / "playground"
# NOTE: everything the page loads or calls is on this origin; the CSP keeps it that way.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

router = APIRouter()


@router.get("/", include_in_schema=False)
async def playground_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=_HEADERS)


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> FileResponse:
    # browsers ask for /favicon.ico whatever the page declares: the page's own icon, not a 404
    return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml", headers=_HEADERS)


def install_playground(app: FastAPI) -> None:
    """Serve the page at `/` and its assets at `/playground/...`."""
    app.include_router(router)
    app.mount("/playground", StaticFiles(directory=STATIC_DIR), name="playground")
