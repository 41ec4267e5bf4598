"""The browser page (clients/web/: plain HTML + JS, no build step), served at ``/``."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from fewstep.engines.core import EngineError

router = APIRouter()

WEB_DIR = Path(__file__).resolve().parents[2] / "clients" / "web"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css"}


def _web_dir() -> Path:
    try:  # the installed package (fewstep.clients ships web/* as package data)
        import fewstep.clients

        d = Path(fewstep.clients.__file__).resolve().parent / "web"
        if d.is_dir():
            return d
    except ImportError:
        pass
    return WEB_DIR


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(_web_dir() / "index.html", media_type=_TYPES[".html"], headers={"Cache-Control": "no-cache"})


@router.get("/web/{name}", include_in_schema=False)
async def asset(name: str) -> FileResponse:
    d = _web_dir()
    path = d / name
    # only files directly in clients/web with a known type: no traversal, no directory listing
    if "/" in name or name.startswith(".") or path.suffix not in _TYPES or not path.is_file():
        raise EngineError(f"no such file: /web/{name}", 404, None, "not_found")
    return FileResponse(path, media_type=_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})
