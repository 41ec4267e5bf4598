"""App factory: wires config -> state -> routes, and maps every error onto OpenAI's error body."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fewstep.engines.core import EngineError

from . import __version__
from .config import ServerConfig
from .routes import health, images, models, realtime, stream, videos, web
from .state import AppState

log = logging.getLogger("fewstep.server")

# Allowed ranges, so a validation error tells the caller what to send instead.
FIELD_HINTS = {
    "prompt": "a non-empty string of at most 2000 characters",
    "n": "an integer from 1 to 16",
    "size": 'a string "WxH" with each side from 64 to 2048, a multiple of the model\'s size step',
    "num_inference_steps": "an integer from 1 to 8",
    "guidance_scale": "a number from 0 to 30 (0 for guidance-distilled models)",
    "seed": "an integer from 0 to 2**62",
    "response_format": '"b64_json" (URLs are not served)',
    "output_format": '"png", "jpeg" or "webp"',
    "negative_prompt": "a string of at most 2000 characters",
}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type_: str | None = None) -> JSONResponse:
    type_ = type_ or ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


def create_app(config: ServerConfig, load_async: bool = True) -> FastAPI:
    state = AppState(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load_async:
            threading.Thread(target=state.load, name="fewstep-load", daemon=True).start()
        else:
            state.load()
        yield
        state.shutdown()

    app = FastAPI(title="fewstep", version=__version__, lifespan=lifespan)
    app.state.fewstep = state
    for r in (images.router, models.router, health.router, stream.router, realtime.router, videos.router, web.router):
        app.include_router(r)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > config.limits.max_body_bytes:
            return error_response(413, f"request body is {size} bytes; the limit is {config.limits.max_body_bytes}",
                                  None, "body_too_large")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        if err.get("type") == "json_invalid":
            msg = "request body is not valid JSON"
        elif param is None:
            msg = f"request body: {err.get('msg')}"
        else:
            msg = f"invalid '{param}': {err.get('msg', '').removeprefix('Value error, ')}"
            if param in FIELD_HINTS:
                msg += f"; expected {FIELD_HINTS[param]}"
        state.metrics.on_request(state.model_name, 400, "invalid_" + (param or "body"))
        return error_response(400, msg, param, "invalid_" + (param or "body"))

    @app.exception_handler(EngineError)
    async def on_engine_error(request: Request, exc: EngineError):
        state.metrics.on_request(state.model_name, exc.status, exc.code)
        resp = error_response(exc.status, str(exc), exc.param, exc.code)
        if exc.retry_after is not None:
            resp.headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return resp

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), None, None)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception):
        log.exception("request failed")
        state.metrics.on_request(state.model_name, 500, "internal")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal")

    return app
