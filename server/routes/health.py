from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..protocol import ErrorResponse, HealthResponse, ReadyResponse, error_responses

router = APIRouter()
# /health, /ready and /metrics are open unless --protect-metrics (then 401 without a key); a draining server answers
# 503 with the error body, a dead or loading one with the route's own body
_DRAINING = "; or OpenAI's error body while the server shuts down"


def dead_reason(state) -> str | None:
    """Why this process can no longer serve (an orchestrator should restart it), or None."""
    if state.load_error:
        return "the model failed to load; see the server log"
    return None if state.core is None else state.core.dead_reason()


@router.get("/health", response_model=HealthResponse, responses={
    **error_responses(401, 403),
    503: {"model": HealthResponse | ErrorResponse, "description": "The process cannot serve again (load failed, engine "
          "thread died): restart it" + _DRAINING}})
@router.get("/v2/health/live", response_model=HealthResponse, responses={
    **error_responses(401, 403), 503: {"model": HealthResponse | ErrorResponse, "description": "As GET /health"}})
async def health(request: Request) -> JSONResponse:
    """200 while loading and serving; 503 once the process cannot serve again (load failed, engine thread died)."""
    reason = dead_reason(request.app.state.fewstep)
    if reason:
        return JSONResponse({"status": "dead", "error": reason}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready", response_model=ReadyResponse, responses={
    **error_responses(401, 403),
    503: {"model": ReadyResponse | ErrorResponse, "description": "Not ready yet (loading, warming up) or a model "
          "failed to load" + _DRAINING}})
@router.get("/v2/health/ready", response_model=ReadyResponse, responses={
    **error_responses(401, 403), 503: {"model": ReadyResponse | ErrorResponse, "description": "As GET /ready"}})
async def ready(request: Request) -> JSONResponse:
    state = request.app.state.fewstep
    # "model" is the default model (kept for clients of earlier versions); "models" lists every served one
    models = [{"id": name, "state": st} for name, st in state.model_states.items()]
    if state.ready.is_set():
        return JSONResponse({"ready": True, "model": state.model_name, "models": models})
    body = {"ready": False, "model": state.model_name, "models": models}
    if state.load_error:  # the exception's text (paths, allocator messages) stays in the log
        body["error"] = "the model failed to load; see the server log"
    return JSONResponse(body, status_code=503)


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"},
    **error_responses(401, 403, 503)})
async def metrics(request: Request) -> Response:
    state = request.app.state.fewstep
    labels = {"replica": state.replica} if state.replica else None  # a Ray Serve replica names itself
    return Response(state.metrics.render(labels), media_type="text/plain; version=0.0.4")
