"""The web chat (``GET /`` and its static files) and ``GET /health``."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from dhad.serve import schemas as S
from dhad.serve.service import Service

STATIC_DIR = Path(str(resources.files("dhad.serve") / "static"))
# The page loads only its own files; nothing inline, nothing from elsewhere (no CDN: no network).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def router(svc: Service) -> APIRouter:
    r = APIRouter()
    backend = svc.backend

    @r.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                                     "Cache-Control": "no-cache"})

    @r.get("/health", response_model=S.Health, responses={503: {"model": S.Health, "description": "not serving"}})
    async def health():
        """200 while the engine serves; 503 once it is shutting down or stopped (take it out of rotation)."""
        st = backend.engine.stats()
        ok = bool(st.get("running")) and not st.get("closing") and not svc.draining
        body = S.Health(status="ok" if ok else "unavailable", model=backend.model_name,
                        running=st.get("active"), queued=st.get("queued"))
        return body if ok else JSONResponse(body.model_dump(), status_code=503)

    return r


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC_DIR)
