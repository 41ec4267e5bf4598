"""App factory: wires config -> state -> routes, and maps every error onto OpenAI's error body."""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException

from fewstep.engines.core import EngineError
from fewstep.engines.samplers import MAX_STEPS, MIN_STEPS

from . import __version__
from .config import LimitsConfig, ServerConfig
from .protocol import NASA_MAX
from .routes import health, images, models, realtime, stream, videos, web
from .security import Guard
from .state import AppState

log = logging.getLogger("fewstep.server")

def field_hints(limits: LimitsConfig) -> dict[str, str]:
    """Allowed ranges, so a validation error tells the caller what to send instead (the limits: the live config)."""
    return {
        "prompt": f"a non-empty string of at most {limits.max_prompt_chars} characters",
        "n": f"an integer from 1 to {limits.max_n}",
        "size": 'a string "WxH" naming one of the sizes the model serves (GET /v1/models lists them)',
        "num_inference_steps": f"an integer from {MIN_STEPS} to {MAX_STEPS}",
        "guidance_scale": "a number from 0 to 30 (0 for guidance-distilled models)",
        "seed": "an integer from 0 to 2**62",
        "strength": "a number in (0, 1]: how far the input image is noised (1.0 ignores it)",
        "image": f"a PNG, JPEG or WebP file of at most {limits.max_image_bytes} bytes",
        "response_format": '"b64_json" (URLs are not served)',
        "output_format": '"png", "jpeg" or "webp"',
        "negative_prompt": f"a string of at most {limits.max_prompt_chars} characters",
        "nasa_scale": f"a number from 0 to {NASA_MAX:g}",
    }


def _schema_with_limits(schema: dict, config: ServerConfig) -> dict:
    """The OpenAPI schema states the live limits (the request models leave them to AppState.check_limits)."""
    limits = config.limits
    for name, model in schema.get("components", {}).get("schemas", {}).items():
        props = model.get("properties", {})
        if props.get("prompt", {}).get("type") == "string":
            props["prompt"]["maxLength"] = limits.max_prompt_chars
        if name == "ImageGenerationRequest" and "n" in props:
            props["n"]["maximum"] = limits.max_n
        if name == "VideoRequest" and "num_frames" in props:
            props["num_frames"]["maximum"] = config.engine.stream.max_video_frames
    return schema


def _validation_as_400(schema: dict) -> dict:
    """FastAPI documents a 422 (HTTPValidationError) on every route with parameters; this server answers validation
    errors 400 with OpenAI's error body (on_validation below), so the schema says that instead."""
    for ops in schema.get("paths", {}).values():
        for op in ops.values():
            responses = op.get("responses", {})
            if responses.pop("422", None) is not None and "400" not in responses:
                responses["400"] = {"description": "Invalid request: a field or parameter fails validation",
                                    "content": {"application/json": {
                                        "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema


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
        else:  # loaded before the app takes requests, off the event loop (a Ray Serve replica keeps answering
            await asyncio.to_thread(state.load)  # its controller's health checks meanwhile)
        yield
        state.shutdown()

    app = FastAPI(title="fewstep", version=__version__, lifespan=lifespan)
    app.state.fewstep = state
    for r in (images.router, models.router, health.router, stream.router, realtime.router, videos.router, web.router):
        app.include_router(r)
    hints = field_hints(config.limits)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _validation_as_400(_schema_with_limits(FastAPI.openapi(app), config))
        return app.openapi_schema

    app.openapi = openapi

    def end_sessions() -> None:  # at SIGTERM (Guard.drain): every stream's socket gets 'stopped' (reason shutdown)
        if state.core is not None:
            state.core.close_streams("shutdown")

    # request ids, keys, Origin, per-client limits, body limit, idle WebSockets, drain (server/security.py)
    app.state.guard = Guard(config, on_drain=end_sessions)
    app.add_middleware(Guard.Middleware, guard=app.state.guard)
    if config.security.cors_origins:  # outermost: answers preflights, and its headers reach the guard's refusals
        app.add_middleware(CORSMiddleware, allow_origins=config.security.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id", "Retry-After", images.SEED_HEADER, images.BATCH_HEADER,
                                           "Server-Timing"])

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        if err.get("type") == "json_invalid":
            state.metrics.on_request(state.model_name, 400, "invalid_json")
            return error_response(400, "request body is not valid JSON", None, "invalid_json")
        elif param is None:
            msg = f"request body: {err.get('msg')}"
        else:
            msg = f"invalid '{param}': {err.get('msg', '').removeprefix('Value error, ')}"
            if param in hints:
                msg += f"; expected {hints[param]}"
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
        # the details (paths, allocator text) go to the log only; the client gets the id to quote
        rid = getattr(request.state, "request_id", None)
        log.exception("request %s failed", rid)
        state.metrics.on_request(state.model_name, 500, "internal")
        return error_response(500, f"internal error (request id {rid}); the details are in the server log", None,
                              "internal")

    return app
