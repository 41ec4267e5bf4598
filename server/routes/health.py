from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

router = APIRouter()


@router.get("/health")
@router.get("/v2/health/live")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
@router.get("/v2/health/ready")
async def ready(request: Request) -> JSONResponse:
    state = request.app.state.fewstep
    if state.ready.is_set():
        return JSONResponse({"ready": True, "model": state.model_name})
    body = {"ready": False, "model": state.model_name}
    if state.load_error:
        body["error"] = state.load_error
    return JSONResponse(body, status_code=503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.fewstep.metrics.render(), media_type="text/plain; version=0.0.4")
